"""``kata-vmm``: boot a kernel from the command line.

    kata-vmm run --kernel K [--initrd I] [--cmdline S] [--vcpus N] [--memory MiB] [--timeout S] [--stats]
                 [--vsock UDS] [--block PATH[,ro]]... [--net TAP[,mac=M]]... [--fs TAG=DIR]... [--rng]
                 [--snapshot-on TEXT --snapshot-dir DIR]
    kata-vmm restore DIR [--timeout S] [--stats] [device flags, replacing the saved ones]

``--snapshot-on``: once the console has printed TEXT, the VM is paused, written to DIR and stopped (exit 0);
``restore`` runs a VM from such a directory as ``run`` runs a fresh one.

The guest's serial console goes to stdout and stdin is typed into it.  Exit
status: 0 when the guest powers off or reboots, 1 when it crashes (triple
fault, KVM error), 2 for bad input, 124 on timeout.  Errors are one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

from kata_vmm.__about__ import __version__
from kata_vmm._errors import ConfigError, KernelLoadError, SnapshotError, VmmError
from kata_vmm._machine import DEFAULT_CMDLINE, VmConfig
from kata_vmm._specs import BlockSpec, DeviceSpec, FsSpec, NetSpec, RngSpec, VsockSpec
from kata_vmm._vcpu import GuestExit
from kata_vmm._vmm import Vmm, snapshot_config

EXIT_OK = 0
EXIT_GUEST_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


# --- device flags -> specs ---------------------------------------------------------------------------------
def _head_and_options(flag: str, text: str, usage: str) -> tuple[str, list[str]]:
    """``HEAD[,opt]...`` -> (HEAD, [opt, ...]); an empty HEAD is a `ConfigError` naming ``usage``."""
    head, _, opts = text.partition(",")
    if not head:
        raise ConfigError(f"{flag} {text!r}: expected {usage}")
    return head, [opt for opt in opts.split(",") if opt]


def parse_block(text: str) -> BlockSpec:
    """``PATH[,ro]`` -> `BlockSpec`."""
    path, opts = _head_and_options("--block", text, "PATH[,ro]")
    read_only = False
    for opt in opts:
        if opt in ("ro", "readonly"):
            read_only = True
        elif opt != "rw":
            raise ConfigError(f"--block {text!r}: unknown option {opt!r} (expected ro)")
    return BlockSpec(Path(path), read_only)


def parse_net(text: str) -> NetSpec:
    """``TAP[,mac=aa:bb:cc:dd:ee:ff]`` -> `NetSpec`."""
    tap, opts = _head_and_options("--net", text, "TAP[,mac=..]")
    mac = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key != "mac" or not value:
            raise ConfigError(f"--net {text!r}: unknown option {opt!r} (expected mac=..)")
        parts = value.split(":")
        if len(parts) != 6 or not all(len(p) == 2 for p in parts):
            raise ConfigError(f"--net {text!r}: bad MAC {value!r}")
        try:
            bytes.fromhex("".join(parts))
        except ValueError:
            raise ConfigError(f"--net {text!r}: bad MAC {value!r}") from None
        mac = value
    return NetSpec(tap, mac)


def parse_fs(text: str) -> FsSpec:
    """``TAG=DIR`` -> `FsSpec`."""
    tag, sep, directory = text.partition("=")
    if not sep or not tag or not directory:
        raise ConfigError(f"--fs {text!r}: expected TAG=DIR")
    return FsSpec(tag, Path(directory))


def parse_vsock(text: str) -> VsockSpec:
    """``UDS`` -> `VsockSpec`."""
    if not text:
        raise ConfigError("--vsock needs a unix socket path")
    return VsockSpec(Path(text))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kata-vmm", description="A pure-Python KVM VMM.")
    parser.add_argument("--version", action="version", version=f"kata-vmm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot a kernel; the serial console is this terminal")
    run.add_argument("--kernel", required=True, type=Path, help="bzImage or ELF vmlinux (PVH)")
    run.add_argument("--initrd", type=Path, help="initramfs image")
    run.add_argument(
        "--cmdline", default=DEFAULT_CMDLINE, help=f"kernel command line (default: {DEFAULT_CMDLINE!r})"
    )
    run.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--memory", type=int, default=128, metavar="MiB", help="guest RAM in MiB (default 128)")
    run.add_argument("--timeout", type=float, help="stop the guest and fail after this many seconds")
    run.add_argument(
        "--stats", action="store_true", help="print exit statistics as JSON on stderr at the end"
    )
    dev = run.add_argument_group("virtio devices (each on a virtio-mmio slot the DSDT describes)")
    dev.add_argument("--vsock", metavar="UDS", help="hybrid vsock; host clients connect to UDS")
    dev.add_argument(
        "--block", action="append", default=[], metavar="PATH[,ro]", help="raw image as virtio-blk"
    )
    dev.add_argument(
        "--net", action="append", default=[], metavar="TAP[,mac=M]", help="virtio-net on a tap device"
    )
    dev.add_argument("--fs", action="append", default=[], metavar="TAG=DIR", help="share DIR by virtio-fs")
    dev.add_argument("--rng", action="store_true", help="virtio-rng")
    snap = run.add_argument_group("snapshot")
    snap.add_argument("--snapshot-on", metavar="TEXT", help="once the console printed TEXT: snapshot, stop")
    snap.add_argument("--snapshot-dir", type=Path, metavar="DIR", help="where --snapshot-on writes (new)")
    restore = sub.add_parser("restore", help="run a VM from a snapshot directory (run --snapshot-on)")
    restore.add_argument("snapshot", type=Path, metavar="DIR")
    restore.add_argument("--timeout", type=float, help="stop the guest and fail after this many seconds")
    restore.add_argument("--stats", action="store_true", help="print exit statistics as JSON on stderr")
    rdev = restore.add_argument_group(
        "virtio devices (default: the saved ones; else the saved kinds in order)"
    )
    rdev.add_argument("--vsock", metavar="UDS")
    rdev.add_argument("--block", action="append", default=[], metavar="PATH[,ro]")
    rdev.add_argument("--net", action="append", default=[], metavar="TAP[,mac=M]")
    rdev.add_argument("--fs", action="append", default=[], metavar="TAG=DIR")
    rdev.add_argument("--rng", action="store_true")
    extract = sub.add_parser(
        "extract-vmlinux", help="write the uncompressed ELF vmlinux of a bzImage (boots faster, through PVH)"
    )
    extract.add_argument("bzimage", type=Path)
    extract.add_argument("output", type=Path)
    return parser


def _console_writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                continue
            except OSError:
                return  # stdout closed: keep the guest running, drop its output
            view = view[n:]

    return write


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """Pass keystrokes straight to the guest when stdin is a terminal (restored on exit)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"kata-vmm: {message}\n")
    sys.stderr.flush()
    return code


def device_specs(args: argparse.Namespace) -> list[DeviceSpec]:
    """The virtio devices named on the command line (vsock, blocks, nets, filesystems, rng; `ConfigError`)."""
    specs: list[DeviceSpec] = []
    if args.vsock:
        specs.append(parse_vsock(args.vsock))
    specs += [parse_block(b) for b in args.block]
    specs += [parse_net(n) for n in args.net]
    specs += [parse_fs(f) for f in args.fs]
    if args.rng:
        specs.append(RngSpec())
    return specs


class _MarkerWatch:
    """Passes console output on and sets `seen` once ``marker`` went by (also split across writes)."""

    def __init__(self, sink: Callable[[bytes], None], marker: bytes) -> None:
        self._sink = sink
        self._marker = marker
        self._tail = b""
        self.seen = threading.Event()

    def __call__(self, data: bytes) -> None:
        self._sink(data)
        if not self.seen.is_set():
            window = self._tail + data
            if self._marker in window:
                self.seen.set()
            self._tail = window[-len(self._marker) :]


def run(args: argparse.Namespace, *, startup_seconds: float = 0.0) -> int:
    """The ``run`` and ``restore`` commands."""
    restoring = args.command == "restore"
    try:
        devices = device_specs(args)
        if not restoring and bool(args.snapshot_on) != bool(args.snapshot_dir):
            raise ConfigError("--snapshot-on and --snapshot-dir go together")
    except ConfigError as err:
        return _fail(f"error: {err}", EXIT_BAD_INPUT)
    stdin_fd = sys.stdin.fileno() if sys.stdin is not None else None
    output: Callable[[bytes], None] = _console_writer(sys.stdout.fileno())
    watch = None
    if not restoring and args.snapshot_on:
        watch = _MarkerWatch(output, args.snapshot_on.encode())
        output = watch
    vmm = Vmm()
    interrupted = False

    def on_sigterm(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        vmm.stop_nowait()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with _raw_terminal(stdin_fd) if stdin_fd is not None else contextlib.nullcontext():
            if restoring:
                saved = snapshot_config(args.snapshot)
                config = dataclasses.replace(
                    saved,
                    console_output=output,
                    console_input=stdin_fd,
                    devices=devices or saved.devices,
                )
                vmm.close()  # the empty one made above
                vmm = Vmm.restore(args.snapshot, config)
                vmm.resume()
            else:
                vmm.configure(
                    VmConfig(
                        kernel=args.kernel,
                        initrd=args.initrd,
                        cmdline=args.cmdline,
                        vcpus=args.vcpus,
                        memory_mib=args.memory,
                        console_output=output,
                        console_input=stdin_fd,
                        devices=devices,
                    )
                )
                vmm.start()
            try:
                status = _wait(vmm, args.timeout, watch)
                if status is None and watch is not None and watch.seen.is_set():
                    vmm.pause()
                    vmm.snapshot(args.snapshot_dir)
                    vmm.stop()
                    sys.stderr.write(f"kata-vmm: snapshot written to {args.snapshot_dir}\n")
                    return EXIT_OK
            except KeyboardInterrupt:
                vmm.stop()
                return _fail("interrupted", EXIT_INTERRUPTED)
            if status is None:
                vmm.stop()
                return _fail(f"timeout: the guest did not power off within {args.timeout:g} s", EXIT_TIMEOUT)
            if interrupted:
                return _fail("terminated", EXIT_INTERRUPTED)
            if not status.clean:
                where = f" on vCPU {status.vcpu}" if status.vcpu is not None else ""
                return _fail(f"guest stopped: {status.kind.value}{where}: {status.detail}", EXIT_GUEST_ERROR)
            return EXIT_OK
    except (ConfigError, KernelLoadError, SnapshotError) as err:
        return _fail(f"error: {err}", EXIT_BAD_INPUT)
    except VmmError as err:
        return _fail(f"error: {err}", EXIT_GUEST_ERROR)
    except Exception as err:  # the process edge: one line, never a traceback
        return _fail(f"internal error: {type(err).__name__}: {err}", EXIT_GUEST_ERROR)
    finally:
        if args.stats and vmm.state.value not in ("new",):
            stats = vmm.statistics()
            stats.setup_seconds["python_startup"] = startup_seconds
            sys.stderr.write(json.dumps(stats.__dict__, default=str) + "\n")
        vmm.close()
        signal.signal(signal.SIGTERM, previous)


def _wait(vmm: Vmm, timeout: float | None, watch: _MarkerWatch | None) -> GuestExit | None:
    """`Vmm.wait`, or, with a marker to watch, until the guest stops or printed it (then None)."""
    if watch is None:
        return vmm.wait(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = vmm.wait(0.05)
        if status is not None or watch.seen.is_set():
            return status
        if deadline is not None and time.monotonic() > deadline:
            return None


def _process_age() -> float:
    """Seconds since this process was created (interpreter start-up and imports included)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kata-vmm`` script."""
    startup = _process_age()
    args = _parser().parse_args(argv)
    if args.command in ("run", "restore"):
        return run(args, startup_seconds=startup)
    if args.command == "extract-vmlinux":
        from kata_vmm._vmlinux import write_vmlinux

        try:
            write_vmlinux(args.bzimage, args.output)
        except KernelLoadError as err:
            return _fail(f"error: {err}", EXIT_BAD_INPUT)
        return EXIT_OK
    return EXIT_BAD_INPUT  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
