"""One guest VM under test, driven through a back-end (QEMU or kata-vmm), its serial console captured."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, Protocol

from framework.assets import GuestAssets, venv_bin

DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1"


EARLY_RESET_RETRIES = 1
"""How often `MicroVM.wait_for_console` boots a QEMU guest again that reset before its kernel printed."""


FIRMWARE_HANDOVER = re.compile(r"Booting from ROM\.*\s*\Z")
"""SeaBIOS's last words before it jumps to the kernel QEMU loaded (its dots may not all reach the console)."""


class LabPlatformWarning(UserWarning):
    """The lab's emulated platform misbehaved (not the code under test); the test went on."""


class MicroVMTimeout(AssertionError):
    """A guest did not print what a test waited for in time (or exited first); carries the console tail."""


@dataclass
class GuestConfig:
    """What to boot: the same config means the same guest on every back-end."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    vcpus: int = 1
    memory_mib: int = 512
    # read-only raw disks, attached as virtio-blk in order (/dev/vda, /dev/vdb, ...)
    disks: list[Path] = field(default_factory=list)
    # arguments appended verbatim for one back-end: {"qemu": [...], "kata-vmm": [...]}
    extra_args: dict[str, list[str]] = field(default_factory=dict)


class Backend(Protocol):
    """Turns a GuestConfig into the argv of a VMM that prints the guest's serial console on stdout."""

    name: str

    def command(self, config: GuestConfig) -> list[str]:
        """The VMM's argv for this guest; raise ValueError for what this VMM cannot offer."""
        ...

    def monitor_args(self, path: Path, log: Path) -> list[str]:
        """Extra argv that opens a monitor socket at ``path`` for `probe` and logs the CPU state at each
        reset to ``log`` ([] when the VMM has neither)."""
        ...

    def probe(self, path: Path) -> str:
        """What the VMM says about its guest through the monitor at ``path`` ("" when it has none)."""
        ...


class QemuBackend:
    """qemu-system-x86_64 with KVM (inside the lab VM: the nested /dev/kvm), no firmware extras, no reboot."""

    name = "qemu"
    machine = "q35"

    def command(self, config: GuestConfig) -> list[str]:
        argv = [
            "qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-M", self.machine,
            "-smp", str(config.vcpus), "-m", str(config.memory_mib), "-kernel", str(config.kernel),
            "-append", config.cmdline, "-nographic", "-nodefaults", "-no-user-config",
            "-serial", "stdio", "-no-reboot",
        ]  # fmt: skip
        if config.initrd is not None:
            argv += ["-initrd", str(config.initrd)]
        for disk in config.disks:
            argv += ["-drive", f"file={disk},if=virtio,format=raw,readonly=on"]
        return argv + config.extra_args.get(self.name, [])

    def monitor_args(self, path: Path, log: Path) -> list[str]:
        # named threads ("CPU 0/KVM") make the thread report of `MicroVM.diagnosis` readable; the CPU state
        # at each reset (the machine's first, and a guest's triple fault or reboot) goes to ``log``
        return [
            "-qmp", f"unix:{path},server=on,wait=off", "-name", "guest,debug-threads=on",
            "-d", "cpu_reset", "-D", str(log),
        ]  # fmt: skip

    def probe(self, path: Path) -> str:
        """The run state and vCPU 0's registers, sampled twice a second apart: a guest that spins (RIP
        moves), one halted or stuck on one instruction, and a paused or crashed VM look different."""
        try:
            with QmpClient(path) as qmp:
                status = qmp.execute("query-status")
                first = _registers(qmp.hmp("info registers"))
                time.sleep(1)
                second = _registers(qmp.hmp("info registers"))
        except (OSError, ValueError) as err:
            return f"qemu monitor: unavailable ({err})"
        moved = "moved" if first != second else "did not move"
        regs = " ".join(f"{k}={v}" for k, v in second.items())
        return f"qemu: status {status.get('status', '?')}; vCPU 0 {regs}; registers {moved} in 1 s"


class KataVmmBackend:
    """Our VMM: `kata-vmm run` (packages/kata-vmm). The seam for comparing it with QEMU on one config."""

    name = "kata-vmm"

    def __init__(self, executable: Path | None = None) -> None:
        found = shutil.which("kata-vmm")
        self.executable = executable or (Path(found) if found else venv_bin() / "kata-vmm")

    def command(self, config: GuestConfig) -> list[str]:
        if config.disks:
            raise ValueError("the kata-vmm back-end does not take disks on its command line yet")
        argv = [
            str(self.executable), "run", "--kernel", str(config.kernel), "--cmdline", config.cmdline,
            "--vcpus", str(config.vcpus), "--memory", str(config.memory_mib),
        ]  # fmt: skip
        if config.initrd is not None:
            argv += ["--initrd", str(config.initrd)]
        return argv + config.extra_args.get(self.name, [])

    def monitor_args(self, path: Path, log: Path) -> list[str]:
        return []

    def probe(self, path: Path) -> str:
        return ""


BACKENDS: dict[str, type[Backend]] = {"qemu": QemuBackend, "kata-vmm": KataVmmBackend}


class MicroVM:
    """A guest VMM process: spawn it, wait for console text, wait for its exit; always killed by `kill()`."""

    console_tail_lines: ClassVar[int] = 30

    def __init__(self, backend: Backend, config: GuestConfig, workdir: Path, name: str = "guest") -> None:
        self.backend = backend
        self.config = config
        self.workdir = workdir
        self.name = name
        self.console_path = workdir / f"{name}.console"
        self.monitor_path = workdir / f"{name}.monitor"
        self.reset_log_path = workdir / f"{name}.resets"
        self.early_resets = 0
        self.stderr_path = workdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._files: list[IO[bytes]] = []

    def spawn(self) -> MicroVM:
        """Start the VMM; its stdout (the serial console) goes to ``console_path``."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already spawned")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.monitor_path.unlink(missing_ok=True)
        self.reset_log_path.unlink(missing_ok=True)
        argv = self.backend.command(self.config)
        argv += self.backend.monitor_args(self.monitor_path, self.reset_log_path)
        out = open(self.console_path, "wb")  # noqa: SIM115 - closed in kill()
        err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in kill()
        self._files = [out, err]
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
        return self

    @property
    def console(self) -> str:
        """Everything the guest printed on its serial console so far (escape sequences removed)."""
        if not self.console_path.exists():
            return ""
        text = self.console_path.read_bytes().decode(errors="replace")
        return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1bc|\r", "", text)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode(errors="replace") if self.stderr_path.exists() else ""

    def _tail(self) -> str:
        lines = self.console.splitlines()[-self.console_tail_lines :]
        return "\n".join(lines) + (f"\n--- stderr ---\n{self.stderr[-2000:]}" if self.stderr else "")

    def wait_for_console(self, pattern: str, timeout: float = 120) -> float:
        """Seconds from spawn until the regex ``pattern`` appeared on the console, else MicroVMTimeout."""
        assert self.proc is not None, "spawn() first"
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if regex.search(self.console):
                return time.monotonic() - self.started_at
            if self.proc.poll() is not None:
                if regex.search(self.console):  # printed just before it exited
                    return time.monotonic() - self.started_at
                if self._reset_before_the_kernel() and self.early_resets < EARLY_RESET_RETRIES:
                    self._boot_again()
                    continue
                raise MicroVMTimeout(
                    f"{self.backend.name} exited ({self.proc.returncode}) before {pattern!r}:\n{self._tail()}"
                    f"{self._resets()}"
                )
            if time.monotonic() > deadline:
                late = f"no {pattern!r} within {timeout:.0f} s on {self.name}"
                raise MicroVMTimeout(f"{late}:\n{self.diagnosis()}\n{self._tail()}")
            time.sleep(0.05)

    def _reset_before_the_kernel(self) -> bool:
        """QEMU (-no-reboot) left with 0 while its console's last line is still the firmware's "Booting from
        ROM...": the guest reset (a triple fault) before its kernel printed a byte. Seen about once in ten
        full lab runs, on QEMU's firmware path only: the lab VM's TCG emulation of nested SVM, not the
        guest under test (which never ran)."""
        assert self.proc is not None
        return self.proc.returncode == 0 and FIRMWARE_HANDOVER.search(self.console) is not None

    def _resets(self) -> str:
        """The CPU state QEMU logged at the guest's last reset (its -d cpu_reset log), if any."""
        if not self.reset_log_path.exists():
            return ""
        text = self.reset_log_path.read_text(errors="replace")
        last = text[text.rfind("CPU Reset") :] if "CPU Reset" in text else text
        return "\n--- CPU state at the last reset ---\n" + "\n".join(last.splitlines()[:40])

    def _boot_again(self) -> None:
        """Boot the same guest once more after an early reset, loudly (a pytest warning with the CPU state
        at the reset), keeping the first attempt's console as ``<name>.console.<n>``."""
        self.early_resets += 1
        what = f"{self.name}: the guest reset before its kernel printed anything; booting it again"
        message = what + self._resets()
        warnings.warn(LabPlatformWarning(message), stacklevel=3)
        self.kill()
        self.console_path.rename(self.console_path.with_name(f"{self.console_path.name}.{self.early_resets}"))
        self.proc = None
        self.spawn()

    def wait_exit(self, timeout: float = 60) -> int:
        """The VMM's exit status once the guest powered off; MicroVMTimeout if it is still running."""
        assert self.proc is not None, "spawn() first"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise MicroVMTimeout(
                f"{self.name} still running after {timeout:.0f} s:\n{self.diagnosis()}\n{self._tail()}"
            ) from None

    def diagnosis(self) -> str:
        """Why a guest may be late: the host's load, the CPU time each VMM thread used since spawn (a vCPU
        that used little was starved or blocked, one that used all its time is running the guest), and what
        the VMM's monitor says (QEMU: run state and whether RIP moves)."""
        assert self.proc is not None, "spawn() first"
        lines = [
            f"diagnosis: {time.monotonic() - self.started_at:.0f} s since spawn; "
            f"host load {load_average()}; {os.cpu_count()} CPUs",
            f"threads of {self.backend.name} (pid {self.proc.pid}): {thread_report(self.proc.pid)}",
        ]
        if self.proc.poll() is None:
            probed = self.backend.probe(self.monitor_path)
            if probed:
                lines.append(probed)
        return "\n".join(lines)

    def kill(self) -> None:
        """Kill the VMM (and anything it started in its session) and reap it. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for f in self._files:
            f.close()
        self._files = []


def load_average() -> str:
    """/proc/loadavg's 1, 5 and 15 minute averages."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def thread_report(pid: int) -> str:
    """Each thread of ``pid``: name, state (R running, S sleeping, D uninterruptible) and CPU seconds used."""
    tick = os.sysconf("SC_CLK_TCK")
    parts = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError as err:
        return f"unreadable ({err.strerror})"
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime (stat fields 14 and 15)
        parts.append(f"{name} {fields[0]} {cpu:.1f} s")
    return ", ".join(parts)


class QmpClient:
    """A minimal QMP client (QEMU's JSON monitor protocol) over a unix socket, for diagnostics only."""

    def __init__(self, path: Path, timeout: float = 3.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buffer = b""
        try:
            self.sock.connect(str(path))
            self._read()  # the greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _read(self) -> dict[str, object]:
        while True:
            line, sep, rest = self.buffer.partition(b"\n")
            if sep:
                self.buffer = rest
                message = json.loads(line)
                if "event" not in message:
                    return message
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ValueError("monitor closed")
            self.buffer += chunk

    def execute(self, command: str, **arguments: object) -> dict[str, object]:
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise ValueError(f"{command}: {reply['error']}")
        result = reply.get("return")
        return result if isinstance(result, dict) else {"return": result}

    def hmp(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", **{"command-line": command_line})["return"])


def _registers(info: str) -> dict[str, str]:
    """The instruction pointer, flags, CR0 and the CPU's halted flag from HMP ``info registers`` output
    (RIP/RFL in long mode, EIP/EFL before it)."""
    found = {}
    for key in ("[RE]IP", "[RE]FL", "CR0", "HLT"):
        match = re.search(rf"\b({key})=(\S+)", info)
        if match:
            found[match.group(1)] = match.group(2)
    return found


class MicroVMFactory:
    """Builds MicroVMs for a test and kills every one of them at teardown."""

    def __init__(self, workdir: Path, backend: Backend, assets: GuestAssets | None = None) -> None:
        self.workdir = workdir
        self.backend = backend
        self.assets = assets or GuestAssets()
        self.vms: list[MicroVM] = []

    def build(self, config: GuestConfig | None = None, *, name: str | None = None) -> MicroVM:
        """A guest (not yet spawned); by default the test kernel with initrd-test.img, 1 vCPU, 512 MiB."""
        if config is None:
            config = GuestConfig(kernel=self.assets.kernel, initrd=self.assets.initrd_test)
        vm = MicroVM(self.backend, config, self.workdir, name or f"guest{len(self.vms)}")
        self.vms.append(vm)
        return vm

    def kill_all(self) -> None:
        for vm in self.vms:
            vm.kill()
