"""The benchmark report: what `nox -s bench` measured, as build/bench/report.md with PNG figures.

    .nox/tests/bin/python lab/bench/report.py [--dir build/bench] [--out DIR]

Reads what each bench step left in ``--dir`` (the shapes are those of the scripts next to this file):

- ``meta.json`` (noxfile's bench session): commit, start and end, /proc/loadavg at both, CPU model, the lab
  VM's accelerator, each step's elapsed time and status;
- ``shim.json`` (shim_bench.py): `ctr run --rm` wall seconds of every run per runtime, the pod's threads and
  memory at each size;
- ``vmm_boot.json`` (vmm_boot.py, one JSON line): every boot to the marker of kata-vmm and each QEMU machine;
- ``virtio_guest.txt`` (pytest output of virtio_guest.py): one ``VIRTIO-BENCH {json}`` line per device;
- ``net.json`` (net_bench.py): each throughput run each way and every round trip, ours and QEMU's;
- ``hotplug.json`` (hotplug_bench.py): every hot-plug cycle's seconds to a usable disk and vCPU (and to its
  removal) on kata-vmm over upcall and on QEMU's ACPI hot-plug, or why a series was not measured;
- ``load.json`` (load_bench.py): per series, N pods started at once: each pod's start seconds, how many came
  up, each pod's PSS and threads with all N running;
- ``cri.json`` (cri_bench.py): per series, N pods started at once through containerd's CRI plugin: each
  pod's RunPodSandbox + CreateContainer + StartContainer seconds, how many got Ready and why the others
  did not, each Ready pod's shim threads, RSS and PSS;
- ``host.json`` (pytest-benchmark): the host micro benchmarks, as a table.

Every figure puts our numbers beside their peer's from the same run, and the markdown gives the ratio of
the medians (ours/peer; whether lower or higher is better is said per figure). An input that is missing or
unreadable, a step that failed, a series with no sample: the report says "not measured: <why>" there and
goes on. Standard library and matplotlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "build" / "bench"
# virtio_guest.py prints its results behind this prefix (the test checks the two agree)
VIRTIO_PREFIX = "VIRTIO-BENCH "
# shim_bench.py's runtime keys, as the report names them (upstream calls our built-in VMM dragonball)
RUNTIME_LABELS = {
    "runc": "runc",
    "kata": "dragonball cold",
    "kata-template": "dragonball template",
    "qemu": "qemu",
}
OURS_COLOR, PEER_COLOR, OTHER_COLOR = "tab:blue", "tab:orange", "tab:gray"


# what reading a well-formed file of the wrong shape raises: reported as "unexpected input", never a crash
BAD_INPUT = (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError)


class Missing(Exception):
    """An input the report needs is absent or unusable; the message says why."""


@dataclass
class Ratio:
    """median(ours) / median(peer) for one pairing in one figure."""

    ours: str
    peer: str
    ours_median: float
    peer_median: float
    where: str = ""  # e.g. "with 10 containers" for a figure over pod sizes

    @property
    def value(self) -> float:
        """The ratio; NaN (printed as nan) when the peer's median is 0."""
        return self.ours_median / self.peer_median if self.peer_median else float("nan")


@dataclass
class Plot:
    """One figure: its data, the ratios it shows, the PNG it was drawn to and the labels read back from it."""

    name: str
    title: str
    unit: str
    lower_is_better: bool
    # distributions: label -> samples; curves: label -> [(x, y), ...] (then ``xlabel`` is set)
    samples: dict[str, list[float]] = field(default_factory=dict)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    xlabel: str = ""
    ours: list[str] = field(default_factory=list)  # which series are ours (the others are peers)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    png: Path | None = None
    labels: list[str] = field(default_factory=list)  # series names as the drawn figure shows them


@dataclass
class NotMeasured:
    """A figure the report could not draw."""

    name: str
    title: str
    why: str


@dataclass
class Report:
    """What `build` produced: the markdown, every figure drawn and every one it could not draw."""

    markdown: str
    plots: list[Plot]
    missing: list[NotMeasured]

    def plot(self, name: str) -> Plot:
        return next(p for p in self.plots if p.name == name)


# -- inputs ------------------------------------------------------------------------------------------------


def _step_why(meta: dict[str, Any], step: str) -> str:
    for s in meta.get("steps", []):
        if s.get("name") == step and s.get("status") != "ok":
            detail = f": {s['detail']}" if s.get("detail") else ""
            return f"the {step} step {s.get('status')} after {s.get('seconds', 0):.0f} s{detail}"
    return ""


def _read_json(bench_dir: Path, name: str, meta: dict[str, Any], step: str) -> Any:
    path = bench_dir / name
    why = _step_why(meta, step)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise Missing(why or f"{name} missing (the {step} step did not run)") from None
    try:
        return json.loads(text)
    except ValueError as err:
        raise Missing(why or f"{name} is not JSON ({err})") from None


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _pair(plot: Plot, ours: str, peer: str, where: str = "") -> None:
    """Add the ratio of ``ours`` to ``peer`` in ``plot`` (both must have samples)."""
    plot.ratios.append(Ratio(ours, peer, _median(plot.samples[ours]), _median(plot.samples[peer]), where))


def start_time_plot(shim: dict[str, Any]) -> Plot:
    """`ctr run --rm` wall time per runtime: runc (the peer), dragonball cold, template, qemu."""
    rm = shim["run_rm"]
    plot = Plot(
        "start_time",
        f"ctr run --rm busybox true, {rm['runs']} alternating runs",
        "s",
        lower_is_better=True,
    )
    for key, seconds in rm["seconds"].items():
        label = RUNTIME_LABELS.get(key, key)
        failed = rm.get("failures", {}).get(key, [])
        if failed:
            plot.notes.append(f"{label}: {len(failed)} run(s) failed, first: {failed[0]}")
        if seconds:
            plot.samples[label] = [float(s) for s in seconds]
            if key != "runc":
                plot.ours.append(label)
        else:
            plot.notes.append(f"{label}: not measured: no run succeeded")
    if "runc" not in plot.samples:
        raise Missing("no successful runc run: nothing to compare with")
    for label in plot.ours:
        _pair(plot, label, "runc")
    if not plot.ours:
        raise Missing("no successful kata run")
    return plot


def _pod_curves(shim: dict[str, Any], metric: str) -> Plot:
    pods = shim["pods"]
    if "runc" not in pods or not any(k != "runc" for k in pods):
        raise Missing(f"pods measured: {sorted(pods)}, need runc and ours")
    if metric == "threads":
        plot = Plot("pod_threads", "shim OS threads per pod", "threads", lower_is_better=True)
    else:
        plot = Plot("pod_memory", "shim memory per pod", "MiB", lower_is_better=True)
    plot.xlabel = "containers in the pod"
    memory_key = "Pss"
    if metric == "memory" and not all("Pss" in pt for pod in pods.values() for pt in pod["points"]):
        memory_key = "VmRSS"  # a shim.json from before shim_bench measured PSS
        plot.notes.append("PSS not in shim.json: VmRSS plotted instead")
    what = "threads" if metric == "threads" else ("PSS" if memory_key == "Pss" else "RSS")
    peer = f"runc {what}"
    for key, pod in pods.items():
        points = pod["points"]
        if not points:
            plot.notes.append(f"{RUNTIME_LABELS.get(key, key)}: not measured: no pod size reached")
            continue
        label = f"{RUNTIME_LABELS.get(key, key).replace(' cold', '')} {what}"
        if metric == "threads":
            plot.curves[label] = [(pt["containers"], pt["threads"]) for pt in points]
        else:
            plot.curves[label] = [(pt["containers"], pt[memory_key] / 1024) for pt in points]
            if key != "runc" and all("GuestRSS" in pt for pt in points):
                # not compared: runc has no guest; shows how much of our shim's memory is the VM's RAM
                plot.curves[f"{label.removesuffix(what)}guest RAM (RSS)"] = [
                    (pt["containers"], pt["GuestRSS"] / 1024) for pt in points
                ]
        if key != "runc":
            plot.ours.append(label)
    if peer not in plot.curves or not plot.ours:
        raise Missing("no pod size measured for runc or for ours")
    for label in plot.ours:
        peer_at = dict(plot.curves[peer])
        for x, y in plot.curves[label]:
            if peer_at.get(x):
                where = f"with {x:g} container{'' if x == 1 else 's'}"
                plot.ratios.append(Ratio(label, peer, y, peer_at[x], where))
    if metric == "memory":
        plot.notes.append(
            "our shim runs the VMM in-process: its memory includes the guest RAM the VM touched"
        )
    return plot


def vmm_boot_plot(boot: dict[str, Any]) -> Plot:
    """Seconds from spawn to the guest's marker, kata-vmm against each QEMU machine type."""
    plot = Plot(
        "vmm_boot",
        f"boot to the marker, {boot['runs']} alternating runs"
        f" ({boot['vcpus']} vCPUs, {boot['memory_mib']} MiB)",
        "s",
        lower_is_better=True,
    )
    for name, runs in boot["results"].items():
        times = [float(r["marker_s"]) for r in runs if isinstance(r.get("marker_s"), int | float)]
        failed = [r for r in runs if r.get("marker_s") is None or r.get("returncode")]
        if failed:
            plot.notes.append(
                f"{name}: {len(failed)} of {len(runs)} run(s) did not reach the marker or exit 0"
            )
        if times:
            plot.samples[name] = times
            if name.startswith("kata-vmm"):
                plot.ours.append(name)
        else:
            plot.notes.append(f"{name}: not measured: no run reached the marker")
    for ours in plot.ours:
        pvh = ours.endswith("-pvh")
        peers = [n for n in plot.samples if n.startswith("qemu") and n.endswith("-pvh") == pvh]
        if peers:  # the faster QEMU machine type is the peer, as vmm_boot.py's own ratio
            _pair(plot, ours, min(peers, key=lambda n: _median(plot.samples[n])))
    if not plot.ratios:
        raise Missing(f"no kata-vmm and QEMU boots to compare (measured: {sorted(plot.samples) or 'none'})")
    return plot


def virtio_plots(text: str) -> dict[str, Plot]:
    """One figure per ``VIRTIO-BENCH`` line: kata-vmm's rate against QEMU's (higher is better)."""
    plots = {}
    for line in text.splitlines():
        if not line.startswith(VIRTIO_PREFIX):
            continue
        record = json.loads(line.removeprefix(VIRTIO_PREFIX))
        name = record["bench"].replace("-", "_")
        plot = Plot(name, f"{record['bench']} {record['workload']}", record["unit"], lower_is_better=False)
        plot.samples = {k: [float(v) for v in vs] for k, vs in record["samples"].items()}
        plot.ours = ["kata-vmm"]
        _pair(plot, "kata-vmm", "qemu")
        plots[name] = plot
    return plots


def _pytest_failures(text: str) -> dict[str, str]:
    """``FAILED path::test - reason`` lines of a pytest run (``-ra``), by test name."""
    failures = {}
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")) and "::" in line:
            test, _, reason = line.split("::", 1)[1].partition(" - ")
            failures[test.strip()] = reason.strip() or line
    return failures


def net_plots(net: dict[str, Any]) -> list[Plot]:
    """Throughput each way and round-trip latency, our tap+tc path against QEMU's virtio-net."""
    absent = [k for k in ("ours", "qemu") if k not in net]
    if absent:
        raise Missing(f"net.json has no {' or '.join(absent)} record")
    ours, qemu = net["ours"], net["qemu"]
    tput = Plot("net_throughput", f"TCP throughput, {net['mib']} MiB per run", "MB/s", lower_is_better=False)
    for key, way in (("guest_to_host_MBps", "guest->host"), ("host_to_guest_MBps", "host->guest")):
        tput.samples[f"ours {way}"] = [float(v) for v in ours[key]]
        tput.samples[f"QEMU {way}"] = [float(v) for v in qemu[key]]
        tput.ours.append(f"ours {way}")
        _pair(tput, f"ours {way}", f"QEMU {way}")
    tput.notes.append(f"QEMU: virtio-net-pci, {net.get('qemu_net', '?')}")
    lat = Plot(
        "net_latency", f"64-byte TCP round trips, {net['rounds']} per guest", "us", lower_is_better=True
    )
    lat.samples = {
        "ours": [float(v) for v in ours["latency_samples_us"]],
        "QEMU": [float(v) for v in qemu["latency_samples_us"]],
    }
    lat.ours = ["ours"]
    _pair(lat, "ours", "QEMU")
    return [tput, lat]


def load_plots(load: dict[str, Any]) -> list[Plot]:
    """N pods started at once: each pod's start time, and its host PSS with all N running, per series."""
    series = load["series"]
    if "runc" not in series:
        raise Missing(f"load.json has no runc series (has {sorted(series)})")
    n = load["pods"]
    start = Plot(
        "load_start", f"{n} pods started at once (ctr run -d), one lab vCPU", "s", lower_is_better=True
    )
    memory = Plot("load_memory", f"host PSS per pod, {n} pods running", "MiB", lower_is_better=True)
    for key, r in series.items():
        label = RUNTIME_LABELS.get(key, key)
        start.notes.append(f"{label}: {r['up']} of {r['pods']} pods came up")
        if r["failures"]:
            start.notes.append(f"{label}: first failure: {r['failures'][0][-200:]}")
        if r["seconds"]:
            start.samples[label] = [float(v) for v in r["seconds"]]
        if r["pss_kib"]:
            memory.samples[label] = [float(v) / 1024 for v in r["pss_kib"]]
        if key != "runc":
            start.ours.append(label)
            memory.ours.append(label)
    for plot in (start, memory):
        plot.ours = [label for label in plot.ours if label in plot.samples]
        if "runc" not in plot.samples or not plot.ours:
            raise Missing(f"{plot.name}: no pod of runc or of ours came up")
        for label in plot.ours:
            _pair(plot, label, "runc")
    memory.notes.append("a pod's PSS: its shim's process tree; the built-in VMM's guest RAM is in the shim")
    return [start, memory]


def cri_plots(cri: dict[str, Any]) -> list[Plot]:
    """N pods started at once through CRI: each Ready pod's start seconds (the three calls), then each one's
    shim threads, and its RSS and PSS, per series; runc is the peer."""
    series = cri["series"]
    if "runc" not in series:
        raise Missing(f"cri.json has no runc series (has {sorted(series)})")
    n = cri["pods"]
    start = Plot(
        "cri_start",
        f"{n} pods started at once through CRI (RunPodSandbox + CreateContainer + StartContainer),"
        " one lab vCPU",
        "s",
        lower_is_better=True,
    )
    threads = Plot(
        "cri_threads", f"shim OS threads per pod, {n} CRI pods running", "threads", lower_is_better=True
    )
    memory = Plot("cri_memory", f"RSS and PSS per pod, {n} CRI pods running", "MiB", lower_is_better=True)
    for key, r in series.items():
        label = RUNTIME_LABELS.get(key, key)
        p50, p99 = r["p50_s"], r["p99_s"]
        start.notes.append(
            f"{label}: {r['ready']} of {r['pods']} pods Ready; start p50 {_fmt(p50)} s, p99 {_fmt(p99)} s"
        )
        for failure in r["failures"][:2]:
            start.notes.append(
                f"{label}: {failure['name']} failed in {failure['call']}: {failure['error'][-300:]}"
            )
        for problem in r["shim_problems"]:
            threads.notes.append(f"{label}: {problem}")
        if r["leftovers"]:
            start.notes.append(f"{label}: left behind after every pod was removed: {r['leftovers']}")
        for error in r.get("teardown_errors", [])[:2]:
            start.notes.append(f"{label}: teardown failed: {error[-300:]}")
        if r.get("orphans"):
            start.notes.append(f"{label}: pods still listed after their removal: {r['orphans']}")
        if r["start_s"]:
            start.samples[label] = [float(v) for v in r["start_s"]]
        if r["threads"]:
            threads.samples[label] = [float(v) for v in r["threads"]]
        if r["rss_kib"]:
            memory.samples[f"{label} RSS"] = [float(v) / 1024 for v in r["rss_kib"]]
            memory.samples[f"{label} PSS"] = [float(v) / 1024 for v in r["pss_kib"]]
        if key != "runc":
            start.ours.append(label)
            threads.ours.append(label)
            memory.ours += [f"{label} RSS", f"{label} PSS"]
    for plot in (start, threads, memory):
        plot.ours = [label for label in plot.ours if label in plot.samples]
        if not any(label.startswith("runc") for label in plot.samples) or not plot.ours:
            raise Missing(f"{plot.name}: no pod of runc or of ours got Ready")
        for label in plot.ours:
            # memory: RSS against runc's RSS, PSS against runc's PSS
            _pair(plot, label, f"runc {label.rsplit(' ', 1)[1]}" if plot is memory else "runc")
    for pair, ratio in cri.get("ratios", {}).items():
        ours, _, peer = pair.partition("/")
        label = RUNTIME_LABELS.get(ours, ours)
        start.notes.append(f"{label}/{peer}: start p99 ratio {ratio['p99']:.2f} (p50 {ratio['p50']:.2f})")
    memory.notes.append(
        "a pod's RSS is summed over its shim's process tree (shared pages counted in each process), its PSS"
        " shares them; the built-in VMM's guest RAM is in our shim"
    )
    return [start, threads, memory]


HOTPLUG_KINDS = {"disk": "disk", "vcpu": "vCPU"}
HOTPLUG_PEERS = {"kata-vmm": "upcall", "qemu": "QEMU"}


def hotplug_plot(hp: dict[str, Any]) -> Plot:
    """Seconds from the hot-plug request to the device usable in the guest, upcall (kata-vmm) against QEMU's
    ACPI hot-plug, disk and vCPU; the ratios of the medians (issue 17's goal: at most ``goal_ratio``)."""
    plot = Plot(
        "hotplug",
        f"hot-plug request to usable in the guest, {hp['runs']} cycles each",
        "s",
        lower_is_better=True,
    )
    backends = hp["backends"]
    why: list[str] = []
    for key, label in HOTPLUG_PEERS.items():
        backend = backends.get(key)
        if backend is None:
            why.append(f"{label}: not run")
        elif backend.get("error"):
            plot.notes.append(f"{label} ({key}) failed: {backend['error'].splitlines()[0][:300]}")
        if backend and backend.get("oops"):
            plot.notes.append(
                f"{label}: the guest logged {backend['oops']} kernel warning(s) while hot-plugging"
            )
    for kind, shown in HOTPLUG_KINDS.items():  # upcall then QEMU, disk then vCPU: each pair side by side
        for key, label in HOTPLUG_PEERS.items():
            if key not in backends:
                continue
            series = backends[key].get(kind) or {}
            name = f"{label} {shown}"
            if series.get("not_measured"):
                plot.notes.append(f"{name}: not measured: {series['not_measured']}")
            samples = [float(v) for v in series.get("add_s", [])]
            if samples:
                plot.samples[name] = samples
                if key == "kata-vmm":
                    plot.ours.append(name)
            elif not series.get("not_measured"):
                plot.notes.append(f"{name}: not measured: no cycle completed")
    goal = float(hp.get("goal_ratio", 0.2))
    for shown in HOTPLUG_KINDS.values():
        ours, peer = f"upcall {shown}", f"QEMU {shown}"
        if ours in plot.samples and peer in plot.samples:
            _pair(plot, ours, peer)
            ratio = plot.ratios[-1].value
            verdict = "met" if ratio <= goal else "not met"
            plot.notes.append(f"{shown}: upcall/QEMU {ratio:.2f}, goal at most {goal:g}: {verdict}")
        else:
            why.append(f"{shown}: no {'upcall' if ours not in plot.samples else 'QEMU'} sample")
    for kind, shown in HOTPLUG_KINDS.items():  # removal: not drawn, its medians said
        medians = {}
        for key, label in HOTPLUG_PEERS.items():
            removed = [float(v) for v in (backends.get(key, {}).get(kind) or {}).get("remove_s", [])]
            if removed:
                medians[label] = _median(removed)
        if len(medians) == 2:
            ratio = medians["upcall"] / medians["QEMU"] if medians["QEMU"] else float("nan")
            plot.notes.append(
                f"{shown} removal, request to gone in the guest: median upcall {_fmt(medians['upcall'])} s,"
                f" QEMU {_fmt(medians['QEMU'])} s (upcall/QEMU {ratio:.2f})"
            )
    if not plot.ratios:
        raise Missing("; ".join(why + [n for n in plot.notes if "failed" in n or "not measured" in n]))
    return plot


# -- drawing -----------------------------------------------------------------------------------------------


def _color(plot: Plot, label: str) -> str:
    if label in plot.ours:
        return OURS_COLOR
    if any(r.peer == label for r in plot.ratios):
        return PEER_COLOR
    return OTHER_COLOR


def draw(plot: Plot, out_dir: Path) -> Figure:
    """Draw ``plot`` to ``out_dir/<name>.png``; fills ``plot.png`` and ``plot.labels`` from the figure."""
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    better = "lower is better" if plot.lower_is_better else "higher is better"
    ratios = "; ".join(f"{r.ours}/{r.peer} {r.where} = {r.value:.2f}".replace("  ", " ") for r in plot.ratios)
    ax.set_title(f"{plot.title}\n{ratios}" if len(plot.ratios) <= 2 else plot.title, fontsize=9)
    ax.set_ylabel(f"{plot.unit} ({better})")
    ax.grid(axis="y", alpha=0.3)
    if plot.samples:
        labels = list(plot.samples)
        data = [plot.samples[k] for k in labels]
        positions = list(range(1, len(labels) + 1))
        box = ax.boxplot(data, positions=positions, tick_labels=labels, widths=0.5, showfliers=False)
        for median in box["medians"]:
            median.set_color("black")
        for pos, label, values in zip(positions, labels, data, strict=True):
            # strip: every sample, spread evenly across the box (no randomness: the figure is reproducible)
            n = len(values)
            xs = [pos + (0.3 * (i / (n - 1) - 0.5) if n > 1 else 0) for i in range(n)]
            ax.scatter(xs, values, s=12 if n < 100 else 3, alpha=0.8 if n < 100 else 0.3,
                       color=_color(plot, label), zorder=3)  # fmt: skip
        if len(labels) > 3:
            ax.tick_params(axis="x", labelrotation=15)
        ax.set_ylim(bottom=0)
        fig.canvas.draw()
        plot.labels = [t.get_text() for t in ax.get_xticklabels()]
    else:
        for label, points in plot.curves.items():
            style = "--" if "guest RAM" in label else "-"
            ax.plot(
                [x for x, _ in points],
                [y for _, y in points],
                style,
                marker="o",
                label=label,
                color=_color(plot, label),
            )
        ax.set_xlabel(plot.xlabel)
        ax.set_ylim(bottom=0)
        legend = ax.legend(fontsize=8)
        plot.labels = [t.get_text() for t in legend.get_texts()]
    out_dir.mkdir(parents=True, exist_ok=True)
    plot.png = out_dir / f"{plot.name}.png"
    fig.savefig(plot.png)
    return fig


# -- markdown ----------------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (git rev-parse failed)"
    return out.stdout.strip()


def header(meta: dict[str, Any] | None) -> list[str]:
    """Commit, date, machine load at start and end, CPU model, whether the guests ran nested under TCG."""
    if meta is None:
        return [
            "# Benchmark report",
            "",
            f"- commit: {_git_commit()} (at report time: no usable meta.json)",
            "- date, machine load, CPU model, TCG: not measured: meta.json missing or not a JSON object"
            " (`nox -s bench` writes it)",
            "",
        ]
    lab = meta.get("lab_vm", {})
    tcg = "yes" if meta.get("nested_tcg") else "no"
    dirty = " (with uncommitted changes)" if meta.get("dirty") else ""
    lines = [
        "# Benchmark report",
        "",
        f"- commit: {meta.get('commit', 'unknown')}{dirty}",
        f"- date: {meta.get('started', '?')} to {meta.get('finished', '?')} (UTC)",
        f"- machine load (/proc/loadavg): start {meta.get('loadavg_start', '?')},"
        f" end {meta.get('loadavg_end', '?')}",
        f"- CPU: {meta.get('cpu_model', '?')}, {meta.get('cpus', '?')} CPUs",
        f"- nested under TCG: {tcg} (lab VM: QEMU -accel {lab.get('accel', '?')},"
        f" -cpu {lab.get('cpu', '?')}, lab kernel {lab.get('kernel_args') or '(no extra arguments)'};"
        " the guests boot on its nested KVM)",
        "",
    ]
    steps = meta.get("steps", [])
    if steps:
        lines += ["| step | seconds | status |", "|---|---:|---|"]
        for s in steps:
            detail = f" ({s['detail']})" if s.get("detail") else ""
            lines.append(f"| {s['name']} | {s.get('seconds', 0):.1f} | {s.get('status', '?')}{detail} |")
        lines.append("")
    return lines


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def markdown(meta: dict[str, Any] | None, plots: list[Plot], missing: list[NotMeasured], host: str) -> str:
    lines = header(meta)
    lines += [
        "## Ratios (ours/peer, medians of the same run)",
        "",
        "| figure | ours | peer | ours median | peer median | ours/peer | better |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for plot in plots:
        better = "lower" if plot.lower_is_better else "higher"
        for r in plot.ratios:
            where = f" {r.where}" if r.where else ""
            lines.append(
                f"| [{plot.name}](#{plot.name}) | {r.ours}{where} | {r.peer}"
                f" | {_fmt(r.ours_median)} {plot.unit} | {_fmt(r.peer_median)} {plot.unit}"
                f" | {r.value:.2f} | {better} |"
            )
    for m in missing:
        lines.append(f"| {m.name} | | | | | not measured: {m.why} | |")
    lines.append("")
    for plot in plots:
        lines += [f"## {plot.name}", "", f"{plot.title}.", "", f"![{plot.title}]({plot.name}.png)", ""]
        if plot.samples:
            lines += ["| series | runs | min | median | max |", "|---|---:|---:|---:|---:|"]
            for label, values in plot.samples.items():
                lines.append(
                    f"| {label} | {len(values)} | {_fmt(min(values))} | {_fmt(_median(values))}"
                    f" | {_fmt(max(values))} |"
                )
        else:
            xs = sorted({x for pts in plot.curves.values() for x, _ in pts})
            lines += [f"| series | {' | '.join(f'{x:g}' for x in xs)} |", "|---|" + "---:|" * len(xs)]
            for label, points in plot.curves.items():
                at = dict(points)
                lines.append(f"| {label} ({plot.unit}) | " + " | ".join(
                    _fmt(at[x]) if x in at else "" for x in xs) + " |")  # fmt: skip
        lines.append("")
        lines += [f"- {note}" for note in plot.notes]
        if plot.notes:
            lines.append("")
    for m in missing:
        lines += [f"## {m.name}", "", f"{m.title}: not measured: {m.why}", ""]
    lines += ["## Host micro benchmarks (pytest-benchmark)", "", host, ""]
    return "\n".join(lines)


def host_table(bench_dir: Path, meta: dict[str, Any]) -> str:
    """The pytest-benchmark results as a table (they have no peer: absolute host numbers)."""
    rows = ["| benchmark | median (us) | mean (us) | ops/s | rounds |", "|---|---:|---:|---:|---:|"]
    try:
        for b in _read_json(bench_dir, "host.json", meta, "host")["benchmarks"]:
            st = b["stats"]
            rows.append(
                f"| {b['name']} | {st['median'] * 1e6:.1f} | {st['mean'] * 1e6:.1f} | {st['ops']:.0f}"
                f" | {st['rounds']} |"
            )
    except Missing as err:
        return f"not measured: {err}"
    except BAD_INPUT as err:
        return f"not measured: unexpected input in host.json ({type(err).__name__}: {err})"
    return "\n".join(rows)


# -- the report --------------------------------------------------------------------------------------------

# every figure the report draws when all steps ran: name, title, the step that measures it
FIGURES = [
    ("start_time", "ctr run --rm start time per runtime", "shim"),
    ("pod_threads", "shim OS threads per pod", "shim"),
    ("pod_memory", "shim memory per pod", "shim"),
    ("vmm_boot", "kata-vmm against QEMU, boot to the marker", "vmm_boot"),
    ("virtio_blk", "virtio-blk sequential read, kata-vmm against QEMU", "virtio"),
    ("virtio_fs", "virtio-fs small files, kata-vmm against QEMU + virtiofsd", "virtio"),
    ("net_throughput", "TCP throughput, ours against QEMU virtio-net", "net"),
    ("net_latency", "TCP round trips, ours against QEMU virtio-net", "net"),
    ("hotplug", "hot-plug latency, upcall against QEMU's ACPI hot-plug", "hotplug"),
    ("load_start", "pods started at once: start time per pod", "load"),
    ("load_memory", "pods side by side: host PSS per pod", "load"),
    ("cri_start", "pods started at once through CRI: start time per pod", "cri"),
    ("cri_threads", "pods through CRI: shim threads per pod", "cri"),
    ("cri_memory", "pods through CRI: RSS and PSS per pod", "cri"),
]


def build(bench_dir: Path = BENCH_DIR, out_dir: Path | None = None) -> Report:
    """Read ``bench_dir``, draw every figure it has the data for into ``out_dir`` (default ``bench_dir``),
    write ``out_dir/report.md``; never raises for a missing or broken input."""
    out_dir = out_dir or bench_dir
    try:
        meta: dict[str, Any] | None = json.loads((bench_dir / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        meta = None
    m = meta or {}
    made: dict[str, Plot] = {}
    why: dict[str, str] = {}

    def attempt(names: list[str], make: Any) -> None:
        try:
            result = make()
        except Missing as err:
            why.update((n, str(err)) for n in names)
            return
        except BAD_INPUT as err:
            why.update((n, f"unexpected input ({type(err).__name__}: {err})") for n in names)
            return
        for plot in result if isinstance(result, list) else [result]:
            made[plot.name] = plot

    def shim() -> Any:
        return _read_json(bench_dir, "shim.json", m, "shim")

    attempt(["start_time"], lambda: start_time_plot(shim()))
    attempt(["pod_threads"], lambda: _pod_curves(shim(), "threads"))
    attempt(["pod_memory"], lambda: _pod_curves(shim(), "memory"))

    def boot() -> Plot:
        text = (bench_dir / "vmm_boot.json").read_text() if (bench_dir / "vmm_boot.json").exists() else ""
        if not text.strip():
            raise Missing(_step_why(m, "vmm_boot") or "vmm_boot.json missing or empty (the step did not run)")
        try:
            line = json.loads(text.strip().splitlines()[-1])
        except ValueError as err:
            raise Missing(_step_why(m, "vmm_boot") or f"vmm_boot.json is not a JSON line ({err})") from None
        return vmm_boot_plot(line)

    attempt(["vmm_boot"], boot)

    virtio_path = bench_dir / "virtio_guest.txt"
    if virtio_path.exists():
        text = virtio_path.read_text(errors="replace")
        try:
            found = virtio_plots(text)
        except BAD_INPUT as err:
            found = {}
            why["virtio_blk"] = why["virtio_fs"] = f"unexpected input ({type(err).__name__}: {err})"
        made.update(found)
        failures = _pytest_failures(text)
        for name, test in (("virtio_blk", "test_virtio_blk"), ("virtio_fs", "test_virtio_fs")):
            if name not in found and name not in why:
                reason = next((r for t, r in failures.items() if t.startswith(test)), "")
                why[name] = (
                    f"{test}* failed: {reason}" if reason
                    else _step_why(m, "virtio") or f"no {VIRTIO_PREFIX.strip()} line in virtio_guest.txt"
                )  # fmt: skip
    else:
        why["virtio_blk"] = why["virtio_fs"] = _step_why(m, "virtio") or "virtio_guest.txt missing"

    attempt(["net_throughput", "net_latency"], lambda: net_plots(_read_json(bench_dir, "net.json", m, "net")))
    attempt(["load_start", "load_memory"], lambda: load_plots(_read_json(bench_dir, "load.json", m, "load")))
    attempt(
        ["cri_start", "cri_threads", "cri_memory"],
        lambda: cri_plots(_read_json(bench_dir, "cri.json", m, "cri")),
    )
    attempt(["hotplug"], lambda: hotplug_plot(_read_json(bench_dir, "hotplug.json", m, "hotplug")))

    plots, missing = [], []
    for name, title, _step in FIGURES:
        if name in made:
            try:
                draw(made[name], out_dir)
            except BAD_INPUT as err:
                missing.append(NotMeasured(name, title, f"could not draw ({type(err).__name__}: {err})"))
                continue
            plots.append(made[name])
        else:
            missing.append(NotMeasured(name, title, why.get(name, "no input")))
    text = markdown(meta, plots, missing, host_table(bench_dir, m))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text)
    return Report(text, plots, missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=BENCH_DIR, help="the bench steps' output (build/bench)")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.md and PNGs (--dir)")
    args = parser.parse_args(argv)
    report = build(args.dir, args.out)
    out = args.out or args.dir
    print(f"report: {os.path.relpath(out / 'report.md')}: {len(report.plots)} figures", file=sys.stderr)
    for m in report.missing:
        print(f"  {m.name}: not measured: {m.why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
