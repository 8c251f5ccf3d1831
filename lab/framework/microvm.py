"""One guest VM under test, driven through a back-end (QEMU or kata-vmm), its serial console captured."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, Protocol

from framework.assets import REPO, GuestAssets

DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1"


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


class KataVmmBackend:
    """Our VMM: `kata-vmm run` (packages/kata-vmm). The seam for comparing it with QEMU on one config."""

    name = "kata-vmm"

    def __init__(self, executable: Path | None = None) -> None:
        found = shutil.which("kata-vmm")
        self.executable = executable or (Path(found) if found else REPO / ".venv" / "bin" / "kata-vmm")

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
        self.stderr_path = workdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._files: list[IO[bytes]] = []

    def spawn(self) -> MicroVM:
        """Start the VMM; its stdout (the serial console) goes to ``console_path``."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already spawned")
        argv = self.backend.command(self.config)
        self.workdir.mkdir(parents=True, exist_ok=True)
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
                raise MicroVMTimeout(
                    f"{self.backend.name} exited ({self.proc.returncode}) before {pattern!r}:\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                raise MicroVMTimeout(f"no {pattern!r} within {timeout:.0f} s on {self.name}:\n{self._tail()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 60) -> int:
        """The VMM's exit status once the guest powered off; MicroVMTimeout if it is still running."""
        assert self.proc is not None, "spawn() first"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise MicroVMTimeout(
                f"{self.name} still running after {timeout:.0f} s:\n{self._tail()}"
            ) from None

    def kill(self) -> None:
        """Kill the VMM (and anything it started in its session) and reap it. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for f in self._files:
            f.close()
        self._files = []


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
