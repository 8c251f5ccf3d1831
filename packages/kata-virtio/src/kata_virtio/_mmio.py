"""The virtio-mmio version 2 transport (virtio 1.2 §4.2)."""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import Any

from kata_virtio._device import DeviceError, VirtioDevice
from kata_virtio._memory import GuestMemory, InterruptTrigger, VirtioError
from kata_virtio._queue import Queue
from kata_virtio._spec import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
)

_log = logging.getLogger("kata_virtio.mmio")

# virtio 1.2 §4.2.2: register offsets
VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_QUEUE_RESET = 0x0C0
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100

VIRTIO_MMIO_MAGIC = 0x74726976  # "virt"
#: Size of the register window a VMM maps for one device.
MMIO_WINDOW_SIZE = 0x1000
#: Vendor id we report ("KATA" would be legal too; 0 is what QEMU/Firecracker use for "none").
VENDOR_ID = 0


class MmioTransport:
    """One virtio-mmio device window: registers at 0x000-0x0ff, device config from 0x100.

    The VMM routes guest MMIO reads and writes of the window here (`read`, `write`) and
    queue notifications either here (QueueNotify) or, with an ioeventfd, to `notify`.
    Interrupts go out through ``interrupt`` (an irqfd in kata-vmm). Thread-safe: vCPU
    threads and the event thread may call in concurrently.

    Device state has one owner thread (the VMM's event thread): queue processing and host-fd events
    run there, and so do the two device-state changes a vCPU's register write asks for, activation
    (DRIVER_OK) and reset (status 0). ``run_on_owner(fn)`` runs ``fn`` on that thread and returns
    once it ran, so the writing vCPU reads status 0 right after a reset (virtio 1.2 §2.4.1) and no
    kick can reach a device that is not activated yet. Without it they run in the caller (one thread).
    The transport's own lock guards registers only and is never held while device code runs: device
    code may take it (interrupts, NEEDS_RESET), never the other way round.
    """

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        interrupt: InterruptTrigger,
        *,
        on_queue_notify: Callable[[int], None] | None = None,
        run_on_owner: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.device = device
        #: Where QueueNotify writes go (e.g. a hop to the event thread); default: `notify` right here.
        self.on_queue_notify = on_queue_notify
        #: Runs activation and reset on the device's owner thread and waits; default: right here.
        self.run_on_owner = run_on_owner
        self.memory = memory
        self.interrupt = interrupt
        self.queues = [Queue(n) for n in device.queue_max_sizes]
        self._lock = threading.RLock()
        self.config_generation = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.interrupt_status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.activated = False
        for q in self.queues:
            q.reset()

    # -- the device's view of the transport (DeviceInterrupt) ----------------------------------------

    def signal_used_queue(self, index: int) -> None:
        """Raise the used-buffer interrupt (virtio 1.2 §4.2.3.4)."""
        with self._lock:
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING
        self.interrupt.trigger()

    def signal_config_change(self) -> None:
        """Bump the config generation and raise the configuration-change interrupt (§2.5.1, §4.2.3.5)."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG
        self.interrupt.trigger()

    def set_needs_reset(self, reason: str) -> None:
        """Set DEVICE_NEEDS_RESET and, once DRIVER_OK, send a config-change interrupt (§2.1.2)."""
        with self._lock:
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
            notify = bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK)
            if notify:
                self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG
        _log.warning("device %d needs reset: %s", self.device.device_type, reason)
        if notify:
            self.interrupt.trigger()

    # -- features ----------------------------------------------------------------------------------

    @property
    def device_features(self) -> int:
        """Features offered: the device's plus the transport's ring features."""
        return (
            self.device.avail_features
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_INDIRECT_DESC
            | 1 << VIRTIO_F_EVENT_IDX
        )

    # -- register access ---------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """A guest read of ``size`` bytes at ``offset`` in the window."""
        if offset >= VIRTIO_MMIO_CONFIG:
            # virtio 1.2 §4.2.2.2: config space may be read with any width the field allows.
            return self.device.read_config(offset - VIRTIO_MMIO_CONFIG, size)
        if size != 4 or offset % 4:
            # §4.2.2.2: the driver MUST use 32-bit aligned accesses for registers.
            _log.debug("unaligned register read at %#x size %d", offset, size)
            return bytes(size)
        return struct.pack("<I", self._read_register(offset) & 0xFFFFFFFF)

    def read_u32(self, offset: int) -> int:
        """A 32-bit register read (convenience for tests and the VMM)."""
        return int(struct.unpack("<I", self.read(offset, 4))[0])

    def _read_register(self, offset: int) -> int:
        with self._lock:
            q = self._selected_queue()
            if offset == VIRTIO_MMIO_MAGIC_VALUE:
                return VIRTIO_MMIO_MAGIC
            if offset == VIRTIO_MMIO_VERSION:
                return 2
            if offset == VIRTIO_MMIO_DEVICE_ID:
                return self.device.device_type
            if offset == VIRTIO_MMIO_VENDOR_ID:
                return VENDOR_ID
            if offset == VIRTIO_MMIO_DEVICE_FEATURES:
                if self.device_features_sel > 1:
                    return 0
                return self.device_features >> (32 * self.device_features_sel)
            if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
                return q.max_size if q is not None else 0
            if offset == VIRTIO_MMIO_QUEUE_READY:
                return int(q.ready) if q is not None else 0
            if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
                return self.interrupt_status
            if offset == VIRTIO_MMIO_STATUS:
                return self.status
            if offset in (VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH):
                return 0xFFFFFFFF  # §4.2.2: a non-existent region has length -1
            if offset in (VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_BASE_HIGH):
                return 0xFFFFFFFF
            if offset == VIRTIO_MMIO_QUEUE_RESET:
                return 0
            if offset == VIRTIO_MMIO_CONFIG_GENERATION:
                return self.config_generation
            if q is not None:
                # §4.2.2: the queue size and address registers are read-write.
                addr_regs = {
                    VIRTIO_MMIO_QUEUE_NUM: q.size,
                    VIRTIO_MMIO_QUEUE_DESC_LOW: q.desc_table,
                    VIRTIO_MMIO_QUEUE_DESC_HIGH: q.desc_table >> 32,
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW: q.avail_ring,
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH: q.avail_ring >> 32,
                    VIRTIO_MMIO_QUEUE_USED_LOW: q.used_ring,
                    VIRTIO_MMIO_QUEUE_USED_HIGH: q.used_ring >> 32,
                }
                if offset in addr_regs:
                    return addr_regs[offset]
            return 0

    def write(self, offset: int, data: bytes) -> None:
        """A guest write of ``data`` at ``offset`` in the window."""
        if offset >= VIRTIO_MMIO_CONFIG:
            with self._lock:
                # §4.2.2.2 / §3.1.1: config writes are meaningful only once the driver knows the device.
                self.device.write_config(offset - VIRTIO_MMIO_CONFIG, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            _log.debug("unaligned register write at %#x size %d ignored", offset, len(data))
            return
        value = struct.unpack("<I", data)[0]
        if offset == VIRTIO_MMIO_QUEUE_NOTIFY:
            (self.on_queue_notify or self.notify)(value & 0xFFFF)
            return
        if offset == VIRTIO_MMIO_STATUS and value == 0:
            self._on_owner(self._reset)  # §2.4: the device drops its state on the thread that owns it
            return
        activate = False
        with self._lock:
            activate = self._write_register(offset, value)
        if activate:
            self._on_owner(self._activate)

    def _on_owner(self, fn: Callable[[], None]) -> None:
        if self.run_on_owner is None:
            fn()
        else:
            self.run_on_owner(fn)

    def write_u32(self, offset: int, value: int) -> None:
        """A 32-bit register write (convenience for tests and the VMM)."""
        self.write(offset, struct.pack("<I", value & 0xFFFFFFFF))

    def _selected_queue(self) -> Queue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_register(self, offset: int, value: int) -> bool:
        q = self._selected_queue()
        if offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
            # §3.1.1: features are fixed once FEATURES_OK is set.
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK or self.driver_features_sel > 1:
                return False
            shift = 32 * self.driver_features_sel
            self.driver_features = self.driver_features & ~(0xFFFFFFFF << shift) | value << shift
        elif offset == VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == VIRTIO_MMIO_INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == VIRTIO_MMIO_STATUS:
            return self._write_status(value)
        elif offset == VIRTIO_MMIO_SHM_SEL:
            self.shm_sel = value
        elif offset == VIRTIO_MMIO_QUEUE_RESET:
            pass  # VIRTIO_F_RING_RESET is not offered
        elif q is not None and not q.ready and not self.activated:
            # §4.2.3.2: queue layout registers are written only while the queue is not ready.
            if offset == VIRTIO_MMIO_QUEUE_NUM:
                q.size = value
            elif offset == VIRTIO_MMIO_QUEUE_DESC_LOW:
                q.desc_table = q.desc_table & ~0xFFFFFFFF | value
            elif offset == VIRTIO_MMIO_QUEUE_DESC_HIGH:
                q.desc_table = q.desc_table & 0xFFFFFFFF | value << 32
            elif offset == VIRTIO_MMIO_QUEUE_AVAIL_LOW:
                q.avail_ring = q.avail_ring & ~0xFFFFFFFF | value
            elif offset == VIRTIO_MMIO_QUEUE_AVAIL_HIGH:
                q.avail_ring = q.avail_ring & 0xFFFFFFFF | value << 32
            elif offset == VIRTIO_MMIO_QUEUE_USED_LOW:
                q.used_ring = q.used_ring & ~0xFFFFFFFF | value
            elif offset == VIRTIO_MMIO_QUEUE_USED_HIGH:
                q.used_ring = q.used_ring & 0xFFFFFFFF | value << 32
            elif offset == VIRTIO_MMIO_QUEUE_READY and value & 1:
                q.ready = True
        elif q is not None and offset == VIRTIO_MMIO_QUEUE_READY and not value & 1 and not self.activated:
            q.ready = False
        else:
            _log.debug("ignored register write %#x=%#x", offset, value)
        return False

    def _write_status(self, value: int) -> bool:
        # Status 0 (reset) never gets here: `write` hands it to the owner thread.
        # §2.1.1: the driver only sets bits; it never clears one except by writing 0.
        new_bits = value & ~self.status
        value |= self.status & VIRTIO_CONFIG_S_NEEDS_RESET
        if new_bits & VIRTIO_CONFIG_S_FEATURES_OK:
            offered = self.device_features
            if self.driver_features & ~offered or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                # §3.1.1 step 6: leave FEATURES_OK clear so the driver sees the refusal.
                _log.info("refusing driver features %#x (offered %#x)", self.driver_features, offered)
                value &= ~VIRTIO_CONFIG_S_FEATURES_OK
            else:
                self.device.ack_features(self.driver_features)
        if new_bits & VIRTIO_CONFIG_S_DRIVER_OK and not value & VIRTIO_CONFIG_S_FEATURES_OK:
            value &= ~VIRTIO_CONFIG_S_DRIVER_OK
        self.status = value | (self.status & ~VIRTIO_CONFIG_S_FAILED)
        return bool(new_bits & VIRTIO_CONFIG_S_DRIVER_OK and self.status & VIRTIO_CONFIG_S_DRIVER_OK)

    def _activate(self) -> None:
        try:
            used = self.queues[: self.device.queue_count()]
            for i, q in enumerate(used):
                if not q.ready:
                    raise VirtioError(f"queue {i} not ready at DRIVER_OK")
                q.validate(self.memory)
            self.device.activate(self.memory, used, self)
            self.activated = True
            self.device.on_driver_ok()
        except VirtioError as err:
            self.set_needs_reset(f"activation failed: {err}")
        except Exception as err:  # never let a device bug reach the vCPU thread
            _log.exception("device %d activation failed", self.device.device_type)
            self.set_needs_reset(f"activation failed: {err!r}")

    def _reset(self) -> None:
        # §2.4: writing 0 to status resets the device; afterwards every register is as at power-on.
        # On the owner thread (see the class docstring): nothing processes the queues meanwhile.
        try:
            if self.activated or self.device.memory is not None:
                self.device.reset()
        except Exception:  # a device bug must not leave the registers half reset
            _log.exception("device %d reset failed", self.device.device_type)
        with self._lock:
            self._reset_state()

    # -- snapshot ----------------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        """The transport's registers, every queue's layout and indices, and the device's own state
        (`VirtioDevice.save_state`), as JSON-able values. Call on the owner thread, or with nothing
        running (every vCPU paused, the event thread not serving this device)."""
        with self._lock:
            return {
                "device_type": self.device.device_type,
                "status": self.status,
                "interrupt_status": self.interrupt_status,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "driver_features": self.driver_features,
                "queue_sel": self.queue_sel,
                "shm_sel": self.shm_sel,
                "config_generation": self.config_generation,
                "activated": self.activated,
                "queues": [_save_queue(q) for q in self.queues],
                "device": self.device.save_state(),
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Put a fresh transport (and its fresh device) in the state `save` recorded: registers, queues,
        then, if the device was activated, activate it on those queues and hand it its own state.

        Raises `DeviceError` for a state that does not fit this device (another type or queue count,
        values out of range, rings outside guest memory, features not offered) and leaves the
        transport reset. Call before anything runs (no vCPU, no event thread)."""
        try:
            self._restore(state)
        except DeviceError:
            self._reset()
            raise
        except (KeyError, TypeError, ValueError, VirtioError) as err:
            self._reset()
            raise DeviceError(f"virtio-mmio state does not fit this device: {err!r}") from err

    def _restore(self, state: dict[str, Any]) -> None:
        if _u32(state, "device_type") != self.device.device_type:
            raise DeviceError(
                f"saved device type {state['device_type']} is not this device's {self.device.device_type}"
            )
        queues = state["queues"]
        if not isinstance(queues, list) or len(queues) != len(self.queues):
            raise DeviceError(f"saved state has {len(queues)} queues, the device {len(self.queues)}")
        driver_features = int(state["driver_features"])
        if not 0 <= driver_features < 1 << 64 or driver_features & ~self.device_features:
            raise DeviceError(f"saved driver features {driver_features:#x} were not offered")
        with self._lock:
            self.status = _u32(state, "status")
            self.interrupt_status = _u32(state, "interrupt_status")
            self.device_features_sel = _u32(state, "device_features_sel")
            self.driver_features_sel = _u32(state, "driver_features_sel")
            self.driver_features = driver_features
            self.queue_sel = _u32(state, "queue_sel")
            self.shm_sel = _u32(state, "shm_sel")
            self.config_generation = _u32(state, "config_generation")
            for q, saved in zip(self.queues, queues, strict=True):
                _restore_queue(q, saved)
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            self.device.ack_features(driver_features)
        if not state["activated"]:
            return
        used = self.queues[: self.device.queue_count()]
        for i, q in enumerate(used):
            if not q.ready:
                raise DeviceError(f"queue {i} of an activated device is not ready")
            q.validate(self.memory)
        # activate sets the ring options from the features; the indices saved are kept
        indices = [(q.next_avail, q.next_used) for q in used]
        self.device.activate(self.memory, used, self)
        for q, (next_avail, next_used) in zip(used, indices, strict=True):
            q.next_avail, q.next_used = next_avail, next_used
        self.activated = True
        device_state = state.get("device", {})
        if not isinstance(device_state, dict):
            raise DeviceError("saved device state is not an object")
        self.device.restore_state(device_state)

    # -- notifications -----------------------------------------------------------------------------

    def notify(self, index: int) -> bool:
        """A queue notification (QueueNotify write or ioeventfd) for queue ``index``.

        True when the device stopped at its per-notification budget: notify again after other work.
        """
        if not self.activated or self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
            return False
        return self.device.notify(index)


_QUEUE_FIELDS = ("size", "desc_table", "avail_ring", "used_ring", "next_avail", "next_used")


def _save_queue(q: Queue) -> dict[str, Any]:
    saved: dict[str, Any] = {name: getattr(q, name) for name in _QUEUE_FIELDS}
    saved["ready"] = q.ready
    return saved


def _restore_queue(q: Queue, saved: dict[str, Any]) -> None:
    q.reset()
    size = int(saved["size"])
    if not 1 <= size <= q.max_size or size & (size - 1):
        raise DeviceError(f"saved queue size {size} is not a power of two <= {q.max_size}")
    q.size = size
    for name in ("desc_table", "avail_ring", "used_ring"):
        value = int(saved[name])
        if not 0 <= value < 1 << 64:
            raise DeviceError(f"saved queue {name} {value:#x} is out of range")
        setattr(q, name, value)
    for name in ("next_avail", "next_used"):
        value = int(saved[name])
        if not 0 <= value <= 0xFFFF:
            raise DeviceError(f"saved queue {name} {value} is out of range")
        setattr(q, name, value)
    q.ready = bool(saved["ready"])


def _u32(state: dict[str, Any], name: str) -> int:
    value = state[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFFFFFF:
        raise DeviceError(f"saved {name} {value!r} is not a u32")
    return value
