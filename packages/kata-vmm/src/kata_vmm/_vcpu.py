"""vCPU threads: one named OS thread per vCPU running KVM_RUN and dispatching exits to the buses.

Each thread moves through an explicit state machine::

    CREATED --start--> RUNNING <--pause/resume--> PAUSED
                          \\-----------stop / guest exit-----------> EXITED

A thread blocked in KVM_RUN is pulled out the way Firecracker does it: set
``kvm_run.immediate_exit`` (so a KVM_RUN about to start returns at once) and
send the thread a signal whose handler does nothing (so a KVM_RUN in progress
returns EINTR).
"""

from __future__ import annotations

import contextlib
import enum
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kata_vmm._bindings import kvm as k
from kata_vmm._bus import Bus
from kata_vmm._errors import KvmError, VmmError
from kata_vmm._kvm import Vcpu
from kata_vmm._sys import NamedThread

KICK_SIGNAL = signal.SIGRTMIN + 2


def install_kick_handler() -> None:
    """Install the no-op handler for `KICK_SIGNAL` (must run on the main thread once, before vCPUs start)."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        if threading.current_thread() is not threading.main_thread():
            raise VmmError(
                "the vCPU kick signal handler must be installed from the main thread: "
                "call kata_vmm.install_kick_handler() there first"
            )
        signal.signal(KICK_SIGNAL, _ignore_kick)


def _ignore_kick(signum: int, frame: object) -> None:
    """Interrupting KVM_RUN is the whole point; nothing to do here."""


# Installed at import when possible, so a VMM may later be driven from any thread.
if threading.current_thread() is threading.main_thread():
    install_kick_handler()


class VcpuState(enum.Enum):
    """Lifecycle of a vCPU thread."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"


class ExitKind(enum.Enum):
    """Why the guest stopped."""

    POWER_OFF = "power-off"
    RESET = "reset"
    TRIPLE_FAULT = "triple-fault"
    CRASH = "crash"
    INTERNAL_ERROR = "internal-error"
    FAIL_ENTRY = "fail-entry"
    STOPPED = "stopped"  # by the host (stop(), timeout)


@dataclass(frozen=True)
class GuestExit:
    """The event that ended the guest."""

    kind: ExitKind
    vcpu: int | None
    detail: str = ""

    @property
    def clean(self) -> bool:
        """True for an orderly stop: the guest powered off or rebooted, or the host stopped it."""
        return self.kind in (ExitKind.POWER_OFF, ExitKind.RESET, ExitKind.STOPPED)


@dataclass
class VcpuStatistics:
    """Exit counts by reason and time spent handling exits in userspace."""

    exits: dict[str, int] = field(default_factory=dict)
    exit_ns: dict[str, int] = field(default_factory=dict)
    io_ports: dict[int, int] = field(default_factory=dict)
    run_ns: int = 0  # time inside KVM_RUN (guest time plus in-kernel exits)


class VcpuThread:
    """Runs one vCPU on its own OS thread (``kata-vcpu-N``)."""

    def __init__(
        self,
        vcpu: Vcpu,
        pio: Bus,
        mmio: Bus,
        on_guest_exit: Callable[[GuestExit], None],
    ) -> None:
        self.vcpu = vcpu
        self.id = vcpu.id
        self._pio = pio
        self._mmio = mmio
        self._on_guest_exit = on_guest_exit
        self._cond = threading.Condition()
        self._state = VcpuState.CREATED
        self._requested = VcpuState.RUNNING
        self._thread = NamedThread(self._main, name=f"kata-vcpu-{vcpu.id}")
        self.stats = VcpuStatistics()
        self.error: BaseException | None = None
        self._exit_pending = False  # the last exit was I/O or MMIO: KVM completes it on the next KVM_RUN

    @property
    def state(self) -> VcpuState:
        """Current state (as last acknowledged by the thread)."""
        return self._state

    @property
    def thread(self) -> threading.Thread:
        """The OS thread."""
        return self._thread

    def start(self, *, paused: bool = False) -> None:
        """Start the thread, running (or paused until `resume`)."""
        self._requested = VcpuState.PAUSED if paused else VcpuState.RUNNING
        self._thread.start()

    def _set_state(self, state: VcpuState) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()

    def _kick(self) -> None:
        self.vcpu.run_page.immediate_exit = 1
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            with contextlib.suppress(OSError):  # the thread is exiting
                signal.pthread_kill(ident, KICK_SIGNAL)

    def pause(self, timeout: float | None = 5.0) -> None:
        """Stop running guest code; returns once the thread is paused (or has exited)."""
        with self._cond:
            if self._state is VcpuState.EXITED:
                return
            self._requested = VcpuState.PAUSED
        self._kick()
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._state in (VcpuState.PAUSED, VcpuState.EXITED), timeout=timeout
            ):
                raise VmmError(f"vCPU {self.id} did not pause within {timeout} s")

    def resume(self) -> None:
        """Continue after `pause`."""
        with self._cond:
            if self._state is VcpuState.EXITED:
                return
            self._requested = VcpuState.RUNNING
            self._cond.notify_all()

    def stop(self) -> None:
        """Ask the thread to exit (does not wait)."""
        with self._cond:
            self._requested = VcpuState.EXITED
            self._cond.notify_all()
        self._kick()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end, kicking it again if it is slow to notice."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive():
            self._thread.join(0.1)
            if self._thread.is_alive():
                if self._requested is VcpuState.EXITED:
                    self._kick()
                if deadline is not None and time.monotonic() > deadline:
                    raise VmmError(f"vCPU {self.id} thread did not exit")

    # --- the thread -----------------------------------------------------------------------------
    def _wait_until_runnable(self) -> bool:
        with self._cond:
            if self._requested is VcpuState.PAUSED and self._exit_pending:
                # KVM retires an I/O or MMIO instruction only on the next KVM_RUN (Documentation/virt/kvm/
                # api.rst, immediate_exit): one more KVM_RUN with immediate_exit set completes it and
                # returns EINTR without running the guest, so the state a snapshot reads is consistent.
                # (A string instruction may come back with its next exit instead: handled as usual, then
                # here again.)
                self.vcpu.run_page.immediate_exit = 1
                return True
            while self._requested is VcpuState.PAUSED:
                if self._state is not VcpuState.PAUSED:
                    self._state = VcpuState.PAUSED
                    self._cond.notify_all()
                self._cond.wait()
            if self._requested is VcpuState.EXITED:
                return False
            if self._state is not VcpuState.RUNNING:
                self._state = VcpuState.RUNNING
                self._cond.notify_all()
            return True

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as err:
            self.error = err
            self._on_guest_exit(GuestExit(ExitKind.CRASH, self.id, f"vCPU {self.id} failed: {err}"))
        finally:
            self._set_state(VcpuState.EXITED)

    def _loop(self) -> None:
        vcpu = self.vcpu
        run = vcpu.run_page
        view = vcpu.run_page_view
        pio, mmio = self._pio, self._mmio
        stats = self.stats
        exits, exit_ns, ports = stats.exits, stats.exit_ns, stats.io_ports
        names = k.EXIT_REASON_NAMES
        perf = time.perf_counter_ns
        while self._wait_until_runnable():
            t0 = perf()
            reason = vcpu.run()
            t1 = perf()
            stats.run_ns += t1 - t0
            name = names.get(reason, str(reason))
            if reason == k.KVM_EXIT_IO:
                self._exit_pending = True
                io = run.io
                port, size, count, offset = io.port, io.size, io.count, io.data_offset
                ports[port] = ports.get(port, 0) + 1
                if io.direction == k.KVM_EXIT_IO_OUT:
                    for i in range(count):
                        start = offset + i * size
                        pio.write(port, bytes(view[start : start + size]))
                else:
                    for i in range(count):
                        start = offset + i * size
                        view[start : start + size] = pio.read(port, size)
            elif reason == k.KVM_EXIT_MMIO:
                self._exit_pending = True
                m = run.mmio
                if m.is_write:
                    mmio.write(m.phys_addr, bytes(m.data[: m.len]))
                else:
                    data = mmio.read(m.phys_addr, m.len)
                    ctypes_memmove(m, data)
            elif reason == k.KVM_EXIT_INTR:
                run.immediate_exit = 0
                self._exit_pending = False
            elif reason == k.KVM_EXIT_HLT:
                pass  # only without an in-kernel LAPIC: the tiny test guests end this way
            elif not self._guest_stopped(reason):
                raise KvmError("KVM_RUN", 0, f"unhandled exit reason {name} ({reason})")
            exits[name] = exits.get(name, 0) + 1
            exit_ns[name] = exit_ns.get(name, 0) + perf() - t1

    def _guest_stopped(self, reason: int) -> bool:
        """Report a guest-ending exit; False for exits this VMM does not handle."""
        run = self.vcpu.run_page
        if reason == k.KVM_EXIT_SHUTDOWN:
            event = GuestExit(ExitKind.TRIPLE_FAULT, self.id, "guest triple fault (KVM_EXIT_SHUTDOWN)")
        elif reason == k.KVM_EXIT_SYSTEM_EVENT:
            kind = {
                k.KVM_SYSTEM_EVENT_SHUTDOWN: ExitKind.POWER_OFF,
                k.KVM_SYSTEM_EVENT_RESET: ExitKind.RESET,
            }.get(run.system_event.type, ExitKind.CRASH)
            event = GuestExit(kind, self.id, f"system event {run.system_event.type}")
        elif reason == k.KVM_EXIT_INTERNAL_ERROR:
            suberror = run.internal.suberror
            event = GuestExit(ExitKind.INTERNAL_ERROR, self.id, f"KVM internal error, suberror {suberror}")
        elif reason == k.KVM_EXIT_FAIL_ENTRY:
            code = run.fail_entry.hardware_entry_failure_reason
            event = GuestExit(ExitKind.FAIL_ENTRY, self.id, f"VM entry failed, hardware reason {code:#x}")
        else:
            return False
        with self._cond:
            self._requested = VcpuState.EXITED
        self._on_guest_exit(event)
        return True


def ctypes_memmove(mmio: k._kvm_run_mmio, data: bytes) -> None:
    """Copy an MMIO read result into ``kvm_run.mmio.data``."""
    for i, b in enumerate(data[:8]):
        mmio.data[i] = b
