"""kata-vmm in the caller's own process, as the shim's dragonball back-end runs it, booting initrd-test.img
with extra files; the guest's serial console with each line's arrival time.

The lab tests of upcall hot-plug and memory (lab/tests/test_upcall_lab.py, test_memory_lab.py) and the
hot-plug bench (lab/bench/hotplug_bench.py) boot their guests through `boot_in_process` /
`boot_with_upcall`; the bench also reads its QEMU guest's console through a `Console`::

    def body(vmm: Vmm, console: Console) -> None:
        vmm.set_hotplug_memory(256)
        console.wait_for("^MEM-PLUGGED ", vmm, timeout=300)

    text = boot_in_process(assets, tmp_path, {"/lab/run.sh": script}, "MEM", body, memory_mib=512)

Imports kata_vmm, kata_upcall and trio: not re-exported by ``framework`` (whose guests are processes).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from framework.assets import GuestAssets, initrd_with_files
from framework.microvm import MicroVMTimeout
from kata_upcall import Handshake, UpcallClient, open_upcall_client
from kata_vmm import ExitKind, VmConfig, Vmm, VsockSpec, upcall_connector

UPCALL_MODULE = "kata_upcall_srv.ko"
"""The guest's upcall server as `boot_with_upcall` puts it in the initramfs: /lab/kata_upcall_srv.ko."""
TAIL = 3000
"""Console characters an error message ends with."""


def run_cmdline(extra: str = "") -> str:
    """The kernel command line of initrd-test.img running /lab/run.sh, with ``extra`` ("NAME=V ...")."""
    extra = f"{extra.strip()} " if extra.strip() else ""
    return f"console=ttyS0 quiet panic=-1 {extra}lab.run=/lab/run.sh"


class Ending(Protocol):
    """A running guest: ``wait(timeout=0)`` is None while it runs, how it ended once it has (a `Vmm`)."""

    def wait(self, timeout: float | None = None) -> object | None: ...


class Console:
    """A guest's serial console, written by the VMM's threads (or a pipe reader), read by waiters: the whole
    text, and every complete line with the `time.monotonic` at which its newline arrived."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._data = bytearray()
        self._partial = bytearray()
        self._lines: list[tuple[float, str]] = []
        self._writes = 0

    def write(self, data: bytes) -> None:
        """Append what the guest printed (any chunking; a line counts once its newline came)."""
        now = time.monotonic()
        with self._changed:
            self._data += data
            self._partial += data
            while (end := self._partial.find(b"\n")) >= 0:
                line = self._partial[:end].decode(errors="replace").rstrip("\r")
                del self._partial[: end + 1]
                self._lines.append((now, line))
            self._writes += 1
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return self._data.decode(errors="replace")

    def lines(self, start: int = 0) -> list[tuple[float, str]]:
        """The complete lines from index ``start`` on, each with its arrival time."""
        with self._changed:
            return self._lines[start:]

    def wait_for(self, pattern: str, vm: Ending, timeout: float) -> None:
        """Until the console has a line matching ``pattern``."""
        self.wait_until(
            repr(pattern), lambda: re.search(pattern, self.text, re.MULTILINE) is not None, vm, timeout
        )

    def wait_line(self, pattern: str, vm: Ending, timeout: float, start: int = 0) -> tuple[int, float, str]:
        """The first complete line at index ``start`` or later that ``pattern`` matches from its beginning:
        (its index, its arrival time, the line)."""
        regex = re.compile(pattern)
        found: list[tuple[int, float, str]] = []

        def seen() -> bool:
            for i, (at, line) in enumerate(self.lines(start), start):
                if regex.match(line):
                    found.append((i, at, line))
                    return True
            return False

        self.wait_until(repr(pattern), seen, vm, timeout)
        return found[0]

    def wait_until(self, what: str, done: Callable[[], bool], vm: Ending, timeout: float) -> None:
        """Until ``done()``, checked after each write (and every 0.2 s); `MicroVMTimeout` with the console's
        end if the guest ends first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                writes = self._writes
            if done():
                return
            ended = vm.wait(timeout=0)
            if ended is not None:
                raise MicroVMTimeout(f"guest ended ({ended}) before {what}:\n{self.text[-TAIL:]}")
            if time.monotonic() >= deadline:
                raise MicroVMTimeout(f"no {what} within {timeout} s:\n{self.text[-TAIL:]}")
            with self._changed:
                if self._writes == writes:  # nothing new since done() looked
                    self._changed.wait(0.2)


def boot_in_process(
    guest_assets: GuestAssets,
    workdir: Path,
    files: dict[str, bytes | str],
    prefix: str,
    body: Callable[[Vmm, Console], None],
    *,
    cmdline: str = "",
    print_tail: bool = True,
    **config: Any,
) -> str:
    """kata-vmm in process booting initrd-test.img with ``files`` (``/lab/run.sh`` runs) and the VmConfig
    fields ``config``: once the guest prints ``{prefix}-READY``, ``body(vmm, console)``; then the guest's
    ``{prefix}-DMESG`` lines and its power-off (`MicroVMTimeout` or AssertionError otherwise). Returns the
    console (its end printed to stdout unless ``print_tail`` is false)."""
    initrd = initrd_with_files(guest_assets.initrd_test, files, workdir / "initrd")
    console = Console()
    vm_config = VmConfig(
        kernel=guest_assets.kernel,
        initrd=initrd,
        cmdline=run_cmdline(cmdline),
        console_output=console.write,
        **config,
    )
    vmm = Vmm()
    try:
        vmm.configure(vm_config)
        vmm.start()
        console.wait_for(f"^{prefix}-READY", vmm, timeout=300)
        body(vmm, console)
        console.wait_for(f"^{prefix}-DMESG|^lab-init:", vmm, timeout=300)
        ended = vmm.wait(timeout=120)
        assert ended is not None and ended.kind is ExitKind.POWER_OFF, (ended, console.text[-TAIL:])
    finally:
        vmm.close()
    text = console.text
    if print_tail:
        print(text[-4000:])
    return text


def boot_with_upcall(
    guest_assets: GuestAssets,
    workdir: Path,
    files: dict[str, bytes | str],
    prefix: str,
    body: Callable[[Vmm, Console, UpcallClient], Awaitable[None]],
    *,
    cmdline: str = "",
    max_vcpus: int = 0,
    print_tail: bool = True,
) -> str:
    """`boot_in_process` with the upcall module at /lab/kata_upcall_srv.ko (``files``' script loads it),
    512 MiB and one vsock device: ``await body(vmm, console, upcall)`` under trio with an upcall client
    over the VM's own vsock device (built-in mode)."""

    def session(vmm: Vmm, console: Console) -> None:
        async def run() -> None:
            connector = upcall_connector(vmm)
            async with open_upcall_client(connector, handshake=Handshake.ACCEPT_LINE) as upcall:
                await body(vmm, console, upcall)

        trio.run(run)

    files = {**files, f"/lab/{UPCALL_MODULE}": guest_assets.upcall_module.read_bytes()}
    return boot_in_process(
        guest_assets, workdir, files, prefix, session, cmdline=cmdline, print_tail=print_tail,
        memory_mib=512, max_vcpus=max_vcpus, devices=[VsockSpec(workdir / "v.sock")],
    )  # fmt: skip
