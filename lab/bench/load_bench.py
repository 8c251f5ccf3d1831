"""Pods started at once and pods side by side: `ctr run -d` x N at the same moment, then host memory per pod.

Run inside a ONE-vCPU lab VM (`nox -s bench` does; two nested VMs in guest mode at the same time on two vCPUs
of a lab VM break QEMU's TCG: lab/README.md, "The lab VM's own failures"):
    lab/labvm exec --cpus 1 --memory 6G -- .nox/tests/bin/python lab/bench/load_bench.py [--pods 10]
        [--at-once N] [--series kata,kata-template,runc] [--json build/bench/load.json]

For each series (shim_bench.py's: `kata` the shipped configuration, cold boots; `kata-template` the shipped
one with the VM template on, built by one unmeasured `ctr run --rm` first; `runc`), on one private
containerd: N `ctr run -d busybox sleep` started together (one `ctr` process each, released at once), each
pod's wall time until its `ctr` returned and whether it came up; with all N running, every pod's host PSS
(its shim's process tree, smaps_rollup: the built-in VMM's guest RAM is in the shim) and threads; then the
pods are removed and the next series runs. Issue 16's load case: ten cold boots at once on a small host
used to fail all together when the agent's budget was wall time.

Writes JSON and prints a table; no pass/fail threshold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

LAB = Path(__file__).resolve().parents[1]
for where in (LAB, LAB / "bench"):
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))

from framework import in_labvm  # noqa: E402
from framework.containerd import (  # noqa: E402
    BUSYBOX_IMAGE,
    PrivateContainerd,
    busybox_containerd,
)
from shim_bench import Series, all_series, ctr_run, log, pod_point  # noqa: E402

START_TIMEOUT = 1800


def start_at_once(ctrd: PrivateContainerd, series: Series, names: list[str]) -> list[dict[str, Any]]:
    """`ctr run -d` of each name, all released together; per pod: seconds until its ctr returned, exit code,
    the end of its stderr."""
    gate = threading.Barrier(len(names))
    results: list[dict[str, Any]] = [{} for _ in names]

    def one(i: int, name: str) -> None:
        argv = ctrd.ctr_argv(
            "run", "-d", "--runtime", series.runtime, *series.options, BUSYBOX_IMAGE, name, "sleep", "100000"
        )
        gate.wait()
        t0 = time.perf_counter()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT, check=False)
            code, err = done.returncode, done.stderr.strip()
        except subprocess.TimeoutExpired:
            code, err = -1, f"ctr did not return in {START_TIMEOUT} s"
        results[i] = {"name": name, "seconds": time.perf_counter() - t0, "code": code, "stderr": err[-400:]}

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def waves(names: list[str], at_once: int) -> list[list[str]]:
    """``names`` in consecutive waves of ``at_once`` (all of them in one wave when 0)."""
    size = at_once if at_once > 0 else max(len(names), 1)
    return [names[i : i + size] for i in range(0, len(names), size)]


def measure(ctrd: PrivateContainerd, series: Series, pods: int, at_once: int = 0) -> dict[str, Any]:
    """One series: N pods, ``at_once`` at a time (0: all at once), their memory while all run, then every
    pod removed."""
    names = [f"load-{series.name}-{i}" for i in range(pods)]
    batches = waves(names, at_once)
    log(f"{series.name}: starting {pods} pods, {len(batches[0])} at once")
    try:
        started = [r for batch in batches for r in start_at_once(ctrd, series, batch)]
        for r in started:
            state = "up" if r["code"] == 0 else f"FAILED ({r['code']}): {r['stderr'].splitlines()[-1:]}"
            log(f"  {r['name']}: {r['seconds']:.1f} s {state}")
        time.sleep(15)  # trio's idle worker threads expire (10 s) before threads are counted
        points = []
        for pid in ctrd.shim_pids(series.shim):
            try:
                points.append(pod_point(1, pid))
            except OSError as err:
                log(f"  shim {pid}: {err}")
        return load_result(pods, started, points, at_once)
    finally:
        for name in names:
            ctrd.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
        for name in names:
            ctrd.ctr("task", "delete", name, check=False, timeout=600)
            ctrd.ctr("container", "delete", name, check=False)


def load_result(
    pods: int, started: list[dict[str, Any]], points: list[dict[str, Any]], at_once: int = 0
) -> dict[str, Any]:
    """One series' record: ``started`` as `start_at_once` returns it (wave after wave of ``at_once``, 0:
    one wave), ``points`` shim_bench's `pod_point` of each pod's shim with all of them running."""
    return {
        "pods": pods,
        "at_once": at_once or pods,
        "up": sum(1 for r in started if r["code"] == 0),
        "seconds": [r["seconds"] for r in started if r["code"] == 0],
        "failures": [r["stderr"] for r in started if r["code"] != 0],
        "shims": len(points),
        "pss_kib": [p["Pss"] for p in points],
        "threads": [p["threads"] for p in points],
        "guest_rss_kib": [p["GuestRSS"] for p in points],
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(result: dict[str, Any]) -> str:
    at_once = {r.get("at_once", r["pods"]) for r in result["series"].values()}
    how = "at once" if at_once <= {result["pods"]} else f"{', '.join(map(str, sorted(at_once)))} at a time"
    lines = [
        f"{result['pods']} pods started {how} (`ctr run -d`) per series, one-vCPU lab VM:",
        "| series | up | start median s | start max s | PSS per pod MiB (median) | threads per pod |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["series"].items():
        seconds = r["seconds"]
        slowest = max(seconds, default=float("nan"))
        lines.append(
            f"| {name} | {r['up']}/{r['pods']} | {_median(seconds):.1f} | {slowest:.1f}"
            f" | {_median(r['pss_kib']) / 1024:.1f} | {_median(r['threads']):.0f} |"
        )
    for name, r in result["series"].items():
        lines.extend(f"{name} failure: {f}" for f in r["failures"][:3])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, default=10, help="pods started at once per series")
    p.add_argument("--series", default="kata,kata-template,runc", help="shim_bench.py's series names")
    p.add_argument(
        "--at-once", type=int, default=0, help="start the pods in waves of this many (default: all at once)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if not in_labvm():
        print("load_bench runs inside the lab VM (lab/labvm exec --cpus 1 -- ...)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        known = all_series(Path(tmp))
        try:
            order = [known[n] for n in args.series.split(",") if n]
        except KeyError as err:
            print(f"unknown series {err}; known: {', '.join(known)}", file=sys.stderr)
            return 2
        result: dict[str, Any] = {"pods": args.pods, "series": {}}
        with busybox_containerd(Path(tmp), debug=False) as ctrd:
            for series in order:
                if series.name == "kata-template":  # build the template before the pods that restore it
                    built = ctr_run(ctrd, series, "--rm", BUSYBOX_IMAGE, "tpl-build", "true")
                    log(f"kata-template: template built by a first run in {built:.1f} s")
                result["series"][series.name] = measure(ctrd, series, args.pods, args.at_once)
    result["total_s"] = time.monotonic() - t0
    print(report(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    log(f"done in {result['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
