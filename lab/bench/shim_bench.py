"""containerd-shim-kata-v2 against runc on one containerd: `ctr run --rm` time, threads and memory per pod.

Run inside the lab VM (`nox -s bench` does):
    lab/labvm exec -- .nox/tests/bin/python lab/bench/shim_bench.py [--runs 10] [--pod 1,10,50]
        [--series runc,kata,kata-template,qemu] [--json build/bench/shim.json]

One private containerd 1.6 (lab/framework/containerd.py) with both runtimes and the busybox OCI image; the
kata series differ only in the configuration the same shim reads (`ctr run --runtime-config-path`): `kata`
the shipped one (built-in VMM, cold boot), `kata-template` the shipped one with the VM template on
(lab/framework/configs.py; its warm-up run builds the template), `qemu` upstream's qemu configuration
(QEMU + virtiofsd, same guest kernel and image):

1. `ctr run --rm IMAGE id true`, the `--series` alternating (`--runs` each; the order rotates each round),
   after one unmeasured warm-up run of each. Wall time of the whole `ctr` command: for kata that is shim
   start, VM boot (or restore), agent, container, exit, VM stop and cleanup.
2. One pod per runtime and configuration (`--pods`): `ctr run -d` of a `sleep` container, then more
   containers into the same pod (CRI sandbox annotations, so every runtime puts them in one shim) up to each
   `--pod` size. At each size, over the shim's process tree (the shim; runc's containers; QEMU and
   virtiofsd): OS threads (kata: after trio's idle worker threads expired) and their names, PSS, and the
   shim's VmRSS and VmHWM; and how long each added container took. The built-in VMM is in-process, so the
   kata shim's memory includes the guest memory the VM touched; the report splits out the resident guest RAM
   (from /proc/PID/smaps).

Prints a report and writes everything as JSON (every run's seconds, not only their statistics:
lab/bench/report.py plots them); no pass/fail threshold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAB = Path(__file__).resolve().parents[1]
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))

from framework import in_labvm  # noqa: E402
from framework.configs import qemu_config, shipped_memory_mib, template_config  # noqa: E402
from framework.containerd import (  # noqa: E402
    BUSYBOX_IMAGE,
    KATA_RUNTIME,
    ContainerdError,
    PrivateContainerd,
    busybox_containerd,
    processes_below,
    thread_names,
)

from kata_shim.shim._zygote import zygotes_in  # noqa: E402

RUNC_RUNTIME = "io.containerd.runc.v2"
SHIM_BINARIES = {KATA_RUNTIME: "containerd-shim-kata-v2", RUNC_RUNTIME: "containerd-shim-runc-v2"}
TRIO_IDLE_WORKER_S = 12  # trio's cached worker threads exit after 10 s idle
GUEST_RAM_MIN_KIB = 64 * 1024


def log(msg: str) -> None:
    print(f"[shim-bench] {msg}", file=sys.stderr, flush=True)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, the resident part of its guest RAM mappings (``GuestRSS``) and its
    proportional set size (``Pss``, from smaps_rollup), in KiB.

    Guest RAM is what kata-vmm maps for the VM: memfd regions named ``kata-vmm-ram-*`` or anonymous
    mappings of at least GUEST_RAM_MIN_KIB (nothing else in the shim maps that much in one piece).
    """
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    guest = 0
    is_guest = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            start, _, end = fields[0].partition("-")
            size_kib = (int(end, 16) - int(start, 16)) // 1024
            path = fields[5] if len(fields) > 5 else ""
            is_guest = "kata-vmm-ram-" in path or (not path and size_kib >= GUEST_RAM_MIN_KIB)
        elif fields[0] == "Rss:" and is_guest:
            guest += int(fields[1])
    out["GuestRSS"] = guest
    # proportional set size: shared pages (libraries, page cache of a template's memory) split among users
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Pss":
            out["Pss"] = int(value.split()[0])
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "min": min(samples),
        "median": statistics.median(samples),
        "max": max(samples),
        "mean": statistics.fmean(samples),
    }


@dataclass(frozen=True)
class Series:
    """One measured runtime: its key in the results, the containerd runtime, its shim binary, and the
    `ctr run` options that pick its configuration."""

    name: str
    runtime: str
    options: tuple[str, ...] = ()

    @property
    def shim(self) -> str:
        return SHIM_BINARIES[self.runtime]


def all_series(config_dir: Path) -> dict[str, Series]:
    """Every series shim_bench knows, their configurations written under ``config_dir``."""
    (config_dir / "qemu").mkdir()
    (config_dir / "template").mkdir()
    template, _ = template_config(config_dir / "template")
    # the same guest memory as the shipped (dragonball) configuration: PSS per pod compares like with like
    qemu = qemu_config(config_dir / "qemu", memory_mib=shipped_memory_mib())
    return {
        "runc": Series("runc", RUNC_RUNTIME),
        "kata": Series("kata", KATA_RUNTIME),
        "kata-template": Series("kata-template", KATA_RUNTIME, ("--runtime-config-path", str(template))),
        "qemu": Series("qemu", KATA_RUNTIME, ("--runtime-config-path", str(qemu))),
    }


def ctr_run(ctrd: PrivateContainerd, series: Series, *args: str) -> float:
    """Run `ctr run --runtime RUNTIME [OPTIONS] ARGS`; its wall time, raising with the output if it failed."""
    t0 = time.perf_counter()
    ctrd.ctr("run", "--runtime", series.runtime, *series.options, *args, timeout=900)
    return time.perf_counter() - t0


def run_rm_series(ctrd: PrivateContainerd, runs: int, order: list[Series]) -> dict[str, Any]:
    """`ctr run --rm ... true` of each series in turn, the order rotating each round; a failed run is
    recorded with its error and the series goes on."""
    for series in order:
        wall = ctr_run(ctrd, series, "--rm", BUSYBOX_IMAGE, f"warm-{series.name}", "true")
        log(f"warm-up {series.name}: {wall:.2f} s")
    times: dict[str, list[float]] = {s.name: [] for s in order}
    failures: dict[str, list[str]] = {s.name: [] for s in order}
    for i in range(runs):
        for series in order[i % len(order) :] + order[: i % len(order)]:
            name = series.name
            try:
                wall = ctr_run(ctrd, series, "--rm", BUSYBOX_IMAGE, f"rm-{name}-{i}", "true")
            except ContainerdError as err:
                first = str(err).splitlines()
                failures[name].append(next((line for line in first if line.startswith("stderr:")), first[0]))
                log(f"run {i + 1}/{runs} {name}: FAILED {failures[name][-1]}")
                continue
            times[name].append(wall)
            log(f"run {i + 1}/{runs} {name}: {wall:.2f} s")
    return run_rm_result(runs, times, failures)


def run_rm_result(runs: int, times: dict[str, list[float]], failures: dict[str, list[str]]) -> dict[str, Any]:
    """The `run_rm` record: every run's wall seconds per runtime (the raw samples), failures, statistics;
    the ratio is None when a runtime has no successful run."""
    stats = {name: summary(samples) for name, samples in times.items() if samples}
    ratio = None
    if "kata" in stats and "runc" in stats:
        ratio = stats["kata"]["median"] / stats["runc"]["median"]
    ratios = {
        f"{name}/runc": st["median"] / stats["runc"]["median"]
        for name, st in stats.items()
        if name != "runc" and "runc" in stats
    }
    if "kata" in stats and "qemu" in stats:
        ratios["kata/qemu"] = stats["kata"]["median"] / stats["qemu"]["median"]
    return {
        "runs": runs,
        "seconds": times,
        "failures": failures,
        "stats": stats,
        "median_ratio_kata_over_runc": ratio,
        "median_ratios": ratios,
    }


def pod_series(ctrd: PrivateContainerd, series: Series, sizes: list[int]) -> dict[str, Any]:
    """Grow one pod of ``series`` to each size in ``sizes``; its process tree's threads and memory at each."""
    name = series.name
    sandbox = f"pod-{name}"
    members = [sandbox]
    add_times: list[float] = []
    points = []
    pod_args = [
        "--annotation", "io.kubernetes.cri.container-type=container",
        "--annotation", f"io.kubernetes.cri.sandbox-id={sandbox}",
    ]  # fmt: skip
    try:
        first = ctr_run(ctrd, series, "-d", BUSYBOX_IMAGE, sandbox, "sleep", "100000")
        log(f"{name} pod: first container {first:.2f} s")
        shims = ctrd.shim_pids(series.shim)
        if len(shims) != 1:
            raise RuntimeError(f"expected one {name} shim, found {shims}")
        pid = shims[0]
        for size in sizes:
            while len(members) < size:
                cid = f"{sandbox}-c{len(members) + 1}"
                add_times.append(
                    ctr_run(ctrd, series, "-d", *pod_args, BUSYBOX_IMAGE, cid, "sleep", "100000")
                )
                members.append(cid)
            if ctrd.shim_pids(series.shim) != [pid]:
                raise RuntimeError(f"{name}: later containers did not reuse the pod's shim")
            if series.runtime == KATA_RUNTIME:
                time.sleep(TRIO_IDLE_WORKER_S)
            point = pod_point(size, pid)
            points.append(point)
            log(
                f"{name} pod with {size} containers: {point['threads']} threads,"
                f" VmRSS {point['VmRSS'] / 1024:.1f} MiB"
            )
    finally:
        for cid in reversed(members):
            ctrd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
            ctrd.ctr("task", "delete", cid, check=False, timeout=300)
            ctrd.ctr("container", "delete", cid, check=False)
    return pod_result(first, add_times, points)


def pod_point(size: int, pid: int) -> dict[str, Any]:
    """With ``size`` containers in the pod of shim ``pid``: the threads and PSS of the shim's process tree
    (runc's containers, QEMU and virtiofsd are in it; the built-in VMM's guest is in the shim), the shim's
    own memory (VmRSS, VmHWM, guest RAM) and the tree's summed VmRSS (``TreeRss``: shared pages counted in
    every member, unlike PSS)."""
    tree = processes_below(pid)
    names: list[str] = []
    pss = rss = 0
    for member, _ in tree:
        with contextlib.suppress(OSError):
            names += thread_names(member)
            kib = memory_kib(member)
            pss += kib.get("Pss", 0)  # a zombie member has neither
            rss += kib.get("VmRSS", 0)
    own = memory_kib(pid)
    return {
        "containers": size,
        "threads": len(names),
        "thread_names": names,
        "processes": [comm for _, comm in tree],
        **own,
        "ShimPss": own["Pss"],
        "Pss": pss,
        "TreeRss": rss,
    }


def pod_result(first: float, add_times: list[float], points: list[dict[str, Any]]) -> dict[str, Any]:
    """One runtime's `pods` record: the first container's seconds, every added container's, each point."""
    return {
        "first_container_s": first,
        "add_container_s": summary(add_times) if add_times else None,
        "add_container_samples_s": add_times,
        "points": points,
    }


def report(result: dict[str, Any]) -> str:
    rm = result["run_rm"]
    lines = [f"ctr run --rm {BUSYBOX_IMAGE} id true, {rm['runs']} alternating runs each (wall seconds):"]
    for name, st in rm["stats"].items():
        lines.append(
            f"  {name:5} min {st['min']:7.2f}  median {st['median']:7.2f}  max {st['max']:7.2f}"
            f"  all {' '.join(f'{s:.2f}' for s in rm['seconds'][name])}"
        )
    if rm["median_ratio_kata_over_runc"] is not None:
        lines.append(f"  median ratio kata/runc: {rm['median_ratio_kata_over_runc']:.1f}x")
    for name, errors in rm["failures"].items():
        lines.extend(f"  {name} run FAILED: {error}" for error in errors)
    for name, pod in result["pods"].items():
        add = pod["add_container_s"]
        added = f", later containers median {add['median']:.2f} s (max {add['max']:.2f})" if add else ""
        lines.append(f"{name} pod: first container {pod['first_container_s']:.2f} s{added}")
        for point in pod["points"]:
            lines.append(
                f"  {point['containers']:3} containers: {point['threads']:3} threads,"
                f" VmRSS {point['VmRSS'] / 1024:7.1f} MiB, VmHWM {point['VmHWM'] / 1024:7.1f} MiB,"
                f" of which guest RAM {point['GuestRSS'] / 1024:7.1f} MiB"
                + (f", PSS {point['Pss'] / 1024:7.1f} MiB" if "Pss" in point else "")
            )
        if name != "runc" and pod["points"]:
            last = pod["points"][-1]
            lines.append(f"  {name} threads at {last['containers']}: {last['thread_names']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10, help="measured `ctr run --rm` per runtime")
    p.add_argument("--pod", default="1,10,50", help="pod sizes to measure threads and memory at")
    p.add_argument("--series", default="runc,kata,kata-template,qemu", help="runtimes/configurations of 1.")
    p.add_argument("--pods", default="runc,kata,qemu", help="runtimes/configurations of 2.")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--zygote",
        choices=("on", "off"),
        default="on",
        help="kata shims forked by a zygote of this run's (the first one execs and leaves it), or all exec'd",
    )
    args = p.parse_args(argv)
    if not in_labvm():
        print("shim_bench runs inside the lab VM (lab/labvm exec -- ...)", file=sys.stderr)
        return 2
    sizes = sorted({int(s) for s in args.pod.split(",")})
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shim-bench-") as tmp:
        known = all_series(Path(tmp))
        try:
            order = [known[n] for n in args.series.split(",") if n]
            pods = [known[n] for n in args.pods.split(",") if n]
        except KeyError as err:
            print(f"unknown series {err}; known: {', '.join(known)}", file=sys.stderr)
            return 2
        zygote_dir = None if args.zygote == "on" else "off"
        with zygotes_in(zygote_dir), busybox_containerd(Path(tmp), debug=False) as ctrd:
            result: dict[str, Any] = {
                "host": {"cpus": os.cpu_count(), "kernel": os.uname().release},
                "zygote": args.zygote,
                "run_rm": run_rm_series(ctrd, args.runs, order),
                "pods": {series.name: pod_series(ctrd, series, sizes) for series in pods},
            }
    result["total_s"] = time.monotonic() - t0
    text = report(result)
    print(text, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    log(f"done in {result['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
