"""Hot-plug latency inside the lab VM: upcall (kata-vmm) against QEMU's ACPI hot-plug (issue 17).

Run inside a ONE-vCPU lab VM (`nox -s bench`'s hotplug step)::

    lab/labvm exec --cpus 1 -- .nox/tests/bin/python lab/bench/hotplug_bench.py --runs 10 \\
        --json build/bench/hotplug.json

One VM per back-end, both with the same guest kernel, initramfs (initrd-test.img with hotplug_guest.sh and
the upcall module, loaded on both), command line, 1 vCPU (2 possible) and 512 MiB. Inside it, N cycles of:
hot-add a read-only 1 MiB disk, wait for the guest's marker that it read the disk's first sector, remove
it, wait for the marker that it is gone; then N cycles of the same with one vCPU (online; gone from sysfs).

- kata-vmm in this process (the shim's built-in mode): `hot_add_virtio` of a virtio-mmio block device
  (AddMmio) and `hot_remove_virtio` (DelMmio), `hot_add_vcpus` / `hot_remove_vcpus` (AddCpu / DelCpu), over
  upcall on the VM's own vsock device.
- QEMU q35 (``-enable-kvm``: the lab VM's nested KVM) with the qemu back-end's hot-plug topology: a
  pcie-root-port ``rp0`` on pcie.0 at slot 0x1e under ACPI PCI hot-plug (ICH9-LPC
  ``acpi-pci-hotplug-with-bridge-support=on``, q35's default since QEMU 6.1, stated anyway), the disk by
  ``blockdev-add`` + ``device_add virtio-blk-pci`` on it and ``device_del``; vCPUs with ``-smp
  1,maxcpus=2``, ``device_add`` of the slot ``query-hotpluggable-cpus`` names and ``device_del`` (ACPI CPU
  hot-plug; the guest script onlines the new CPU, as Kata's agent does on QEMU).

A sample is host time (`time.monotonic`) from just before the request to the arrival of the guest's marker
line on its serial console (kata-vmm's serial flushes at each newline; QEMU's goes through a pipe read by a
thread). Also recorded per sample: how long the request itself took (the upcall reply; the QMP answer).
Writes every sample, min/median/p90/max per series and the median ratios upcall/QEMU (issue 17's goal: at
most 0.2) as JSON; prints a table on stdout and progress on stderr. Exits 1 when a back-end failed (what it
measured is still written); a QEMU vCPU hot-plug the machine cannot do is "not measured: why", not a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAB = Path(__file__).resolve().parents[1]
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))

import trio  # noqa: E402
from framework import GuestAssets, initrd_with_files  # noqa: E402
from framework.inprocess import UPCALL_MODULE, Console, Ending, boot_with_upcall, run_cmdline  # noqa: E402

from kata_shim.hypervisor._qmp import QmpClient, QmpCommandError, QmpError  # noqa: E402
from kata_upcall import UpcallClient  # noqa: E402
from kata_vmm import (  # noqa: E402
    BlockSpec,
    MmioSlot,
    Vmm,
    hot_add_vcpus,
    hot_add_virtio,
    hot_remove_vcpus,
    hot_remove_virtio,
)

GUEST_SCRIPT = Path(__file__).with_name("hotplug_guest.sh")
PREFIX = "HPB"
KINDS = ("disk", "vcpu")
MARKER = re.compile(r"HPB (disk|cpu)([+-]) (\d+)(?: (\S+))?\s*$")
GOAL = 0.2
"""Issue 17: upcall's time to a usable device at most a fifth of QEMU's."""
MARKER_WAIT = 120.0
"""Seconds one marker may take (nested under TCG; a budget, not a measurement)."""
BOOT_WAIT = 300.0
DISK_BYTES = 1 << 20
MEMORY_MIB = 512
ROOT_PORT = "rp0"
ROOT_PORT_SLOT = 0x1E
"""Where the qemu back-end puts its first root port (kata_shim.hypervisor._qemu: the slots below 0x1f)."""
QMP_TIMEOUT = 30.0


def log(message: str) -> None:
    print(f"hotplug_bench: {message}", file=sys.stderr, flush=True)


# -- what the guest prints, and the statistics ----------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """One of hotplug_guest.sh's lines: ``kind`` disk or vcpu, ``added`` (+) or gone (-), the cycle's
    sequence number and, for a vCPU, the guest's online CPU mask."""

    kind: str
    added: bool
    seq: int
    mask: str = ""


def parse_marker(line: str) -> Marker | None:
    """The marker on a console line (None for any other line)."""
    match = MARKER.match(line.strip())
    if match is None:
        return None
    kind = "vcpu" if match.group(1) == "cpu" else "disk"
    return Marker(kind, match.group(2) == "+", int(match.group(3)), match.group(4) or "")


def marker_pattern(kind: str, added: bool, seq: int) -> str:
    """The regex `Console.wait_line` waits for: exactly that marker (a vCPU's mask after it)."""
    word = "cpu" if kind == "vcpu" else "disk"
    return rf"{PREFIX} {word}{'[+]' if added else '-'} {seq}(?: \S+)?\s*$"


def nearest_rank(values: list[float], fraction: float) -> float:
    """The ``fraction`` percentile by nearest rank (p90 of 10 samples is the 9th smallest)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def stats(values: list[float]) -> dict[str, float | int]:
    """n, min, median, p90, max of ``values`` (only n when there is none)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "p90": nearest_rank(values, 0.9),
        "max": max(values),
    }


@dataclass
class Series:
    """One kind (disk or vcpu) on one back-end: every cycle's seconds."""

    add_s: list[float] = field(default_factory=list)
    add_request_s: list[float] = field(default_factory=list)
    remove_s: list[float] = field(default_factory=list)
    remove_request_s: list[float] = field(default_factory=list)
    not_measured: str = ""

    def record(self, added: bool, usable: float, request: float) -> None:
        if added:
            self.add_s.append(usable)
            self.add_request_s.append(request)
        else:
            self.remove_s.append(usable)
            self.remove_request_s.append(request)

    def result(self) -> dict[str, Any]:
        """The JSON of this series: the samples, their statistics, or why there are none."""
        if self.not_measured and not self.add_s:
            return {"not_measured": self.not_measured}
        out: dict[str, Any] = {
            "add_s": self.add_s,
            "add_request_s": self.add_request_s,
            "remove_s": self.remove_s,
            "remove_request_s": self.remove_request_s,
            "stats": {"add": stats(self.add_s), "remove": stats(self.remove_s)},
        }
        if self.not_measured:
            out["not_measured"] = self.not_measured
        return out


def median_ratio(ours: list[float], peer: list[float]) -> float | None:
    """median(ours) / median(peer); None when either has no sample."""
    if not ours or not peer or statistics.median(peer) == 0:
        return None
    return statistics.median(ours) / statistics.median(peer)


def summarize(runs: int, backends: dict[str, dict[str, Any]], poll: float) -> dict[str, Any]:
    """The JSON: each back-end's record as measured, and the ratios upcall (kata-vmm) / QEMU of the medians
    for adding (issue 17's goal) and removing, disk and vCPU."""
    ratios: dict[str, float | None] = {}
    meets: dict[str, bool | None] = {}
    ours, peer = backends.get("kata-vmm", {}), backends.get("qemu", {})
    for kind in KINDS:
        for what in ("add", "remove"):
            ratio = median_ratio(
                ours.get(kind, {}).get(f"{what}_s", []), peer.get(kind, {}).get(f"{what}_s", [])
            )
            ratios[f"{kind}_{what}"] = ratio
        ratio = ratios[f"{kind}_add"]
        meets[kind] = None if ratio is None else ratio <= GOAL
    return {
        "runs": runs,
        "poll_s": poll,
        "goal_ratio": GOAL,
        "backends": backends,
        "ratios": ratios,
        "meets_goal": meets,
    }


def table(result: dict[str, Any]) -> str:
    """A text table of every series' statistics and the ratios."""
    rows = [f"{'back-end':<9} {'kind':<5} {'op':<7} {'n':>3} {'min':>8} {'median':>8} {'p90':>8} {'max':>8}"]
    for name, backend in result["backends"].items():
        if backend.get("error"):
            rows.append(f"{name:<9} error: {backend['error'][:200]}")
        for kind in KINDS:
            series = backend.get(kind) or {"not_measured": "not run"}
            if "stats" not in series:
                rows.append(f"{name:<9} {kind:<5} not measured: {series.get('not_measured', '?')}")
                continue
            for op in ("add", "remove"):
                st = series["stats"][op]
                if not st["n"]:
                    rows.append(f"{name:<9} {kind:<5} {op:<7}   0")
                    continue
                rows.append(
                    f"{name:<9} {kind:<5} {op:<7} {st['n']:>3} {st['min']:>8.3f} {st['median']:>8.3f}"
                    f" {st['p90']:>8.3f} {st['max']:>8.3f}"
                )
    rows.append("")
    for key, ratio in result["ratios"].items():
        shown = "not measured" if ratio is None else f"{ratio:.3f}"
        goal = ""
        if key.endswith("_add") and ratio is not None:
            goal = f" (goal <= {GOAL}: {'met' if ratio <= GOAL else 'not met'})"
        rows.append(f"upcall/QEMU median {key.replace('_', ' ')}: {shown}{goal}")
    return "\n".join(rows)


def guest_report(text: str) -> dict[str, Any]:
    """What the guest script printed after its cycles: kernel warnings since it started, dmesg lines."""
    text = text.replace("\r", "")
    oops = re.search(rf"^{PREFIX}-OOPS (\d+)", text, re.MULTILINE)
    return {
        "oops": int(oops.group(1)) if oops else None,
        "oops_lines": re.findall(rf"^{PREFIX}-OOPS-LINE (.*)$", text, re.MULTILINE),
        "dmesg": [d for d in re.findall(rf"^{PREFIX}-DMESG (.*)$", text, re.MULTILINE) if d != "end"],
    }


def describe(err: BaseException) -> str:
    """``Type: message`` of an error, of each error inside a (trio nursery's) exception group."""
    if isinstance(err, BaseExceptionGroup):
        return "; ".join(describe(e) for e in err.exceptions)
    return f"{type(err).__name__}: {err}"


# -- the cycles, the same for both back-ends ------------------------------------------------------------


Request = Callable[[], Awaitable[None]]


@dataclass
class Peer:
    """A back-end's requests per kind (disk, vcpu), and what to wait for after a removal's marker before
    the next cycle (untimed: QEMU letting the device go)."""

    add: dict[str, Request]
    remove: dict[str, Request]
    after_remove: dict[str, Request] = field(default_factory=dict)


async def _nothing() -> None:
    return None


async def run_cycles(
    name: str, peer: Peer, console: Console, vm: Ending, *, runs: int, series: dict[str, Series]
) -> None:
    """``runs`` add/remove cycles of each kind in the order hotplug_guest.sh expects (disks, then vCPUs);
    a kind already marked not measured is skipped, which ends the guest's script early (the caller stops
    the VM)."""
    for kind in KINDS:
        if series[kind].not_measured:
            continue
        for seq in range(1, runs + 1):
            seconds = []
            for added in (True, False):
                start = len(console.lines())
                t0 = time.monotonic()
                await (peer.add if added else peer.remove)[kind]()
                answered = time.monotonic()
                pattern = marker_pattern(kind, added, seq)
                _, at, _ = await trio.to_thread.run_sync(console.wait_line, pattern, vm, MARKER_WAIT, start)
                series[kind].record(added, at - t0, answered - t0)
                seconds.append(at - t0)
            await peer.after_remove.get(kind, _nothing)()
            log(
                f"{name}: {kind} {seq}/{runs}: usable after {seconds[0]:.3f} s, gone after {seconds[1]:.3f} s"
            )


def guest_files(assets: GuestAssets) -> dict[str, bytes | str]:
    """The initramfs additions of both back-ends (the upcall module too: one initramfs for both)."""
    return {
        "/lab/run.sh": GUEST_SCRIPT.read_text(),
        f"/lab/{UPCALL_MODULE}": assets.upcall_module.read_bytes(),
    }


def guest_args(runs: int, poll: float) -> str:
    """hotplug_guest.sh's settings on the kernel command line."""
    return f"hpb.runs={runs} hpb.poll={poll:g}"


def guest_cmdline(runs: int, poll: float) -> str:
    """The whole kernel command line, the same on both back-ends (`boot_in_process` builds kata-vmm's)."""
    return run_cmdline(guest_args(runs, poll))


# -- kata-vmm -------------------------------------------------------------------------------------------


def measure_kata_vmm(
    assets: GuestAssets, workdir: Path, disk: Path, runs: int, poll: float
) -> dict[str, Any]:
    """kata-vmm in process, hot-plug over upcall (the module loaded by the guest script)."""
    series = {kind: Series() for kind in KINDS}
    record: dict[str, Any] = {
        "how": "kata-vmm in process; virtio-mmio block and vCPUs hot-plugged over upcall (kata_upcall_srv)",
        "error": None,
    }

    async def body(vmm: Vmm, console: Console, upcall: UpcallClient) -> None:
        slot: list[MmioSlot] = []

        async def add_disk() -> None:
            slot.append(await hot_add_virtio(vmm, BlockSpec(disk, read_only=True).build(), upcall))

        async def remove_disk() -> None:
            await hot_remove_virtio(vmm, slot.pop(), upcall)

        async def add_vcpu() -> None:
            added = await hot_add_vcpus(vmm, 1, upcall)
            if added != (1,):
                raise RuntimeError(f"hot_add_vcpus added APIC ids {added}, not (1,)")

        async def remove_vcpu() -> None:
            await hot_remove_vcpus(vmm, 1, upcall)

        log("kata-vmm: guest ready")
        peer = Peer({"disk": add_disk, "vcpu": add_vcpu}, {"disk": remove_disk, "vcpu": remove_vcpu})
        await run_cycles("kata-vmm", peer, console, vmm, runs=runs, series=series)

    workdir.mkdir(parents=True, exist_ok=True)
    log("kata-vmm: booting")
    try:
        text = boot_with_upcall(
            assets, workdir, guest_files(assets), PREFIX, body,
            cmdline=guest_args(runs, poll), max_vcpus=2, print_tail=False,
        )  # fmt: skip
        record.update(guest_report(text))
    except Exception as err:  # a failed back-end is recorded; the other one still runs
        record["error"] = describe(err)[-3000:]
        log(f"kata-vmm failed: {traceback.format_exc()}")
    record.update({kind: series[kind].result() for kind in KINDS})
    return record


# -- QEMU -----------------------------------------------------------------------------------------------


def qemu_argv(kernel: Path, initrd: Path, cmdline: str, qmp: Path, accel: str = "kvm") -> list[str]:
    """q35 with one ACPI hot-plug root port, 1 vCPU of 2, the console on stdout, QMP at ``qmp``."""
    return [
        "qemu-system-x86_64", "-machine", f"q35,accel={accel}", "-cpu", "host" if accel == "kvm" else "max",
        "-smp", "1,maxcpus=2", "-m", str(MEMORY_MIB),
        "-nodefaults", "-nographic", "-no-user-config", "-no-reboot", "-serial", "stdio",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=on",
        "-device", f"pcie-root-port,id={ROOT_PORT},bus=pcie.0,chassis=1,addr={ROOT_PORT_SLOT:#x}",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
    ]  # fmt: skip


class Unavailable(Exception):
    """QEMU cannot hot-plug this kind on this machine (not measured, not a failure)."""


class QemuProcess:
    """QEMU with its serial console (stdout) read into a `Console` by a thread; an `Ending`."""

    def __init__(self, argv: list[str], console: Console, stderr: Path) -> None:
        self._stderr_path = stderr
        with open(stderr, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        out = self.proc.stdout.fileno()
        self._reader = threading.Thread(
            target=self._read, args=(out, console), name="qemu-console", daemon=True
        )
        self._reader.start()

    @staticmethod
    def _read(fd: int, console: Console) -> None:
        while chunk := os.read(fd, 65536):
            console.write(chunk)

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    @property
    def stderr(self) -> str:
        return self._stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def _free_cpu_slot(qmp: QmpClient) -> dict[str, Any] | str:
    """device_add arguments of a free CPU slot from ``query-hotpluggable-cpus``, or why there is none."""
    try:
        answer = await qmp.execute("query-hotpluggable-cpus", timeout=QMP_TIMEOUT)
    except QmpError as err:
        return f"QEMU has no vCPU hot-plug on this machine ({err})"
    for entry in answer if isinstance(answer, list) else []:
        if isinstance(entry, dict) and "qom-path" not in entry and isinstance(entry.get("props"), dict):
            ids = {k: v for k, v in entry["props"].items() if isinstance(v, int) and not isinstance(v, bool)}
            return {"driver": entry["type"], **ids}
    return f"query-hotpluggable-cpus names no free CPU slot: {str(answer)[:200]}"


def measure_qemu(
    assets: GuestAssets, workdir: Path, disk: Path, runs: int, poll: float, *, accel: str = "kvm"
) -> dict[str, Any]:
    """QEMU q35 with ACPI PCI and CPU hot-plug, driven over QMP (kata-shim's trio client)."""
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = initrd_with_files(assets.initrd_test, guest_files(assets), workdir / "initrd")
    qmp_path = workdir / "qmp.sock"
    argv = qemu_argv(assets.kernel, initrd, guest_cmdline(runs, poll), qmp_path, accel)
    series = {kind: Series() for kind in KINDS}
    record: dict[str, Any] = {
        "how": "QEMU q35: virtio-blk-pci on a pcie-root-port and vCPUs, ACPI hot-plug over QMP",
        "argv": argv,
        "error": None,
    }
    console = Console()
    log("qemu: booting")
    qemu = QemuProcess(argv, console, workdir / "qemu.stderr")
    deleted: dict[str, trio.Event] = {}

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "DEVICE_DELETED":
            device = (event.get("data") or {}).get("device")
            if isinstance(device, str):
                deleted.setdefault(device, trio.Event()).set()

    async def session() -> None:
        await trio.to_thread.run_sync(console.wait_line, f"^{PREFIX}-READY", qemu, BOOT_WAIT)
        log("qemu: guest ready")
        qmp = await QmpClient.connect(qmp_path, on_event, QMP_TIMEOUT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp.run)
            record["qemu_version"] = qmp.greeting.get("version", {}).get("qemu")
            cpu = await _free_cpu_slot(qmp)
            if isinstance(cpu, str):
                series["vcpu"].not_measured = cpu
            n = 0

            async def add_disk() -> None:
                nonlocal n
                n += 1
                node = f"hpb-drive{n}"
                await qmp.execute("blockdev-add", {
                    "driver": "raw", "node-name": node, "read-only": True,
                    "file": {"driver": "file", "filename": str(disk), "read-only": True},
                }, timeout=QMP_TIMEOUT)  # fmt: skip
                await qmp.execute(
                    "device_add",
                    {
                        "driver": "virtio-blk-pci",
                        "id": f"hpb-blk{n}",
                        "drive": node,
                        "bus": ROOT_PORT,
                        "addr": "0x0",
                    },
                    timeout=QMP_TIMEOUT,
                )

            async def remove_disk() -> None:
                await qmp.execute("device_del", {"id": f"hpb-blk{n}"}, timeout=QMP_TIMEOUT)

            async def disk_released() -> None:
                with trio.fail_after(MARKER_WAIT):
                    await deleted.setdefault(f"hpb-blk{n}", trio.Event()).wait()
                await qmp.execute("blockdev-del", {"node-name": f"hpb-drive{n}"}, timeout=QMP_TIMEOUT)

            async def add_vcpu() -> None:
                nonlocal n
                n += 1
                assert isinstance(cpu, dict)
                try:
                    await qmp.execute("device_add", {**cpu, "id": f"hpb-cpu{n}"}, timeout=QMP_TIMEOUT)
                except QmpCommandError as err:
                    raise Unavailable(f"QEMU refused the vCPU hot-add: {err}") from err

            async def remove_vcpu() -> None:
                try:
                    await qmp.execute("device_del", {"id": f"hpb-cpu{n}"}, timeout=QMP_TIMEOUT)
                except QmpCommandError as err:
                    raise Unavailable(f"QEMU refused the vCPU hot-removal: {err}") from err

            async def vcpu_released() -> None:  # QEMU 7.2 sends no DEVICE_DELETED for a CPU
                with trio.fail_after(MARKER_WAIT):
                    while True:
                        cpus = await qmp.execute("query-cpus-fast", timeout=QMP_TIMEOUT)
                        if not any(c.get("qom-path", "").endswith(f"/hpb-cpu{n}") for c in cpus):
                            return
                        await trio.sleep(0.05)

            peer = Peer(
                {"disk": add_disk, "vcpu": add_vcpu},
                {"disk": remove_disk, "vcpu": remove_vcpu},
                {"disk": disk_released, "vcpu": vcpu_released},
            )
            try:
                await run_cycles("qemu", peer, console, qemu, runs=runs, series=series)
            except Unavailable as err:
                series["vcpu"].not_measured = str(err)
            if series["vcpu"].not_measured:  # the guest still waits for vCPUs: stop it
                log(f"qemu: vCPU not measured: {series['vcpu'].not_measured}")
                await qmp.execute("quit", timeout=QMP_TIMEOUT)
            else:
                await trio.to_thread.run_sync(console.wait_line, f"^{PREFIX}-DMESG end", qemu, BOOT_WAIT)
            nursery.cancel_scope.cancel()
        await qmp.aclose()

    try:
        trio.run(session)
        if qemu.wait(timeout=120) is None:
            raise RuntimeError("QEMU did not exit after the guest's power-off")
        record.update(guest_report(console.text))
    except Exception as err:  # a failed back-end is recorded; the other one still runs
        record["error"] = describe(err)[-3000:] + f"\nQEMU stderr: {qemu.stderr[-1000:]}"
        log(f"qemu failed: {traceback.format_exc()}")
    finally:
        qemu.kill()
    record.update({kind: series[kind].result() for kind in KINDS})
    return record


# -- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="add/remove cycles per kind and back-end")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--backends", default="kata-vmm,qemu", help="comma-separated: kata-vmm, qemu")
    parser.add_argument("--poll", type=float, default=0.005, help="the guest's seconds between two looks")
    parser.add_argument(
        "--qemu-accel", default="kvm", help="QEMU's accelerator (tcg: a dry run of the QEMU half on a host)"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = set(names) - {"kata-vmm", "qemu"}
    if unknown or args.runs < 1:
        parser.error(f"unknown back-ends {sorted(unknown)}" if unknown else "--runs must be at least 1")
    if "qemu" in names and shutil.which("qemu-system-x86_64") is None:
        parser.error("qemu-system-x86_64 not found")
    assets = GuestAssets()
    started = time.monotonic()
    backends: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hpbench-") as tmp:
        workdir = Path(tmp)
        disk = workdir / "hot.img"
        disk.write_bytes(os.urandom(DISK_BYTES))
        for name in names:
            if name == "kata-vmm":
                backends[name] = measure_kata_vmm(assets, workdir / name, disk, args.runs, args.poll)
            else:
                backends[name] = measure_qemu(
                    assets, workdir / name, disk, args.runs, args.poll, accel=args.qemu_accel
                )
    result = summarize(args.runs, backends, args.poll)
    result["guest"] = {
        "kernel_release": assets.kernel_release,
        "cmdline": guest_cmdline(args.runs, args.poll),
    }
    result["total_s"] = time.monotonic() - started
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    failed = [name for name, backend in backends.items() if backend.get("error")]
    for name in failed:
        log(f"{name} failed: {backends[name]['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
