"""lab/bench/cri_bench.py's host parts (no lab VM): its statistics, the one-shim-per-pod check on shim argvs
as /proc shows them, the series record and its problems, the concurrent start of pods against a fake CRI
server that answers only when every pod's RunPodSandbox has arrived; and, with root and containerd, the
bench's runc series whole against the real containerd 1.6 with CNI (in private namespaces, as
test_cri_client runs test_cri_lab's flow)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from framework import containerd as lab_containerd
from framework import cri
from framework._gen.cri import api_pb2, api_pb2_grpc

LAB = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(LAB / "tests"))
from test_cri_client import VERSIONS, needs_cni, run_in_private_namespaces, serving_runtime  # noqa: E402


def _load(name: str) -> ModuleType:
    for where in (LAB, LAB / "bench"):
        if str(where) not in sys.path:
            sys.path.insert(0, str(where))
    spec = importlib.util.spec_from_file_location(f"kata_lab_bench_{name}", LAB / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cri_bench = _load("cri_bench")
ADDRESS = "/tmp/ctrd-x/containerd.sock"


def test_percentiles_interpolate_between_ranks() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert cri_bench.percentile(values, 50) == statistics.median(values) == 3.0
    assert cri_bench.percentile(values, 0) == 1.0 and cri_bench.percentile(values, 100) == 5.0
    # (n-1) * 0.99 = 3.96: between the 4th and the 5th value
    assert cri_bench.percentile(values, 99) == pytest.approx(4.96)
    ten = [float(i) for i in range(1, 11)]
    assert cri_bench.percentile(ten, 99) == pytest.approx(9.91)
    assert cri_bench.percentile([7.0], 99) == 7.0
    assert math.isnan(cri_bench.percentile([], 50))
    with pytest.raises(ValueError):
        cri_bench.percentile(values, 101)


def test_a_long_error_keeps_its_start_and_its_cause_at_the_end() -> None:
    cause = "agent not ready within 90.0 s"
    text = "RunPodSandbox: UNKNOWN: failed to create containerd task: " + "x" * 2000 + cause
    short = cri_bench.short_error(text)
    assert len(short) <= cri_bench.ERROR_CHARS
    assert short.startswith("RunPodSandbox: UNKNOWN") and short.endswith(cause) and " ... " in short
    assert cri_bench.short_error("short") == "short"


def _argv(binary: str, pod_id: str) -> str:
    # a shim daemon's argv as /proc/PID/cmdline joined by spaces: runc's and ours carry -id and -address
    return f"/usr/bin/{binary} -namespace k8s.io -id {pod_id} -address {ADDRESS} -publish-binary /usr/bin/x"


def test_each_pod_has_exactly_one_shim_of_its_own() -> None:
    started = [cri_bench.pod_record(f"p{i}") for i in range(4)]
    for i, r in enumerate(started[:3]):
        r["pod_id"] = f"{i:064x}"
    # p3 never got a sandbox: it needs no shim
    shims = {100 + i: _argv("containerd-shim-kata-v2", f"{i:064x}") for i in range(3)}
    owners, problems = cri_bench.one_shim_per_pod(started, shims)
    assert problems == []
    assert owners == {f"{i:064x}": 100 + i for i in range(3)}
    # a pod with two shims, one with none, a shim serving no pod of the series
    shims[200] = _argv("containerd-shim-kata-v2", f"{0:064x}")
    del shims[101]
    shims[300] = _argv("containerd-shim-kata-v2", "stranger")
    owners, problems = cri_bench.one_shim_per_pod(started, shims)
    assert set(owners) == {f"{2:064x}"}
    assert problems == [
        "p0: 2 shims [100, 200]",
        "p1: 0 shims []",
        "shim(s) [300] with -id 'stranger' serve no pod of the series",
    ]


def _pods(name: str, seconds: list[float], failed: int) -> list[dict[str, Any]]:
    out = []
    for i, s in enumerate(seconds):
        r = cri_bench.pod_record(f"{name}-{i}")
        r.update(pod_id=f"{name}{i}", ready=True, seconds=s, running_s=s + 0.5)
        r["calls_s"] = {"RunPodSandbox": s * 0.8, "CreateContainer": s * 0.1, "StartContainer": s * 0.1}
        r.update(threads=3 + i, rss_kib=1024 * (100 + i), pss_kib=1024 * (50 + i), guest_rss_kib=0)
        out.append(r)
    for i in range(failed):
        r = cri_bench.pod_record(f"{name}-failed-{i}")
        r.update(failed_call="RunPodSandbox", error="RunPodSandbox: UNKNOWN: agent not ready")
        out.append(r)
    return out


def _series(name: str, seconds: list[float], failed: int = 0, **found: Any) -> dict[str, Any]:
    pods = _pods(name, seconds, failed)
    return cri_bench.series_result(
        cri_bench.SERIES[name],
        len(pods),
        pods,
        shim_problems=found.get("shim_problems", []),
        left=found.get("left", {"shims": [], "netns": []}),
        teardown_errors=[],
        orphans=found.get("orphans", []),
    )


RUNC = [1.0, 2.0, 3.0, 4.0]
TEMPLATE = [10.0, 12.0, 14.0, 30.0]
COLD = [100.0, 200.0]


def test_series_record_ratios_and_what_fails_the_run() -> None:
    series = {
        "runc": _series("runc", RUNC),
        "kata-template": _series("kata-template", TEMPLATE),
        "kata": _series("kata", COLD, failed=2, orphans=["kata-failed-1 (0123456789ab)"]),
    }
    runc, cold = series["runc"], series["kata"]
    assert (runc["ready"], runc["pods"], cold["ready"], cold["pods"]) == (4, 4, 2, 4)
    assert runc["start_s"] == RUNC and runc["p50_s"] == 2.5
    assert runc["p99_s"] == pytest.approx(cri_bench.percentile(RUNC, 99))
    assert cold["failures"] == [
        {
            "name": f"kata-failed-{i}",
            "call": "RunPodSandbox",
            "error": "RunPodSandbox: UNKNOWN: agent not ready",
        }
        for i in range(2)
    ]
    assert runc["leftovers"] == {} and runc["threads"] == [3, 4, 5, 6]
    assert runc["calls_p50_s"]["RunPodSandbox"] == pytest.approx(2.5 * 0.8)
    ratios = cri_bench.ratios(series)
    assert set(ratios) == {"kata-template/runc", "kata/runc"}
    assert ratios["kata-template/runc"]["p50"] == pytest.approx(13.0 / 2.5)
    assert ratios["kata/runc"]["p99"] == pytest.approx(cri_bench.percentile(COLD, 99) / runc["p99_s"])
    assert ratios["kata/runc"]["rss"] == pytest.approx(100.5 / 101.5)
    result = {"pods": 4, "containerd": "1.6", "series": series, "ratios": ratios}
    # cold kata may fail to get Ready: recorded, not a problem
    assert cri_bench.problems(result) == []
    table = cri_bench.report(result)
    assert "| runc | 4/4 | 2.5 |" in table and "| kata | 2/4 | 150.0 |" in table
    assert "kata-template/runc: start p50 5.20x" in table
    assert "kata failure: kata-failed-0 RunPodSandbox: RunPodSandbox: UNKNOWN: agent not ready" in table
    # a pod the client gave up on but containerd kept: said, not a problem (the kubelet would collect it)
    assert "kata: pods listed after their removal (then removed): ['kata-failed-1 (0123456789ab)']" in table
    # the template series must get every pod Ready; a shim shared by two pods and leftovers fail the run
    series["kata-template"] = _series(
        "kata-template", TEMPLATE, failed=1, shim_problems=["p0: 2 shims [1, 2]"]
    )
    series["runc"] = _series("runc", RUNC, left={"netns": ["cni-1"], "shims": []})
    assert cri_bench.problems(result) == [
        "runc: left behind {'netns': ['cni-1']}",
        "kata-template: 4/5 pods Ready",
        "kata-template: p0: 2 shims [1, 2]",
    ]
    json.loads(json.dumps(result))  # what --json writes reads back
    assert cri_bench.ratios({"kata": cold}) == {}


class BarrierRuntime(api_pb2_grpc.RuntimeServiceServicer):
    """Answers RunPodSandbox only once ``pods`` of them are in flight together (a client that starts pods
    one after another breaks the barrier and gets UNAVAILABLE); pod names ending in "-bad" fail with an
    error, "-slow" containers never get RUNNING."""

    def __init__(self, pods: int) -> None:
        self.together = threading.Barrier(pods, timeout=30)
        self.handlers: list[str] = []

    def RunPodSandbox(self, request: Any, context: Any) -> Any:
        self.handlers.append(request.runtime_handler)
        try:
            self.together.wait()
        except threading.BrokenBarrierError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "pods did not arrive together")
        name = request.config.metadata.name
        if name.endswith("-bad"):
            context.abort(grpc.StatusCode.UNKNOWN, "failed to create containerd task: agent not ready")
        return api_pb2.RunPodSandboxResponse(pod_sandbox_id=f"id-{name}")

    def CreateContainer(self, request: Any, context: Any) -> Any:
        assert request.config.command == ["sleep", "100000"]
        return api_pb2.CreateContainerResponse(container_id=f"c-{request.pod_sandbox_id}")

    def StartContainer(self, request: Any, context: Any) -> Any:
        return api_pb2.StartContainerResponse()

    def ContainerStatus(self, request: Any, context: Any) -> Any:
        slow = request.container_id.endswith("-slow")
        state = api_pb2.CONTAINER_CREATED if slow else api_pb2.CONTAINER_RUNNING
        return api_pb2.ContainerStatusResponse(
            status=api_pb2.ContainerStatus(id=request.container_id, state=state)
        )

    def PodSandboxStatus(self, request: Any, context: Any) -> Any:
        status = api_pb2.PodSandboxStatus(id=request.pod_sandbox_id, state=api_pb2.SANDBOX_READY)
        return api_pb2.PodSandboxStatusResponse(status=status)


@pytest.fixture
def barrier_cri(tmp_path: Path) -> Iterator[tuple[BarrierRuntime, str]]:
    runtime = BarrierRuntime(4)
    with serving_runtime(runtime, tmp_path, workers=8) as address:
        yield runtime, address


def test_pods_are_started_together_and_each_failure_names_its_call(
    barrier_cri: tuple[BarrierRuntime, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, address = barrier_cri
    monkeypatch.setattr(cri_bench, "READY_TIMEOUT", 2.0)
    names = ["kata-0", "kata-1", "kata-bad", "kata-slow"]
    with cri.CriClient(address) as client:
        records = cri_bench.start_at_once(client, cri_bench.SERIES["kata-template"], names, tmp_path)
    assert runtime.handlers == ["kata-template"] * 4
    by_name = {r["name"]: r for r in records}
    for name in ("kata-0", "kata-1"):
        r = by_name[name]
        assert r["ready"] and r["pod_id"] == f"id-{name}" and r["container_id"] == f"c-id-{name}", r
        assert set(r["calls_s"]) == set(cri_bench.CALLS)
        assert r["seconds"] >= sum(r["calls_s"].values()) and r["running_s"] >= r["seconds"]
    bad = by_name["kata-bad"]
    assert (bad["ready"], bad["pod_id"], bad["failed_call"]) == (False, "", "RunPodSandbox")
    assert bad["error"] == "RunPodSandbox: UNKNOWN: failed to create containerd task: agent not ready"
    assert bad["seconds"] is None
    slow = by_name["kata-slow"]
    assert (slow["ready"], slow["failed_call"]) == (False, "ContainerStatus")
    assert "not RUNNING and READY" in slow["error"] and slow["seconds"] is not None


BENCH_RUNC = """
sys.path.insert(0, {bench!r})
import cri_bench
from framework import cri_pods
with containerd.private_containerd(cri=config) as ctrd:
    ctrd.import_image(busybox_oci.build(tmp / "busybox.tar"), namespace=cri.CRI_NAMESPACE)
    ctrd.import_image(cri.build_pause_image(tmp / "pause.tar"), namespace=cri.CRI_NAMESPACE)
    with cri.CriClient(ctrd.address) as client:
        lab = cri_pods.CriLab(ctrd, client, tmp)
        try:
            warm = cri_bench.warm_up(lab, cri_bench.SERIES["runc"])
            result = cri_bench.measure(lab, cri_bench.SERIES["runc"], 3)
            result["warm"] = warm
        finally:
            cri_pods.remove_all_pods(client)
print("RESULT " + json.dumps(result))
"""


@pytest.mark.containerd
@pytest.mark.root
@pytest.mark.skipif(lab_containerd._fixture.skip_reason() is not None, reason="needs root and containerd")
@needs_cni
def test_the_runc_series_runs_whole_on_the_real_containerd(tmp_path: Path) -> None:
    """cri_bench.warm_up and measure with runc and 3 pods, on containerd 1.6's CRI plugin with CNI's bridge:
    every pod Ready, its three calls timed, its own shim found by `-id` in /proc, the shim tree's threads,
    RSS and PSS measured (the pause and the sleep container are in runc's tree), nothing left after."""
    out = run_in_private_namespaces(tmp_path, BENCH_RUNC, VERSIONS[0].values[0], bench=str(LAB / "bench"))
    result = json.loads(out.split("RESULT ", 1)[1])
    assert (result["ready"], result["pods"], result["failures"]) == (3, 3, []), result["failures"]
    assert result["shim_problems"] == [] and result["leftovers"] == {} and result["teardown_errors"] == []
    assert len(result["start_s"]) == 3 and result["p50_s"] <= result["p99_s"]
    for pod in result["per_pod"]:
        assert set(pod["calls_s"]) == set(cri_bench.CALLS) and pod["seconds"] > 0
        # comm is cut to 15 characters; the pause image and the workload both run sleep
        assert pod["processes"].count("sleep") == 2 and pod["processes"][0].startswith("containerd-shim")
        assert pod["rss_kib"] >= pod["pss_kib"] > 0 and pod["threads"] >= 3
    assert len({pod["shim_pid"] for pod in result["per_pod"]}) == 3
    # the unmeasured pod came up and was removed before the measured ones started
    assert result["warm"]["ready"] and result["warm"]["teardown"] == [], result["warm"]
