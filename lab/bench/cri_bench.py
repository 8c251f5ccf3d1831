"""Pods started at once through containerd's CRI plugin, kata against runc (issue 18).

Run inside a ONE-vCPU lab VM with room for ten guests (`nox -s bench` does; several nested VMs in guest mode
at once on two lab vCPUs break QEMU's TCG: lab/README.md):
    lab/labvm exec --cpus 1 --memory 6G -- .nox/tests/bin/python lab/bench/cri_bench.py [--pods 10]
        [--series runc,kata-template,kata] [--json build/bench/cri.json]

One private containerd 1.6 with its CRI plugin and CNI's bridge (framework.cri_pods.open_cri_lab, the set-up
test_cri_lab runs on), three RuntimeClass handlers: `runc`; `kata-template`, the shipped configuration with
the VM template on (framework.configs.template_config, a ConfigPath of its own); `kata`, the shipped
configuration (cold boots). Each series first runs one unmeasured pod (for kata-template it builds the
template; for the others it warms the caches the first pod would otherwise pay for), then N pods released at
the same moment (one thread each, a barrier), each as the kubelet starts a pod: RunPodSandbox ->
CreateContainer (busybox `sleep`) -> StartContainer -> ContainerStatus RUNNING and PodSandboxStatus READY.
Per pod: each call's wall seconds, their sum (the start time), whether it got Ready, else which call failed
and containerd's error. Cold kata boots may fail to get Ready (ten guest boots at once on one emulated vCPU):
they are counted and their errors kept, never hidden. With every pod running: one shim per pod (its `-id` is
the pod's id), and each pod's shim process tree's threads, summed RSS and PSS (the built-in VMM's guest RAM
is in our shim). Then StopPodSandbox + RemovePodSandbox of every pod, and nothing may be left (no shim,
mount, netns, bridge port, tap, /run/kata state: test_cri_lab's `leftovers`).

Writes JSON (every pod's numbers, not only the statistics: lab/bench/report.py plots them) and prints a table:
start p50/p99 per series, the ratios kata-template/runc and kata/runc, threads and RSS per pod. Progress goes
to stderr. Exit 1 when a series other than cold kata had a pod that did not get Ready, a pod's shim was not
its own, or something was left behind; the JSON is written either way. No time threshold.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAB = Path(__file__).resolve().parents[1]
for where in (LAB, LAB / "bench"):
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))

from framework import in_labvm  # noqa: E402
from framework._gen.cri import api_pb2  # noqa: E402
from framework.containerd import BUSYBOX_IMAGE, SHIM_BINARY, keep_log  # noqa: E402
from framework.cri import (  # noqa: E402
    KATA_HANDLER,
    RUNC_HANDLER,
    CriClient,
    CriError,
    container_config,
    netns_names,
    pod_sandbox_config,
)
from framework.cri_pods import (  # noqa: E402
    SHIMS,
    CriLab,
    eventually,
    leftovers,
    open_cri_lab,
    remove_all_pods,
    shim_id,
)
from shim_bench import TRIO_IDLE_WORKER_S, pod_point  # noqa: E402

TEMPLATE_HANDLER = "kata-template"
# a container's way from StartContainer to RUNNING, and a removed pod's way out (VM teardown under TCG)
READY_TIMEOUT = 600.0
CLEAN_TIMEOUT = 300.0
NAMESPACE = "cri-bench"
CALLS = ("RunPodSandbox", "CreateContainer", "StartContainer")
# errors are kept whole up to this many characters, else their start and their end (the cause is at the end
# of containerd's wrapped errors)
ERROR_CHARS = 800


def log(msg: str) -> None:
    print(f"[cri-bench] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Series:
    """One measured runtime: its key in the results, the CRI runtime handler, the shim binary serving it."""

    name: str
    handler: str

    @property
    def shim(self) -> str:
        return SHIMS.get(self.handler, SHIM_BINARY)


SERIES = {
    "runc": Series("runc", RUNC_HANDLER),
    "kata-template": Series("kata-template", TEMPLATE_HANDLER),
    "kata": Series("kata", KATA_HANDLER),
}
# a series whose pods may fail to get Ready without failing the bench (recorded all the same)
MAY_FAIL = {"kata"}


# -- statistics (host-tested in lab/tests/test_cri_bench.py) ----------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear between the closest ranks (numpy's default):
    the median for 50, the largest value for 100; NaN when there is no value."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def short_error(text: str, limit: int = ERROR_CHARS) -> str:
    """``text`` whole when short enough, else its start and its end around " ... "."""
    if len(text) <= limit:
        return text
    head = limit // 4
    return f"{text[:head]} ... {text[-(limit - head - 5) :]}"


def pod_record(name: str) -> dict[str, Any]:
    """A pod's record before its first call: filled in by `start_pod`, then by `shim_points`."""
    return {
        "name": name,
        "pod_id": "",
        "container_id": "",
        "calls_s": {},
        "seconds": None,
        "running_s": None,
        "ready": False,
        "failed_call": "",
        "error": "",
    }


def one_shim_per_pod(
    started: Iterable[dict[str, Any]], shims: dict[int, str]
) -> tuple[dict[str, int], list[str]]:
    """Which shim serves each pod that has a sandbox (pod id -> pid), and what is wrong: a pod with no shim
    or with several, a shim whose `-id` is no pod of the series. ``shims``: pid -> argv of the series' shims
    that were not there before it (`PrivateContainerd.shim_argvs`)."""
    by_id: dict[str, list[int]] = {}
    for pid, argv in sorted(shims.items()):
        by_id.setdefault(shim_id(argv), []).append(pid)
    owners, problems = {}, []
    pods = [r for r in started if r["pod_id"]]
    for r in pods:
        pids = by_id.pop(r["pod_id"], [])
        if len(pids) == 1:
            owners[r["pod_id"]] = pids[0]
        else:
            problems.append(f"{r['name']}: {len(pids)} shims {pids}")
    for sid, pids in by_id.items():
        problems.append(f"shim(s) {pids} with -id {sid!r} serve no pod of the series")
    return owners, problems


def series_result(
    series: Series,
    pods: int,
    started: list[dict[str, Any]],
    *,
    shim_problems: list[str],
    left: dict[str, object],
    teardown_errors: list[str],
    orphans: Sequence[str] = (),
) -> dict[str, Any]:
    """One series' record from its pods' records (`pod_record`, filled): the start seconds of the pods that
    got Ready and their p50/p99, every failure with its call and error, the per-pod threads, RSS and PSS of
    the Ready pods' shims, what the shim check and the leftovers check found, the failed teardown calls and
    the pods still listed after their removal (``orphans``)."""
    ready = [r for r in started if r["ready"]]
    seconds = [float(r["seconds"]) for r in ready]
    measured = [r for r in ready if "threads" in r]
    return {
        "handler": series.handler,
        "shim": series.shim,
        "pods": pods,
        "ready": len(ready),
        "start_s": seconds,
        "p50_s": percentile(seconds, 50),
        "p99_s": percentile(seconds, 99),
        "calls_p50_s": {c: percentile([r["calls_s"][c] for r in ready], 50) for c in CALLS},
        "failures": [
            {"name": r["name"], "call": r["failed_call"], "error": r["error"]}
            for r in started
            if not r["ready"]
        ],
        "threads": [r["threads"] for r in measured],
        "rss_kib": [r["rss_kib"] for r in measured],
        "pss_kib": [r["pss_kib"] for r in measured],
        "guest_rss_kib": [r["guest_rss_kib"] for r in measured],
        "shim_problems": shim_problems,
        "leftovers": {k: v for k, v in left.items() if v},
        "teardown_errors": teardown_errors,
        "orphans": list(orphans),
        "per_pod": started,
    }


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ratios(series: dict[str, dict[str, Any]], peer: str = "runc") -> dict[str, dict[str, float]]:
    """``<name>/<peer>`` for every other series with Ready pods: start p50 and p99, and the medians per pod
    of threads, RSS and PSS (NaN where one side has no sample)."""
    if peer not in series or not series[peer]["start_s"]:
        return {}
    base = series[peer]
    out = {}
    for name, r in series.items():
        if name == peer or not r["start_s"]:
            continue
        out[f"{name}/{peer}"] = {
            "p50": r["p50_s"] / base["p50_s"],
            "p99": r["p99_s"] / base["p99_s"],
            "threads": _median(r["threads"]) / _median(base["threads"]),
            "rss": _median(r["rss_kib"]) / _median(base["rss_kib"]),
            "pss": _median(r["pss_kib"]) / _median(base["pss_kib"]),
        }
    return out


def problems(result: dict[str, Any]) -> list[str]:
    """Why the run fails: a pod not Ready outside `MAY_FAIL`, a shim not the pod's own, anything left."""
    out = []
    for name, r in result["series"].items():
        if name not in MAY_FAIL and r["ready"] != r["pods"]:
            out.append(f"{name}: {r['ready']}/{r['pods']} pods Ready")
        out += [f"{name}: {p}" for p in r["shim_problems"]]
        if r["leftovers"]:
            out.append(f"{name}: left behind {r['leftovers']}")
    return out


def report(result: dict[str, Any]) -> str:
    """The printed table: start p50/p99, Ready count, threads/RSS/PSS per pod per series; the ratios; the
    failures (first three per series) and the problems."""
    lines = [
        f"{result['pods']} pods started at once through CRI (RunPodSandbox + CreateContainer +"
        f" StartContainer), containerd {result['containerd']}, one-vCPU lab VM:",
        "| series | Ready | start p50 s | start p99 s | threads per pod | RSS per pod MiB"
        " | PSS per pod MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["series"].items():
        lines.append(
            f"| {name} | {r['ready']}/{r['pods']} | {r['p50_s']:.1f} | {r['p99_s']:.1f}"
            f" | {_median(r['threads']):.0f} | {_median(r['rss_kib']) / 1024:.1f}"
            f" | {_median(r['pss_kib']) / 1024:.1f} |"
        )
    for pair, ratio in result["ratios"].items():
        lines.append(
            f"{pair}: start p50 {ratio['p50']:.2f}x, p99 {ratio['p99']:.2f}x; per pod threads"
            f" {ratio['threads']:.2f}x, RSS {ratio['rss']:.2f}x, PSS {ratio['pss']:.2f}x"
        )
    for name, r in result["series"].items():
        lines.extend(f"{name} failure: {f['name']} {f['call']}: {f['error']}" for f in r["failures"][:3])
        lines.extend(f"{name} teardown: {e}" for e in r["teardown_errors"][:3])
        if r["orphans"]:
            lines.append(f"{name}: pods listed after their removal (then removed): {r['orphans']}")
    lines.extend(f"PROBLEM {p}" for p in problems(result))
    return "\n".join(lines)


# -- the lab part -------------------------------------------------------------------------------------------


def start_pod(
    client: CriClient, handler: str, record: dict[str, Any], logs: Path, gate: Callable[[], Any]
) -> None:
    """The kubelet's start of one pod with ``handler``, after ``gate`` returns; fills ``record``."""
    name = record["name"]
    (logs / name).mkdir(parents=True, exist_ok=True)  # the kubelet makes the pod's log directory
    pod = pod_sandbox_config(name, namespace=NAMESPACE, log_directory=str(logs / name))
    config = container_config("sleep", BUSYBOX_IMAGE, ["sleep", "100000"], log_path="sleep/0.log")
    gate()
    t0 = time.perf_counter()
    call = CALLS[0]
    try:

        def timed(method: str, run: Callable[[], Any]) -> Any:
            nonlocal call
            call, begun = method, time.perf_counter()
            answer = run()
            record["calls_s"][method] = time.perf_counter() - begun
            return answer

        record["pod_id"] = timed(CALLS[0], lambda: client.run_pod_sandbox(pod, runtime_handler=handler))
        cid = timed(CALLS[1], lambda: client.create_container(record["pod_id"], config, pod))
        record["container_id"] = cid
        timed(CALLS[2], lambda: client.start_container(cid))
        record["seconds"] = time.perf_counter() - t0
        call = "ContainerStatus"

        def ready() -> bool:
            running = client.container_status(cid).state == api_pb2.CONTAINER_RUNNING
            return (
                running and client.pod_sandbox_status(record["pod_id"]).status.state == api_pb2.SANDBOX_READY
            )

        if eventually(ready, READY_TIMEOUT):
            record["running_s"] = time.perf_counter() - t0
            record["ready"] = True
        else:
            record["failed_call"] = call
            record["error"] = f"not RUNNING and READY {READY_TIMEOUT:.0f} s after StartContainer"
    except CriError as err:
        record["failed_call"] = call
        record["error"] = short_error(str(err))
    except Exception as err:  # the thread's record must say what happened, whatever it was
        record["failed_call"] = call
        record["error"] = short_error(f"{type(err).__name__}: {err}")


def start_at_once(client: CriClient, series: Series, names: list[str], logs: Path) -> list[dict[str, Any]]:
    """`start_pod` of every name, one thread each, all released together."""
    barrier = threading.Barrier(len(names))
    records = [pod_record(n) for n in names]
    threads = [
        threading.Thread(
            target=start_pod, args=(client, series.handler, r, logs, barrier.wait), name=r["name"]
        )
        for r in records
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def shim_points(lab: CriLab, series: Series, started: list[dict[str, Any]], before: list[int]) -> list[str]:
    """With every pod running: check one shim per pod and add its process tree's threads, RSS and PSS to each
    Ready pod's record; the problems found."""
    shims = {pid: argv for pid, argv in lab.ctrd.shim_argvs(series.shim).items() if pid not in before}
    owners, found = one_shim_per_pod(started, shims)
    for r in started:
        pid = owners.get(r["pod_id"])
        if not r["ready"] or pid is None:
            continue
        try:
            point = pod_point(1, pid)
        except OSError as err:
            found.append(f"{r['name']}: shim {pid} not measured: {err}")
            continue
        r.update(shim_pid=pid, **point_fields(point))
    return found


def point_fields(point: dict[str, Any]) -> dict[str, Any]:
    """What a pod's record keeps of shim_bench's `pod_point` of its shim: the tree's threads, summed RSS and
    PSS, the guest RAM resident in the shim, the tree's process names."""
    return {
        "threads": point["threads"],
        "rss_kib": point["TreeRss"],
        "pss_kib": point["Pss"],
        "guest_rss_kib": point["GuestRSS"],
        "processes": point["processes"],
    }


def remove_pods(client: CriClient, started: list[dict[str, Any]]) -> list[str]:
    """StopPodSandbox and RemovePodSandbox of every pod that has a sandbox; the calls that failed."""
    errors = []
    for r in started:
        if not r["pod_id"]:
            continue
        for call in (client.stop_pod_sandbox, client.remove_pod_sandbox):
            try:
                call(r["pod_id"])
            except CriError as err:
                errors.append(f"{r['name']}: {short_error(str(err))}")
    return errors


def warm_up(lab: CriLab, series: Series) -> dict[str, Any]:
    """One unmeasured pod of ``series`` started and removed (for kata-template: the template is built)."""
    record = pod_record(f"warm-{series.name}")
    start_pod(lab.client, series.handler, record, lab.tmp / "logs", lambda: None)
    errors = remove_pods(lab.client, [record])
    state = (
        f"{record['seconds']:.1f} s"
        if record["ready"]
        else f"FAILED {record['failed_call']}: {record['error']}"
    )
    log(f"{series.name}: warm-up pod {state}")
    return {
        "seconds": record["seconds"],
        "ready": record["ready"],
        "error": record["error"],
        "teardown": errors,
    }


def measure(lab: CriLab, series: Series, pods: int) -> dict[str, Any]:
    """One series: N pods at once, their shims while all run, every pod removed and nothing left."""
    names = [f"{series.name}-{i}" for i in range(pods)]
    netns_before = netns_names()
    shims_before = lab.ctrd.shim_pids(series.shim)
    log(f"{series.name}: starting {pods} pods at once")
    started = start_at_once(lab.client, series, names, lab.tmp / "logs")
    for r in started:
        state = "Ready" if r["ready"] else f"FAILED in {r['failed_call']}: {r['error']}"
        took = f"{r['seconds']:.1f} s" if r["seconds"] is not None else "-"
        log(f"  {r['name']}: {took} {state}")
    time.sleep(TRIO_IDLE_WORKER_S)  # trio's idle worker threads expire before threads are counted
    shim_problems = shim_points(lab, series, started, shims_before)
    pod_netns = netns_names() - netns_before
    log(f"{series.name}: removing the pods")
    teardown_errors = remove_pods(lab.client, started)
    ids = [r["pod_id"] for r in started if r["pod_id"]]
    # a pod whose RunPodSandbox the client gave up on (its deadline) may exist all the same: recorded, then
    # removed as the kubelet's garbage collector would, before the leftovers check
    try:
        stray = lab.client.list_pod_sandbox()
    except CriError as err:
        stray, teardown_errors = [], [*teardown_errors, f"ListPodSandbox: {short_error(str(err))}"]
    orphans = [f"{pod.metadata.name} ({pod.id[:12]})" for pod in stray]
    if orphans:
        log(f"{series.name}: pods still listed after the removal: {orphans}")
        ids += [pod.id for pod in stray]
        remove_all_pods(lab.client)

    def left() -> dict[str, object]:
        return leftovers(lab, ids, pod_netns, shims_before, series.shim)

    eventually(lambda: not any(left().values()), CLEAN_TIMEOUT)
    remaining = left()
    result = series_result(
        series,
        pods,
        started,
        shim_problems=shim_problems,
        left=remaining,
        teardown_errors=teardown_errors,
        orphans=orphans,
    )
    p50, p99 = result["p50_s"], result["p99_s"]
    log(f"{series.name}: {result['ready']}/{pods} Ready, p50 {p50:.1f} s, p99 {p99:.1f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, default=10, help="pods started at once per series")
    p.add_argument("--series", default="runc,kata-template,kata", help=f"of {', '.join(SERIES)}")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if not in_labvm():
        print(
            "cri_bench runs inside the lab VM (lab/labvm exec --cpus 1 --memory 6G -- ...)", file=sys.stderr
        )
        return 2
    try:
        order = [SERIES[n] for n in args.series.split(",") if n]
    except KeyError as err:
        print(f"unknown series {err}; known: {', '.join(SERIES)}", file=sys.stderr)
        return 2
    from framework.configs import template_config

    t0 = time.monotonic()
    result: dict[str, Any] = {"pods": args.pods, "containerd": "1.6", "warm_up": {}, "series": {}}
    with tempfile.TemporaryDirectory(prefix="cri-bench-") as tmp:
        (Path(tmp) / "template").mkdir()
        template, _ = template_config(Path(tmp) / "template")
        lab_dir = Path(tmp) / "lab"
        lab_dir.mkdir()
        # not debug: containerd's debug logging is load of its own, which ten pods on one emulated CPU feel
        # (8 of 10 template pods Ready with it, 10 of 10 without, on 2026-12-07)
        with open_cri_lab(lab_dir, extra_kata_handlers={TEMPLATE_HANDLER: template}, debug=False) as lab:
            log(f"CRI ready: {lab.client.version().runtime_version}, handlers {[s.handler for s in order]}")
            if not eventually(lambda: all(ok for ok, _, _ in lab.client.status().values()), 120):
                print(f"CRI not ready: {lab.client.status()}", file=sys.stderr)
                return 1
            try:
                for series in order:
                    result["warm_up"][series.name] = warm_up(lab, series)
                    result["series"][series.name] = measure(lab, series, args.pods)
            finally:
                keep_log(lab.ctrd.log_path)  # every shim's log is in it: build/lab/logs, the newest kept
    result["ratios"] = ratios(result["series"])
    result["problems"] = problems(result)
    result["total_s"] = time.monotonic() - t0
    print(report(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    log(f"done in {result['total_s']:.0f} s")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
