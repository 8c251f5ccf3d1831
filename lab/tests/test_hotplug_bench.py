"""lab/bench/hotplug_bench.py's parts that need no guest (host only): the markers hotplug_guest.sh prints
and how the bench finds them on a console with their arrival times, the statistics and ratios it writes,
and the guest script itself, run by the initramfs's own busybox against a fake sysfs and /dev."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest
import trio

LAB = Path(__file__).resolve().parents[1]
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))

from framework.inprocess import Console, run_cmdline  # noqa: E402
from framework.microvm import MicroVMTimeout  # noqa: E402
from images.build import BUSYBOX  # noqa: E402


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kata_lab_bench_hotplug", LAB / "bench" / "hotplug_bench.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hb = _load()
LINE_BUDGET = 60.0


class _Running:
    """An `Ending` that runs until ``end()``."""

    def __init__(self) -> None:
        self.ended: str | None = None

    def wait(self, timeout: float | None = None) -> str | None:
        return self.ended


# -- markers and the console ------------------------------------------------------------------------------


def test_markers_are_parsed_with_kind_direction_sequence_and_mask() -> None:
    assert hb.parse_marker("HPB disk+ 3") == hb.Marker("disk", True, 3)
    assert hb.parse_marker("HPB disk- 10\r") == hb.Marker("disk", False, 10)
    assert hb.parse_marker("HPB cpu+ 2 0-1") == hb.Marker("vcpu", True, 2, "0-1")
    assert hb.parse_marker("HPB cpu- 2 0") == hb.Marker("vcpu", False, 2, "0")
    for line in ("HPB-READY runs=10 poll=0.005", "HPB disk* 1", "HPB disk+", "HPB disk+ x", "xHPB disk+ 1",
                 "[    2.0] virtio_blk virtio0: [vda]", "HPB cpu+ 1 0-1 extra"):  # fmt: skip
        assert hb.parse_marker(line) is None, line


def test_the_wait_pattern_matches_only_its_own_cycle() -> None:
    disk1 = re.compile(hb.marker_pattern("disk", True, 1))
    assert disk1.match("HPB disk+ 1") and disk1.match("HPB disk+ 1\r")
    assert not disk1.match("HPB disk+ 11") and not disk1.match("HPB disk- 1")
    cpu_gone = re.compile(hb.marker_pattern("vcpu", False, 4))
    assert cpu_gone.match("HPB cpu- 4 0") and not cpu_gone.match("HPB cpu+ 4 0-1")
    for kind in hb.KINDS:
        for added in (True, False):
            line = f"HPB {'cpu' if kind == 'vcpu' else 'disk'}{'+' if added else '-'} 7 0-1"
            assert re.match(hb.marker_pattern(kind, added, 7), line)
            assert hb.parse_marker(line) == hb.Marker(kind, added, 7, "0-1")


def test_console_stamps_each_line_when_its_newline_arrives() -> None:
    console = Console()
    console.write(b"HPB di")
    before = time.monotonic()
    console.write(b"sk+ 1\r\nHPB disk- 1\nHPB cp")
    after = time.monotonic()
    lines = console.lines()
    assert [line for _, line in lines] == ["HPB disk+ 1", "HPB disk- 1"]  # the partial line is not one yet
    assert all(before <= at <= after for at, _ in lines)
    assert console.text.endswith("HPB cp")
    assert console.lines(1) == lines[1:]


def test_wait_line_finds_a_line_written_later_from_its_start_index() -> None:
    console, vm = Console(), _Running()
    console.write(b"HPB disk+ 1\n")
    start = len(console.lines())

    def guest() -> None:
        time.sleep(0.3)
        console.write(b"noise\nHPB disk+ 1\n")

    writer = threading.Thread(target=guest)
    writer.start()
    t0 = time.monotonic()
    index, at, line = console.wait_line(hb.marker_pattern("disk", True, 1), vm, timeout=30, start=start)
    writer.join()
    assert (index, line) == (2, "HPB disk+ 1")  # not the earlier line before ``start``
    assert at > t0  # the later line's own arrival, not the time the waiter looked
    assert console.wait_line("^HPB disk", vm, timeout=1)[0] == 0


def test_wait_line_fails_when_the_guest_ends_or_time_runs_out() -> None:
    console, vm = Console(), _Running()
    console.write(b"booting\n")
    with pytest.raises(MicroVMTimeout, match=r"no '\^HPB-READY' within 0.3 s"):
        console.wait_line("^HPB-READY", vm, timeout=0.3)
    vm.ended = "POWER_OFF"
    with pytest.raises(MicroVMTimeout, match=r"guest ended \(POWER_OFF\).*\nbooting"):
        console.wait_line("^HPB-READY", vm, timeout=30)


# -- statistics, ratios, the JSON and the table -----------------------------------------------------------


def test_statistics_of_ten_samples_give_the_median_and_the_ninth_as_p90() -> None:
    samples = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 1.0, 0.4, 0.8, 0.6]
    st = hb.stats(samples)
    assert st == {"n": 10, "min": 0.1, "median": statistics.median(samples), "p90": 0.9, "max": 1.0}
    assert hb.nearest_rank([3.0], 0.9) == 3.0
    assert hb.stats([]) == {"n": 0}


def _series(add: list[float], remove: list[float]) -> object:
    series = hb.Series()
    for a, r in zip(add, remove, strict=True):
        series.record(True, a, a / 2)
        series.record(False, r, r / 4)
    return series


def test_the_ratios_are_upcall_over_qemu_medians_and_a_missing_kind_is_not_measured() -> None:
    kata = {"disk": _series([0.1, 0.3, 0.2], [0.1, 0.1, 0.1]).result(),
            "vcpu": _series([0.05, 0.07], [0.2, 0.2]).result(), "error": None}  # fmt: skip
    qemu_vcpu = hb.Series(not_measured="QEMU has no vCPU hot-plug on this machine (test)")
    qemu = {
        "disk": _series([1.0, 2.0, 1.5], [0.5, 0.5, 0.5]).result(),
        "vcpu": qemu_vcpu.result(),
        "error": None,
    }
    result = hb.summarize(3, {"kata-vmm": kata, "qemu": qemu}, 0.005)
    assert result["ratios"]["disk_add"] == pytest.approx(0.2 / 1.5)
    assert result["ratios"]["disk_remove"] == pytest.approx(0.1 / 0.5)
    assert result["ratios"]["vcpu_add"] is None and result["ratios"]["vcpu_remove"] is None
    assert result["meets_goal"] == {"disk": True, "vcpu": None}
    assert kata["disk"]["add_request_s"] == [0.05, 0.15, 0.1]
    assert kata["disk"]["stats"]["add"]["median"] == 0.2
    assert qemu["vcpu"] == {"not_measured": "QEMU has no vCPU hot-plug on this machine (test)"}
    json.dumps(result)  # what --json writes
    text = hb.table(result)
    assert "qemu      vcpu  not measured: QEMU has no vCPU hot-plug on this machine (test)" in text
    assert f"upcall/QEMU median disk add: {0.2 / 1.5:.3f} (goal <= 0.2: met)" in text
    assert "upcall/QEMU median vcpu add: not measured" in text


def test_a_kind_cut_short_keeps_its_samples_and_says_why() -> None:
    series = _series([0.7], [0.08])
    series.record(True, 0.9, 0.1)
    series.not_measured = "QEMU refused the vCPU hot-removal: test"
    result = series.result()
    assert result["add_s"] == [0.7, 0.9] and result["remove_s"] == [0.08]
    assert result["not_measured"] == "QEMU refused the vCPU hot-removal: test"


def test_guest_report_reads_the_warnings_and_dmesg_lines() -> None:
    text = "HPB cpu- 1 0\r\nHPB-OOPS-LINE [ 3.0] WARNING: x\r\nHPB-OOPS 1\r\n"
    text += "HPB-DMESG [ 2.0] acpiphp: Slot [0]\r\nHPB-DMESG end\r\n"
    assert hb.guest_report(text) == {
        "oops": 1, "oops_lines": ["[ 3.0] WARNING: x"], "dmesg": ["[ 2.0] acpiphp: Slot [0]"],
    }  # fmt: skip
    assert hb.guest_report("lab-init: /lab/run.sh exited 1\n")["oops"] is None


def test_both_guests_get_one_command_line_and_qemu_acpi_hot_plug(tmp_path: Path) -> None:
    cmdline = hb.guest_cmdline(10, 0.005)
    assert cmdline == run_cmdline("hpb.runs=10 hpb.poll=0.005")
    assert cmdline == "console=ttyS0 quiet panic=-1 hpb.runs=10 hpb.poll=0.005 lab.run=/lab/run.sh"
    argv = hb.qemu_argv(Path("/k"), Path("/i"), cmdline, tmp_path / "qmp.sock")
    joined = " ".join(argv)
    assert argv[argv.index("-append") + 1] == cmdline
    assert "-smp 1,maxcpus=2" in joined and "-m 512" in joined and "accel=kvm" in joined
    assert "-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=on" in joined
    assert "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=0x1e" in joined
    assert "-cpu max" in " ".join(hb.qemu_argv(Path("/k"), Path("/i"), cmdline, tmp_path / "q", "tcg"))


# -- the guest script, on a fake tree ---------------------------------------------------------------------


class _FakeGuest:
    """hotplug_guest.sh under the initramfs's busybox with HPB_SYS / HPB_DEV / HPB_CMDLINE in ``root``."""

    def __init__(self, root: Path, runs: int) -> None:
        self.sys, self.dev = root / "sys", root / "dev"
        self.cpu = self.sys / "devices/system/cpu"
        for d in (self.sys / "block", self.dev, self.cpu, root / "tmp"):
            d.mkdir(parents=True)
        (self.cpu / "online").write_text("0\n")
        (root / "cmdline").write_text(f"console=ttyS0 hpb.runs={runs} hpb.poll=0.01 lab.run=/lab/run.sh\n")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HPB_SYS": str(self.sys),
            "HPB_DEV": str(self.dev),
            "HPB_CMDLINE": str(root / "cmdline"),
            "TMPDIR": str(root / "tmp"),
        }
        script = LAB / "bench" / "hotplug_guest.sh"
        self.proc = subprocess.Popen(
            [str(BUSYBOX), "sh", str(script)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put("")  # the end

    def line(self) -> str:
        """The script's next line (a budget against a hang, not a timing)."""
        try:
            line = self._lines.get(timeout=LINE_BUDGET)
        except queue.Empty:
            raise AssertionError(f"no line from the script within {LINE_BUDGET} s") from None
        assert line, f"the script ended: {self.proc.stderr.read() if self.proc.stderr else ''}"
        return line

    def nothing_printed(self) -> bool:
        return self._lines.empty()

    def add_disk(self) -> None:
        (self.sys / "block/vda").mkdir()
        (self.dev / "vda").write_bytes(b"\0" * 4096)
        (self.sys / "block/vda/size").write_text("8\n")

    def remove_disk(self) -> None:
        (self.sys / "block/vda/size").unlink()
        (self.sys / "block/vda").rmdir()
        (self.dev / "vda").unlink()

    def add_cpu(self, online: str) -> None:
        (self.cpu / "cpu1").mkdir()
        (self.cpu / "cpu1/online").write_text(f"{online}\n")
        (self.cpu / "online").write_text("0-1\n")

    def remove_cpu(self) -> None:
        (self.cpu / "online").write_text("0\n")
        (self.cpu / "cpu1/online").unlink()
        (self.cpu / "cpu1").rmdir()


def test_the_guest_script_marks_each_disk_and_vcpu_usable_and_gone_in_order(tmp_path: Path) -> None:
    guest = _FakeGuest(tmp_path, runs=2)
    try:
        assert guest.line() == "HPB-READY runs=2 poll=0.01"
        for seq in (1, 2):
            guest.add_disk()
            assert hb.parse_marker(guest.line()) == hb.Marker("disk", True, seq)
            guest.remove_disk()
            assert hb.parse_marker(guest.line()) == hb.Marker("disk", False, seq)
        # the first vCPU arrives offline (QEMU's ACPI hot-add): the script onlines it, then marks it
        guest.add_cpu(online="0")
        assert hb.parse_marker(guest.line()) == hb.Marker("vcpu", True, 1, "0-1")
        assert (guest.cpu / "cpu1/online").read_text().strip() == "1"
        guest.remove_cpu()
        assert hb.parse_marker(guest.line()) == hb.Marker("vcpu", False, 1, "0")
        guest.add_cpu(online="1")  # upcall's AddCpu onlines it itself
        assert hb.parse_marker(guest.line()) == hb.Marker("vcpu", True, 2, "0-1")
        guest.remove_cpu()
        assert hb.parse_marker(guest.line()) == hb.Marker("vcpu", False, 2, "0")
        rest = []
        while not rest or rest[-1] != "HPB-DMESG end":
            rest.append(guest.line())
        assert any(line.startswith("HPB-OOPS ") for line in rest)
        assert guest.proc.wait(timeout=30) == 0
        assert list((tmp_path / "tmp").iterdir()) == []  # its fifo removed
    finally:
        if guest.proc.poll() is None:
            guest.proc.kill()
        guest.proc.wait()


def test_the_guest_script_waits_while_a_disk_cannot_be_read(tmp_path: Path) -> None:
    """/sys/block/vda before the disk has a size (probe under way), or without a /dev node: no marker yet."""
    guest = _FakeGuest(tmp_path, runs=1)
    try:
        assert guest.line().startswith("HPB-READY")
        (guest.sys / "block/vda").mkdir()
        (guest.sys / "block/vda/size").write_text("0\n")
        time.sleep(0.5)  # about 50 looks
        assert guest.nothing_printed()
        (guest.sys / "block/vda/size").write_text("8\n")  # sized, but no /dev/vda to read yet
        time.sleep(0.5)
        assert guest.nothing_printed()
        (guest.dev / "vda").write_bytes(b"\0" * 4096)
        assert guest.line() == "HPB disk+ 1"
    finally:
        guest.proc.kill()
        guest.proc.wait()


def test_cycles_time_each_request_to_its_marker_disks_first_then_vcpus() -> None:
    """run_cycles with a fake back-end whose guest prints each marker 20 ms after the request."""
    console, vm = Console(), _Running()
    calls: list[str] = []
    counts = {"disk": 0, "vcpu": 0}

    def request(kind: str, added: bool) -> object:
        async def send() -> None:
            calls.append(f"{kind}{'+' if added else '-'}")
            if added:
                counts[kind] += 1
            await trio.sleep(0.02)
            word, mask = ("cpu", " 0-1" if added else " 0") if kind == "vcpu" else ("disk", "")
            console.write(f"HPB {word}{'+' if added else '-'} {counts[kind]}{mask}\r\n".encode())

        return send

    async def released() -> None:
        calls.append("released")

    peer = hb.Peer(
        {k: request(k, True) for k in hb.KINDS},
        {k: request(k, False) for k in hb.KINDS},
        {"disk": released},
    )
    series = {kind: hb.Series() for kind in hb.KINDS}
    trio.run(lambda: hb.run_cycles("fake", peer, console, vm, runs=2, series=series))
    assert calls == ["disk+", "disk-", "released"] * 2 + ["vcpu+", "vcpu-"] * 2
    for kind in hb.KINDS:
        for samples in (series[kind].add_s, series[kind].remove_s):
            assert len(samples) == 2 and all(s >= 0.02 for s in samples)  # the marker came 20 ms after


def test_a_kind_not_measured_is_skipped() -> None:
    console, vm = Console(), _Running()

    async def unexpected() -> None:
        raise AssertionError("no vCPU request expected")

    series = {"disk": hb.Series(not_measured="test"), "vcpu": hb.Series(not_measured="test")}
    peer = hb.Peer({"disk": unexpected, "vcpu": unexpected}, {"disk": unexpected, "vcpu": unexpected})
    trio.run(lambda: hb.run_cycles("fake", peer, console, vm, runs=3, series=series))
    assert series["vcpu"].result() == {"not_measured": "test"}


def test_a_failure_inside_a_nursery_is_described_by_its_own_errors() -> None:
    group = ExceptionGroup("Exceptions from Trio nursery", [OSError("QMP connection lost")])
    assert hb.describe(group) == "OSError: QMP connection lost"
    assert hb.describe(MicroVMTimeout("no 'HPB cpu+ 2' within 120 s")) == (
        "MicroVMTimeout: no 'HPB cpu+ 2' within 120 s"
    )
