"""A 16550A UART on the port-I/O bus: console output to a sink, input from the event thread.

Registers follow the National Semiconductor PC16550D data sheet; the divisor
latch and modem lines are stored but have no effect.  The FIFO is modelled for
input only: output is handed to the sink at once, so the transmitter is always
empty and THRE is always set.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from kata_virtio import InterruptTrigger

# register offsets
DATA = 0  # RBR (read) / THR (write); DLL when LCR.DLAB
IER = 1  # DLM when LCR.DLAB
IIR = 2  # read; FCR on write
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01  # received data available
IER_THRE = 0x02  # transmitter holding register empty
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO_ENABLED = 0xC0
LCR_DLAB = 0x80
MCR_LOOP = 0x10
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
MSR_DEFAULT = 0xB0  # DCD, DSR, CTS asserted
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02

RX_CAPACITY = 4096
OUTPUT_FLUSH_BYTES = 512


class Serial:
    """COM port emulation; ``sink`` receives console bytes (buffered to a line), ``interrupt`` is its IRQ."""

    def __init__(self, interrupt: InterruptTrigger, sink: Callable[[bytes], None] | None = None) -> None:
        self._interrupt = interrupt
        self._sink = sink
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._out = bytearray()
        self._ier = 0
        self._lcr = 0x03  # 8N1
        self._mcr = 0x08  # OUT2
        self._scr = 0
        self._dll = 0x0C  # 9600 baud
        self._dlm = 0
        self._fcr = 0
        self._thre_pending = False
        self.bytes_out = 0
        self.bytes_in = 0

    # --- guest side (vCPU threads) ------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """Read one register (wider accesses repeat the byte register, as on real hardware they are split)."""
        with self._lock:
            value = self._read_register(offset)
        return bytes([value]) + b"\x00" * (size - 1)

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                return self._dll
            return self._rx.popleft() if self._rx else 0
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            iir = self._iir()
            if iir == IIR_THRE:
                self._thre_pending = False  # reading IIR clears a THRE interrupt (16550 data sheet)
            return iir | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if offset == MSR:
            if self._mcr & MCR_LOOP:
                # loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD
                m = self._mcr
                return ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            return MSR_DEFAULT
        return self._scr

    def _iir(self) -> int:
        if self._ier & IER_RDA and self._rx:
            return IIR_RDA
        if self._ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        return IIR_NONE

    def write(self, offset: int, data: bytes) -> None:
        """Write one register."""
        value = data[0]
        fire = False
        flush = b""
        with self._lock:
            dlab = self._lcr & LCR_DLAB
            if offset == DATA:
                if dlab:
                    self._dll = value
                elif self._mcr & MCR_LOOP:
                    self._push_rx(bytes([value]))
                    fire = bool(self._ier & IER_RDA)
                else:
                    self._out.append(value)
                    self.bytes_out += 1
                    if value == 0x0A or len(self._out) >= OUTPUT_FLUSH_BYTES:
                        flush = bytes(self._out)
                        self._out.clear()
                    if self._ier & IER_THRE:
                        self._thre_pending = True
                        fire = True
            elif offset == IER:
                if dlab:
                    self._dlm = value
                else:
                    newly_thre = value & IER_THRE and not self._ier & IER_THRE
                    self._ier = value & 0x0F
                    if newly_thre:
                        # the transmitter is always empty: enabling THRE interrupts raises one at once
                        self._thre_pending = True
                        fire = True
                    if self._ier & IER_RDA and self._rx:
                        fire = True
            elif offset == IIR:
                self._fcr = value
                if value & FCR_CLEAR_RX:
                    self._rx.clear()
            elif offset == LCR:
                self._lcr = value
            elif offset == MCR:
                self._mcr = value
            elif offset == SCR:
                self._scr = value
        if flush:
            self._emit(flush)
        if fire:
            self._interrupt.trigger()

    # --- snapshot ---------------------------------------------------------------------------------
    _SAVED = ("_ier", "_lcr", "_mcr", "_scr", "_dll", "_dlm", "_fcr", "_thre_pending")

    def save_state(self) -> dict[str, int]:
        """The registers the guest's driver programmed (input not yet read is not kept)."""
        with self._lock:
            return {name.lstrip("_"): int(getattr(self, name)) for name in self._SAVED}

    def restore_state(self, state: dict[str, int]) -> None:
        """Take back `save_state`'s registers (each a byte; a bad value raises ValueError)."""
        values = {}
        for name in self._SAVED:
            value = state[name.lstrip("_")]
            if not isinstance(value, int) or not 0 <= value <= 0xFF:
                raise ValueError(f"serial register {name.lstrip('_')} {value!r} is not a byte")
            values[name] = value
        with self._lock:
            for name, value in values.items():
                setattr(self, name, bool(value) if name == "_thre_pending" else value)

    # --- host side (event thread) --------------------------------------------------------------
    def _push_rx(self, data: bytes) -> int:
        room = RX_CAPACITY - len(self._rx)
        accepted = data[:room]
        self._rx.extend(accepted)
        return len(accepted)

    def rx_room(self) -> int:
        """How many input bytes the device can take now."""
        with self._lock:
            return RX_CAPACITY - len(self._rx)

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes typed on the console; returns how many were accepted (the rest must wait)."""
        with self._lock:
            accepted = self._push_rx(data)
            self.bytes_in += accepted
            fire = accepted > 0 and bool(self._ier & IER_RDA)
        if fire:
            self._interrupt.trigger()
        return accepted

    def flush(self) -> None:
        """Hand any buffered console output to the sink."""
        with self._lock:
            pending = bytes(self._out)
            self._out.clear()
        if pending:
            self._emit(pending)

    def _emit(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
