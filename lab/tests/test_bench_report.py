"""lab/bench/report.py turns what the bench steps write into report.md and PNG figures (host only, no lab VM).

The inputs are built by the bench scripts' own result functions (shim_bench.run_rm_result, pod_point on
this very process, vmm_boot.run_record/summarize, net_bench.measure_result, virtio_guest.result_line,
cri_bench.pod_record/point_fields/series_result/ratios, hotplug_bench.Series/summarize), so a
change of their output shape breaks these tests rather than the report after a lab run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

LAB = Path(__file__).resolve().parents[1]
BENCH = LAB / "bench"


def _load(name: str) -> ModuleType:
    if str(LAB) not in sys.path:
        sys.path.insert(0, str(LAB))
    spec = importlib.util.spec_from_file_location(f"kata_lab_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


report = _load("report")
shim_bench = _load("shim_bench")
vmm_boot = _load("vmm_boot")
net_bench = _load("net_bench")
load_bench = _load("load_bench")
cri_bench = _load("cri_bench")
virtio_guest = _load("virtio_guest")
hotplug_bench = _load("hotplug_bench")
mpimg = pytest.importorskip("matplotlib.image")

RUNC = [2.0, 2.2, 2.1, 2.4]
KATA = [30.0, 28.0, 31.5, 29.0]
TEMPLATE = [5.0, 4.5, 6.0, 5.5]
BOOT = {"kata-vmm": [1.1, 1.0, 1.3], "qemu-q35": [1.6, 1.5, 1.8], "qemu-microvm": [1.2, 1.4, 1.25]}


def _shim_json(with_template: bool = True) -> dict[str, Any]:
    times = {"runc": RUNC, "kata": KATA}
    if with_template:
        times["kata-template"] = TEMPLATE
    failures: dict[str, list[str]] = {name: [] for name in times}
    failures["kata"] = ["stderr: ctr: agent not ready within 90.0 s"]
    # real /proc shapes: this process stands in for the shims
    points = [shim_bench.pod_point(n, os.getpid()) for n in (1, 10)]
    runc_points = [dict(p, threads=p["threads"] + 8 * i, Pss=p["Pss"] // 4) for i, p in enumerate(points)]
    return {
        "host": {"cpus": 2, "kernel": "test"},
        "run_rm": shim_bench.run_rm_result(len(RUNC), times, failures),
        "pods": {
            "kata": shim_bench.pod_result(20.0, [1.0, 1.5], points),
            "runc": shim_bench.pod_result(1.0, [0.1, 0.2], runc_points),
        },
        "total_s": 100.0,
    }


def _boot_json() -> dict[str, Any]:
    results = {
        name: [vmm_boot.run_record(t, t + 0.5, 0, 100_000) for t in times] for name, times in BOOT.items()
    }
    results["kata-vmm"].append(vmm_boot.run_record(None, 300.0, -9, 100_000, stderr="killed"))
    return vmm_boot.summarize(results, 3, 2, 512)


NET_OURS = ([10.0, 12.0, 11.0], [8.0, 9.0, 7.0], [200.0, 220.0, 210.0, 400.0])
NET_QEMU = ([40.0, 44.0, 42.0], [30.0, 33.0, 31.0], [100.0, 90.0, 110.0, 95.0])


def _net_json() -> dict[str, Any]:
    net = net_bench.report_header(8, 4, True)
    net["ours"] = net_bench.measure_result(*NET_OURS)
    net["qemu"] = net_bench.measure_result(*NET_QEMU)
    return net


VIRTIO_BLK = {"qemu": 100.0, "kata-vmm": 80.0}
VIRTIO_FS = {"qemu": 500.0, "kata-vmm": 1000.0}
VIRTIO_TXT = "\n".join(
    [
        "lab/bench/virtio_guest.py virtio-blk sequential read of 128 MiB: qemu 100.0 MB/s, ...",
        virtio_guest.result_line("virtio-blk", "MB/s", "sequential read of 128 MiB", VIRTIO_BLK),
        virtio_guest.result_line("virtio-fs", "files/s", "stat+read of 1000 small files", VIRTIO_FS),
        "2 passed in 300.00s",
    ]
)


LOAD_START = {"kata": [300.0, 320.0, 340.0], "kata-template": [20.0, 22.0, 30.0], "runc": [2.0, 2.5, 3.0]}


def _load_json() -> dict[str, Any]:
    point = shim_bench.pod_point(1, os.getpid())  # real /proc shapes: this process stands in for each shim
    series = {}
    for name, seconds in LOAD_START.items():
        started = [{"name": f"p{i}", "seconds": s, "code": 0, "stderr": ""} for i, s in enumerate(seconds)]
        started.append({"name": "late", "seconds": 900.0, "code": 1, "stderr": "ctr: agent not ready"})
        series[name] = load_bench.load_result(4, started, [point] * len(seconds))
    return {"pods": 4, "series": series, "total_s": 10.0}


CRI_START = {"runc": [1.0, 1.4, 1.2], "kata-template": [20.0, 26.0, 22.0], "kata": [200.0, 260.0]}
CRI_AGENT = "RunPodSandbox: UNKNOWN: failed to create containerd task: agent not ready within 90.0 s"


def _cri_json() -> dict[str, Any]:
    # real /proc shapes: this process stands in for each pod's shim (ours 4x runc's memory, 2 more threads)
    point = cri_bench.point_fields(shim_bench.pod_point(1, os.getpid()))
    series = {}
    for name, seconds in CRI_START.items():
        started = []
        scale = 1 if name == "runc" else 4
        for i, s in enumerate(seconds):
            r = cri_bench.pod_record(f"{name}-{i}")
            r.update(pod_id=f"{name}{i}", ready=True, seconds=s, running_s=s + 1, **point)
            r["calls_s"] = {call: s / 3 for call in cri_bench.CALLS}
            r.update(rss_kib=point["rss_kib"] * scale, pss_kib=point["pss_kib"] * scale)
            r["threads"] = point["threads"] + (0 if name == "runc" else 2)
            started.append(r)
        if name == "kata":  # ten cold boots on one vCPU: some do not get Ready
            late = cri_bench.pod_record("kata-late")
            late.update(failed_call="RunPodSandbox", error=CRI_AGENT)
            started.append(late)
        series[name] = cri_bench.series_result(
            cri_bench.SERIES[name], len(started), started, shim_problems=[], left={}, teardown_errors=[]
        )
    result = {"pods": 3, "containerd": "1.6", "warm_up": {}, "series": series}
    result["ratios"] = cri_bench.ratios(series)
    result["problems"] = cri_bench.problems(result)
    return result


HOTPLUG_ADD = {
    ("kata-vmm", "disk"): [0.30, 0.20, 0.25, 0.40],
    ("qemu", "disk"): [1.00, 1.20, 0.90, 1.10],
    ("kata-vmm", "vcpu"): [0.05, 0.06, 0.08, 0.07],
    ("qemu", "vcpu"): [0.40, 0.50, 0.45, 0.60],
}
HOTPLUG_REMOVE = {"kata-vmm": [0.05, 0.06, 0.04, 0.05], "qemu": [0.50, 0.40, 0.60, 0.50]}


def _hotplug_json(*, qemu_vcpu: bool = True, kata_error: str | None = None) -> dict[str, Any]:
    backends = {}
    for name in ("kata-vmm", "qemu"):
        record: dict[str, Any] = {"how": "test", "error": None, "oops": 0}
        for kind in hotplug_bench.KINDS:
            series = hotplug_bench.Series()
            if name == "qemu" and kind == "vcpu" and not qemu_vcpu:
                series.not_measured = "QEMU has no vCPU hot-plug on this machine (test)"
            else:
                for add, remove in zip(HOTPLUG_ADD[name, kind], HOTPLUG_REMOVE[name], strict=True):
                    series.record(True, add, add / 2)
                    series.record(False, remove, remove / 2)
            record[kind] = series.result()
        backends[name] = record
    if kata_error:
        backends["kata-vmm"]["error"] = kata_error
    return hotplug_bench.summarize(4, backends, 0.005)


def _meta() -> dict[str, Any]:
    return {
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "dirty": False,
        "started": "2026-12-06 20:00:00",
        "finished": "2026-12-06 21:00:00",
        "loadavg_start": "0.50 0.40 0.30 1/200 1234",
        "loadavg_end": "1.90 1.50 1.00 2/210 2345",
        "cpu_model": "Test CPU 9000",
        "cpus": 2,
        "nested_tcg": True,
        "lab_vm": {"accel": "tcg", "cpu": "max"},
        "steps": [
            {"name": "host", "seconds": 12.0, "status": "ok"},
            {"name": "net", "seconds": 40.0, "status": "failed", "detail": "exit 1"},
            {"name": "hotplug", "seconds": 900.0, "status": "failed", "detail": "exit 1 (the lab VM failed)"},
        ],
    }


def _write_inputs(d: Path, *, net: bool = True, hotplug: bool = True) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.json").write_text(json.dumps(_meta()))
    (d / "shim.json").write_text(json.dumps(_shim_json(), indent=2) + "\n")
    (d / "vmm_boot.json").write_text(json.dumps(_boot_json()) + "\n")
    (d / "virtio_guest.txt").write_text(VIRTIO_TXT + "\n")
    if net:
        (d / "net.json").write_text(json.dumps(_net_json(), indent=1))
    (d / "load.json").write_text(json.dumps(_load_json(), indent=1))
    (d / "cri.json").write_text(json.dumps(_cri_json(), indent=2) + "\n")
    if hotplug:
        (d / "hotplug.json").write_text(json.dumps(_hotplug_json(), indent=1))


def _assert_image(path: Path | None) -> None:
    assert path is not None and path.stat().st_size > 0
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.min() < image.max()  # something drawn, not a blank canvas


def _ratio_row(text: str, figure: str, ours: str, peer: str) -> str:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] == f"[{figure}](#{figure})" and cells[1] == ours and cells[2] == peer:
            return cells[5]
    raise AssertionError(f"no ratio row {figure}: {ours} / {peer} in\n{text}")


def test_report_draws_every_figure_with_its_series_and_ratios(tmp_path: Path) -> None:
    _write_inputs(tmp_path)
    result = report.build(tmp_path)
    assert [m.name for m in result.missing] == []
    assert {p.name for p in result.plots} == {name for name, _, _ in report.FIGURES}
    for plot in result.plots:
        _assert_image(plot.png)
        assert plot.png == tmp_path / f"{plot.name}.png"
    expected_labels = {
        "start_time": ["runc", "dragonball cold", "dragonball template"],
        "vmm_boot": ["kata-vmm", "qemu-q35", "qemu-microvm"],
        "virtio_blk": ["qemu", "kata-vmm"],
        "virtio_fs": ["qemu", "kata-vmm"],
        "net_throughput": ["ours guest->host", "QEMU guest->host", "ours host->guest", "QEMU host->guest"],
        "net_latency": ["ours", "QEMU"],
        "pod_threads": ["dragonball threads", "runc threads"],
        "pod_memory": ["dragonball PSS", "dragonball guest RAM (RSS)", "runc PSS"],
        "load_start": ["dragonball cold", "dragonball template", "runc"],
        "load_memory": ["dragonball cold", "dragonball template", "runc"],
        "cri_start": ["runc", "dragonball template", "dragonball cold"],
        "cri_threads": ["runc", "dragonball template", "dragonball cold"],
        "cri_memory": [
            "runc RSS", "runc PSS", "dragonball template RSS", "dragonball template PSS",
            "dragonball cold RSS", "dragonball cold PSS",
        ],
        "hotplug": ["upcall disk", "QEMU disk", "upcall vCPU", "QEMU vCPU"],
    }  # fmt: skip
    for name, labels in expected_labels.items():
        assert result.plot(name).labels == labels, name  # read back from the drawn figure

    md = (tmp_path / "report.md").read_text()
    assert md == result.markdown
    med = statistics.median
    assert _ratio_row(md, "start_time", "dragonball cold", "runc") == f"{med(KATA) / med(RUNC):.2f}"
    assert _ratio_row(md, "start_time", "dragonball template", "runc") == f"{med(TEMPLATE) / med(RUNC):.2f}"
    # the peer is the faster QEMU machine type; the failed kata-vmm run is not a sample
    best = min(med(BOOT["qemu-q35"]), med(BOOT["qemu-microvm"]))
    assert _ratio_row(md, "vmm_boot", "kata-vmm", "qemu-microvm") == f"{med(BOOT['kata-vmm']) / best:.2f}"
    assert "kata-vmm: 1 of 4 run(s) did not reach the marker" in md
    assert _ratio_row(md, "virtio_blk", "kata-vmm", "qemu") == f"{80.0 / 100.0:.2f}"
    assert _ratio_row(md, "virtio_fs", "kata-vmm", "qemu") == "2.00"
    for i, way in enumerate(("guest->host", "host->guest")):
        expected = med(NET_OURS[i]) / med(NET_QEMU[i])
        assert _ratio_row(md, "net_throughput", f"ours {way}", f"QEMU {way}") == f"{expected:.2f}"
    assert _ratio_row(md, "net_latency", "ours", "QEMU") == f"{med(NET_OURS[2]) / med(NET_QEMU[2]):.2f}"
    shim = json.loads((tmp_path / "shim.json").read_text())
    kata10, runc10 = shim["pods"]["kata"]["points"][1], shim["pods"]["runc"]["points"][1]
    threads = _ratio_row(md, "pod_threads", "dragonball threads with 10 containers", "runc threads")
    assert threads == f"{kata10['threads'] / runc10['threads']:.2f}"
    assert _ratio_row(md, "pod_memory", "dragonball PSS with 10 containers", "runc PSS") == (
        f"{kata10['Pss'] / runc10['Pss']:.2f}"
    )
    template_start = med(LOAD_START["kata-template"]) / med(LOAD_START["runc"])
    assert _ratio_row(md, "load_start", "dragonball template", "runc") == f"{template_start:.2f}"
    assert "dragonball cold: 3 of 4 pods came up" in md
    # through CRI: p50 ratios in the table, p99 ratios, Ready counts and the failed call in the notes
    for key, label in (("kata-template", "dragonball template"), ("kata", "dragonball cold")):
        p50 = med(CRI_START[key]) / med(CRI_START["runc"])
        assert _ratio_row(md, "cri_start", label, "runc") == f"{p50:.2f}"
        p99 = cri_bench.percentile(CRI_START[key], 99) / cri_bench.percentile(CRI_START["runc"], 99)
        assert f"{label}/runc: start p99 ratio {p99:.2f} (p50 {p50:.2f})" in md
        assert _ratio_row(md, "cri_memory", f"{label} RSS", "runc RSS") == "4.00"
        assert _ratio_row(md, "cri_memory", f"{label} PSS", "runc PSS") == "4.00"
    cri = json.loads((tmp_path / "cri.json").read_text())
    runc_threads = cri["series"]["runc"]["threads"][0]
    threads = _ratio_row(md, "cri_threads", "dragonball template", "runc")
    assert threads == f"{(runc_threads + 2) / runc_threads:.2f}"
    assert "dragonball cold: 2 of 3 pods Ready" in md and "runc: 3 of 3 pods Ready" in md
    assert f"dragonball cold: kata-late failed in RunPodSandbox: {CRI_AGENT}" in md
    for kind, shown in (("disk", "disk"), ("vcpu", "vCPU")):
        expected = med(HOTPLUG_ADD["kata-vmm", kind]) / med(HOTPLUG_ADD["qemu", kind])
        assert _ratio_row(md, "hotplug", f"upcall {shown}", f"QEMU {shown}") == f"{expected:.2f}"
    disk_ratio = med(HOTPLUG_ADD["kata-vmm", "disk"]) / med(HOTPLUG_ADD["qemu", "disk"])
    assert f"disk: upcall/QEMU {disk_ratio:.2f}, goal at most 0.2: not met" in md
    vcpu_ratio = med(HOTPLUG_ADD["kata-vmm", "vcpu"]) / med(HOTPLUG_ADD["qemu", "vcpu"])
    assert vcpu_ratio < 0.2 and f"vCPU: upcall/QEMU {vcpu_ratio:.2f}, goal at most 0.2: met" in md
    remove_ratio = med(HOTPLUG_REMOVE["kata-vmm"]) / med(HOTPLUG_REMOVE["qemu"])
    assert f"(upcall/QEMU {remove_ratio:.2f})" in md
    # the header: commit, date, load at start and end, CPU, TCG; each step's time
    assert "commit: 0123456789abcdef0123456789abcdef01234567" in md
    assert "start 0.50 0.40 0.30 1/200 1234, end 1.90 1.50 1.00 2/210 2345" in md
    assert "Test CPU 9000" in md and "nested under TCG: yes" in md
    assert "| net | 40.0 | failed (exit 1) |" in md
    assert "stderr: ctr: agent not ready within 90.0 s" in md
    for plot in result.plots:
        assert f"![{plot.title}]({plot.name}.png)" in md


def test_missing_inputs_are_reported_not_measured(tmp_path: Path) -> None:
    _write_inputs(tmp_path, net=False, hotplug=False)  # meta.json says the net and hotplug steps failed
    (tmp_path / "vmm_boot.json").write_text("")  # the step died before printing
    (tmp_path / "virtio_guest.txt").write_text(
        VIRTIO_TXT.splitlines()[1]
        + "\nFAILED lab/bench/virtio_guest.py::test_virtio_fs_small_file_reads_kata_vmm_vs_qemu_virtiofsd"
        " - AssertionError: virtiofsd did not start\n"
    )
    result = report.build(tmp_path)
    why = {m.name: m.why for m in result.missing}
    assert set(why) == {"vmm_boot", "virtio_fs", "net_throughput", "net_latency", "hotplug"}
    assert why["net_throughput"] == why["net_latency"] == "the net step failed after 40 s: exit 1"
    assert why["hotplug"] == "the hotplug step failed after 900 s: exit 1 (the lab VM failed)"
    assert "vmm_boot.json missing or empty" in why["vmm_boot"]
    assert "virtiofsd did not start" in why["virtio_fs"]
    md = (tmp_path / "report.md").read_text()
    assert "net_latency | | | | | not measured: the net step failed after 40 s: exit 1" in md
    drawn = {"start_time", "pod_threads", "pod_memory", "virtio_blk", "load_start", "load_memory"}
    drawn |= {"cri_start", "cri_threads", "cri_memory"}
    assert {p.name for p in result.plots} == drawn
    for plot in result.plots:
        _assert_image(plot.png)
    assert not (tmp_path / "net_latency.png").exists()


def test_report_without_any_input_still_writes_a_report(tmp_path: Path) -> None:
    result = report.build(tmp_path / "empty", tmp_path / "out")
    assert result.plots == [] and len(result.missing) == len(report.FIGURES)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "meta.json missing or not a JSON object" in md and "host.json missing" in md
    assert re.search(r"commit: \S+", md)


def test_report_takes_a_series_with_no_sample_and_an_old_shim_json(tmp_path: Path) -> None:
    _write_inputs(tmp_path)
    shim = _shim_json(with_template=False)
    shim["run_rm"] = shim_bench.run_rm_result(2, {"runc": RUNC, "kata": []}, {"runc": [], "kata": ["boom"]})
    for pod in shim["pods"].values():
        for point in pod["points"]:
            del point["Pss"]  # measured before shim_bench read smaps_rollup
    (tmp_path / "shim.json").write_text(json.dumps(shim))
    result = report.build(tmp_path)
    why = {m.name: m.why for m in result.missing}
    assert why["start_time"] == "no successful kata run"
    assert result.plot("pod_memory").labels == ["dragonball RSS", "dragonball guest RAM (RSS)", "runc RSS"]
    assert "PSS not in shim.json: VmRSS plotted instead" in result.markdown


def test_hotplug_without_qemu_vcpus_keeps_the_disk_ratio_and_says_why(tmp_path: Path) -> None:
    _write_inputs(tmp_path)
    hp = _hotplug_json(qemu_vcpu=False, kata_error="MicroVMTimeout: no 'HPB cpu- 3' within 120 s\nconsole")
    (tmp_path / "hotplug.json").write_text(json.dumps(hp))
    result = report.build(tmp_path)
    plot = result.plot("hotplug")
    _assert_image(plot.png)
    assert plot.labels == ["upcall disk", "QEMU disk", "upcall vCPU"]
    assert [(r.ours, r.peer) for r in plot.ratios] == [("upcall disk", "QEMU disk")]
    md = result.markdown
    assert "QEMU vCPU: not measured: QEMU has no vCPU hot-plug on this machine (test)" in md
    assert "upcall (kata-vmm) failed: MicroVMTimeout: no 'HPB cpu- 3' within 120 s" in md
    with pytest.raises(AssertionError):
        _ratio_row(md, "hotplug", "upcall vCPU", "QEMU vCPU")


def test_hotplug_with_no_pair_is_not_measured(tmp_path: Path) -> None:
    _write_inputs(tmp_path)
    hp = _hotplug_json()
    hp["backends"]["qemu"] = {"error": "RuntimeError: qemu did not boot", "disk": {"not_measured": "x"}}
    (tmp_path / "hotplug.json").write_text(json.dumps(hp))
    why = {m.name: m.why for m in report.build(tmp_path).missing}
    assert "disk: no QEMU sample" in why["hotplug"] and "qemu did not boot" in why["hotplug"]


def test_report_reads_what_the_bench_scripts_print() -> None:
    assert report.VIRTIO_PREFIX == virtio_guest.RESULT_PREFIX
    assert shim_bench.run_rm_result(1, {"runc": [1.0], "kata": []}, {})["median_ratio_kata_over_runc"] is None
    for key in ("Pss", "VmRSS", "GuestRSS"):
        assert key in shim_bench.memory_kib(os.getpid())


def test_a_pod_point_counts_the_shims_whole_process_tree() -> None:
    """runc's containers, QEMU and virtiofsd are children of their shim: a pod's threads and PSS are the
    tree's, not only the shim's (the built-in VMM's guest is inside the shim)."""
    child = subprocess.Popen(["sleep", "60"])
    try:
        point = shim_bench.pod_point(3, os.getpid())
    finally:
        child.kill()
        child.wait()
    assert "sleep" in point["processes"] and point["containers"] == 3
    assert point["Pss"] > point["ShimPss"] > 0
    assert point["threads"] == len(point["thread_names"]) >= 2


def test_shim_bench_ratios_name_each_series_against_runc_and_qemu() -> None:
    times = {"runc": [1.0, 3.0], "kata": [20.0, 40.0], "kata-template": [4.0, 6.0], "qemu": [60.0, 60.0]}
    ratios = shim_bench.run_rm_result(2, times, {})["median_ratios"]
    assert ratios == {"kata/runc": 15.0, "kata-template/runc": 2.5, "qemu/runc": 30.0, "kata/qemu": 0.5}


def test_labvm_describes_the_accelerator_cpu_and_kernel_arguments_it_runs_with() -> None:
    """What the bench report's header prints about the lab VM comes from labvm itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("KATA_LABVM", "LAB_CPU")}
    done = subprocess.run(
        [str(LAB / "labvm"), "describe"],
        capture_output=True,
        text=True,
        check=True,
        env=env | {"LAB_CPU": "max,-xsave", "LAB_APPEND": "kvm_amd.npt=0"},
    )
    described = json.loads(done.stdout)
    assert described["accel"].startswith("tcg")
    assert described["cpu"] == "max,-xsave"
    assert described["kernel_args"].endswith("kvm_amd.npt=0") and "kvm_amd.vgif=0" in described["kernel_args"]


def test_host_benchmarks_are_a_table(tmp_path: Path) -> None:
    """host.json as pytest-benchmark writes it (a real, tiny run) becomes the host table."""
    (tmp_path / "test_tiny.py").write_text("def test_tiny_sum(benchmark):\n    benchmark(sum, range(10))\n")
    out = tmp_path / "bench"
    out.mkdir()
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
            "--benchmark-only", "--benchmark-min-rounds=1", "--benchmark-max-time=0.001",
            f"--benchmark-json={out / 'host.json'}", str(tmp_path / "test_tiny.py"),
        ],
        capture_output=True, text=True, check=False, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    md = report.build(out).markdown
    host = md.split("## Host micro benchmarks (pytest-benchmark)", 1)[1]
    assert re.search(r"^\| test_tiny_sum \| [\d.]+ \| [\d.]+ \| \d+ \| \d+ \|$", host, re.MULTILINE), host


@pytest.mark.parametrize(
    "name, content",
    [
        ("shim.json", "[]"),
        ("shim.json", '{"run_rm": {"seconds": {"runc": "fast"}}, "pods": 3}'),
        ("vmm_boot.json", "Traceback (most recent call last):\n"),
        ("net.json", '{"ours": {}, "qemu": {}}'),
        ("cri.json", '{"pods": 10, "series": {"runc": {"ready": 0}}}'),
        ("meta.json", '"not an object"'),
        ("host.json", '{"benchmarks": [{"name": "x"}]}'),
        ("virtio_guest.txt", 'VIRTIO-BENCH {"bench": "virtio-blk"}\n'),
        ("hotplug.json", '{"runs": 3, "backends": {"kata-vmm": {"disk": {"add_s": "x"}}, "qemu": []}}'),
    ],
)
def test_a_broken_input_is_not_measured_never_a_crash(tmp_path: Path, name: str, content: str) -> None:
    _write_inputs(tmp_path)
    (tmp_path / name).write_text(content)
    result = report.build(tmp_path)
    assert (tmp_path / "report.md").read_text() == result.markdown
    assert "not measured" in result.markdown or name == "meta.json"
    for plot in result.plots:
        _assert_image(plot.png)


def test_cri_figures_are_not_measured_when_no_kata_pod_got_ready(tmp_path: Path) -> None:
    """Every kata pod through CRI failed (cri_bench recorded why): the figures say so, the rest is drawn."""
    _write_inputs(tmp_path)
    cri = _cri_json()
    for key in ("kata-template", "kata"):
        failed = [cri_bench.pod_record(f"{key}-{i}") for i in range(3)]
        for r in failed:
            r.update(failed_call="RunPodSandbox", error=CRI_AGENT)
        cri["series"][key] = cri_bench.series_result(
            cri_bench.SERIES[key], 3, failed, shim_problems=[], left={}, teardown_errors=[]
        )
    (tmp_path / "cri.json").write_text(json.dumps(cri))
    result = report.build(tmp_path)
    why = {m.name: m.why for m in result.missing}
    assert set(why) == {"cri_start", "cri_threads", "cri_memory"}
    assert why["cri_start"] == "cri_start: no pod of runc or of ours got Ready"
    assert {"load_start", "start_time"} <= {p.name for p in result.plots}
    # and when the step left no cri.json: the step's failure, from meta.json
    (tmp_path / "cri.json").unlink()
    meta = _meta()
    meta["steps"].append({"name": "cri", "seconds": 900.0, "status": "failed", "detail": "exit 1"})
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    why = {m.name: m.why for m in report.build(tmp_path).missing}
    assert why["cri_memory"] == "the cri step failed after 900 s: exit 1"


def test_load_bench_starts_pods_in_waves_and_says_so() -> None:
    """`--at-once N`: the pods start in consecutive waves of N (cold pods at density, two at a time, where ten
    at once cannot all boot on one emulated CPU); the table's first line says which."""
    names = [f"p{i}" for i in range(5)]
    assert load_bench.waves(names, 2) == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert load_bench.waves(names, 0) == [names]
    assert load_bench.waves(names, 9) == [names]
    started = [{"name": n, "seconds": 1.0, "code": 0, "stderr": ""} for n in names]
    waved = load_bench.load_result(5, started, [], at_once=2)
    together = load_bench.load_result(5, started, [])
    assert (waved["at_once"], together["at_once"]) == (2, 5)
    assert load_bench.report({"pods": 5, "series": {"kata": waved}}).startswith("5 pods started 2 at a time")
    assert load_bench.report({"pods": 5, "series": {"kata": together}}).startswith("5 pods started at once")
