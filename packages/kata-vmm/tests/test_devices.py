"""Legacy devices, the buses and the event loop, without a guest."""

from __future__ import annotations

import os
import threading

import pytest

from kata_vmm._bus import Bus
from kata_vmm._errors import ConfigError
from kata_vmm._event_loop import EventLoop
from kata_vmm._eventfd import EventFd
from kata_vmm.devices import AcpiPowerDevice, I8042Device, Serial
from kata_vmm.devices import serial as s


class CountingIrq:
    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


def make_serial() -> tuple[Serial, CountingIrq, list[bytes]]:
    irq = CountingIrq()
    out: list[bytes] = []
    return Serial(irq, out.append), irq, out


def reg(dev: Serial, offset: int) -> int:
    return dev.read(offset, 1)[0]


def test_serial_output_is_buffered_to_line_ends_and_flushed() -> None:
    dev, _irq, out = make_serial()
    for b in b"ab\ncd":
        dev.write(s.DATA, bytes([b]))
    assert out == [b"ab\n"]
    dev.flush()
    assert out == [b"ab\n", b"cd"]
    assert dev.bytes_out == 5


def test_serial_transmitter_always_reads_empty() -> None:
    dev, _irq, _ = make_serial()
    assert reg(dev, s.LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT
    assert reg(dev, s.IIR) & 0x0F == s.IIR_NONE


def test_serial_thre_interrupt_fires_when_enabled_and_clears_on_iir_read() -> None:
    dev, irq, _ = make_serial()
    dev.write(s.IER, bytes([s.IER_THRE]))
    assert irq.count == 1
    assert reg(dev, s.IIR) & 0x0F == s.IIR_THRE
    assert reg(dev, s.IIR) & 0x0F == s.IIR_NONE
    dev.write(s.DATA, b"x")
    assert irq.count == 2


def test_serial_input_sets_data_ready_and_raises_rda_interrupt() -> None:
    dev, irq, _ = make_serial()
    dev.write(s.IER, bytes([s.IER_RDA]))
    assert dev.enqueue_input(b"hi") == 2
    assert irq.count == 1
    assert reg(dev, s.LSR) & s.LSR_DR
    assert reg(dev, s.IIR) & 0x0F == s.IIR_RDA
    assert bytes([reg(dev, s.DATA), reg(dev, s.DATA)]) == b"hi"
    assert not reg(dev, s.LSR) & s.LSR_DR
    assert dev.bytes_in == 2


def test_serial_input_beyond_capacity_is_refused_not_dropped() -> None:
    dev, _irq, _ = make_serial()
    assert dev.enqueue_input(bytes(s.RX_CAPACITY + 10)) == s.RX_CAPACITY
    assert dev.rx_room() == 0
    reg(dev, s.DATA)
    assert dev.rx_room() == 1


def test_serial_divisor_latch_does_not_touch_data_or_ier() -> None:
    dev, _irq, out = make_serial()
    dev.write(s.LCR, bytes([s.LCR_DLAB]))
    dev.write(s.DATA, b"\x01")
    dev.write(s.IER, b"\x00")
    assert (reg(dev, s.DATA), reg(dev, s.IER)) == (1, 0)
    dev.write(s.LCR, b"\x03")
    dev.flush()
    assert out == []


def test_serial_loopback_returns_written_bytes_as_input() -> None:
    dev, _irq, out = make_serial()
    dev.write(s.MCR, bytes([s.MCR_LOOP]))
    dev.write(s.DATA, b"L")
    assert reg(dev, s.DATA) == ord("L")
    dev.flush()
    assert out == []


def test_serial_registers_survive_save_and_restore_into_a_fresh_uart() -> None:
    dev, _irq, _ = make_serial()
    dev.write(s.LCR, bytes([s.LCR_DLAB | 0x03]))
    dev.write(s.DATA, b"\x01")  # divisor 1: 115200 baud
    dev.write(s.LCR, b"\x03")
    dev.write(s.IER, bytes([s.IER_RDA | s.IER_THRE]))
    dev.write(s.SCR, b"\x5a")
    state = dev.save_state()
    fresh, irq, _ = make_serial()
    fresh.restore_state(state)
    assert fresh.save_state() == state
    assert reg(fresh, s.IER) == s.IER_RDA | s.IER_THRE and reg(fresh, s.SCR) == 0x5A
    assert reg(fresh, s.IIR) & 0x0F == s.IIR_THRE  # the pending THRE interrupt came along
    fresh.enqueue_input(b"k")
    assert irq.count == 1  # input raises RDA, as the guest's driver asked before the snapshot


@pytest.mark.parametrize("bad", [{"ier": 256}, {"lcr": -1}, {"mcr": "8"}, {}])
def test_serial_refuses_a_saved_state_that_is_not_registers(bad: dict[str, object]) -> None:
    dev, _irq, _ = make_serial()
    state: dict[str, object] = {**dev.save_state(), **bad} if bad else {"ier": 1}
    with pytest.raises((ValueError, KeyError)):
        dev.restore_state(state)  # type: ignore[arg-type]
    assert dev.save_state()["lcr"] == 0x03  # untouched


def test_i8042_status_reads_output_full_and_reset_command_resets() -> None:
    resets: list[bool] = []
    dev = I8042Device(lambda: resets.append(True))
    assert dev.read(4, 1) == b"\x01"
    dev.write(4, b"\xd1")
    assert resets == []
    dev.write(4, b"\xfe")
    assert resets == [True]


def test_acpi_power_device_acts_only_on_s5_and_reset_value() -> None:
    events: list[str] = []
    dev = AcpiPowerDevice(lambda: events.append("off"), lambda: events.append("reset"))
    dev.write(0, bytes([3 << 2 | 0x20]))  # S3: ignored
    dev.write(0, bytes([5 << 2]))  # no SLP_EN
    assert events == []
    dev.write(0, bytes([5 << 2 | 0x20]))
    dev.write(2, b"\x01")
    assert events == ["off", "reset"]


def test_bus_dispatches_by_offset_and_rejects_overlap() -> None:
    bus = Bus("pio")
    dev, _irq, out = make_serial()
    bus.insert(dev, 0x3F8, 8)
    with pytest.raises(ConfigError, match="overlaps"):
        bus.insert(dev, 0x3FF, 2)
    bus.write(0x3F8, b"Q")
    dev.flush()
    assert out == [b"Q"]
    assert bus.read(0x3FD, 1)[0] & s.LSR_THRE
    assert bus.read(0xCFC, 4) == b"\xff" * 4  # absent PCI config space
    bus.write(0x80, b"\x00")
    assert (bus.unhandled_reads, bus.unhandled_writes) == (1, 1)
    assert bus.remove(0x3F8) is dev
    assert bus.find(0x3F8) is None


def test_event_loop_runs_readers_calls_and_tickers_on_its_own_thread() -> None:
    loop = EventLoop(tick=0.01)
    seen: list[tuple[str, str]] = []
    done = threading.Event()
    efd = EventFd()

    def on_ready(mask: int) -> None:
        efd.read()
        seen.append(("fd", threading.current_thread().name))
        done.set()

    loop.add_reader(efd.fd, on_ready)
    loop.add_ticker(lambda: None)
    loop.start()
    try:
        efd.write()
        assert done.wait(5)
        called = threading.Event()

        def record() -> None:
            seen.append(("call", threading.current_thread().name))
            called.set()

        loop.call_soon(record)
        assert called.wait(5)
    finally:
        loop.stop()
        efd.close()
    assert seen == [("fd", "kata-vmm-events"), ("call", "kata-vmm-events")]
    assert not loop.thread.is_alive()


def test_event_loop_survives_a_failing_callback() -> None:
    loop = EventLoop(tick=0.01)
    ok = threading.Event()
    loop.start()
    try:

        def fail() -> None:
            raise ZeroDivisionError

        loop.call_soon(fail)
        loop.call_soon(ok.set)
        assert ok.wait(5)
    finally:
        loop.stop()
    assert isinstance(loop.errors[0], ZeroDivisionError)


def test_eventfd_counts_and_reads_zero_when_empty() -> None:
    with EventFd() as efd:
        assert efd.read() == 0
        efd.write(2)
        efd.write(3)
        assert efd.read() == 5
        assert os.get_blocking(efd.fd) is False
