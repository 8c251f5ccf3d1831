"""Every way to build, test, benchmark and run this monorepo.

nox -s tests      unit tests of all packages (+ root/kvm/containerd-marked host tests where possible)
nox -s lint       ruff, mypy and the import-linter dependency contract
nox -s protos     regenerate kata_proto/_gen from the .proto files; fails if the committed code drifted
nox -s build      one wheel per package into build/dist
nox -s bench      benchmarks, then build/bench/report.md with PNG figures (bench-net: the network one)
nox -s images     guest assets for the lab VM into build/lab/guest
nox -s lab        integration tests that boot guests, inside lab VMs (one per test file, side by side)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import nox
from nox.command import CommandFailed

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "lab"))
import shards  # noqa: E402 - lab/shards.py (stdlib only): the lab run's scheduler, labvm's exit status

PACKAGES = [
    "kata-sys-util",
    "kata-proto",
    "kata-virtio",
    "kata-upcall",
    "kata-vmm",
    "kata-resources",
    "kata-agent-client",
    "kata-agent",
    "kata-shim",
]
# Pinned tool versions: generated code and lint results must not drift with the registry.
GRPCIO_TOOLS = "grpcio-tools==1.85.1"
# the lab's CRI client (lab/framework/cri.py) talks gRPC to containerd; grpcio-tools needs it anyway
GRPCIO = "grpcio==1.85.4"
TEST_DEPS = [
    GRPCIO_TOOLS,
    GRPCIO,
    "pytest==9.0.3",
    "pytest-timeout==2.4.0",
    "pytest-benchmark==5.2.3",
    "hypothesis==6.155.2",
    "trio==0.35.0",
    # the clh and firecracker back-ends' requests are validated against their upstream API specs
    "jsonschema==4.26.0",
    "PyYAML==6.0.3",
    # lab/bench/report.py draws the benchmark report's figures (and its tests open them)
    "matplotlib==3.11.2",
]
LINT_DEPS = ["ruff==0.17.6", "mypy==2.4.1", "import-linter==2.16", "types-protobuf"]

# A guest-booting test that hangs fails after this long with every thread's stack instead of eating CI's time
# (the slowest lab test, the shim's 10-container thread count under TCG, takes about 3 minutes).
LAB_TEST_TIMEOUT = 900
# One lab VM's run (one test file; the longest, test_shim_lab, about 12 minutes) and the longest it may print
# nothing (more than a test may run, so only a lab VM whose own kernel locked up reaches it): past either,
# labvm stops the lab VM (exit 125).
LAB_RUN_TIMEOUT = 2400
LAB_IDLE_TIMEOUT = LAB_TEST_TIMEOUT + 60
# How many lab VM boots one test file may take: each after the first runs only its tests not yet passed,
# when the one before it died or froze (the emulator's fault, not a test's; lab/shards.py).
LAB_VM_ATTEMPTS = 3
# How many lab VMs (one vCPU each) run test files side by side: LAB_VMS, else one per host CPU, at most 4
LAB_VMS = int(os.environ.get("LAB_VMS") or min(os.cpu_count() or 1, 4))

nox.options.default_venv_backend = "uv|venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]


def _install_workspace(session: nox.Session) -> None:
    args: list[str] = []
    for pkg in PACKAGES:
        args += ["-e", f"packages/{pkg}"]
    session.install(*args)


def _compile_for_labvm(session: nox.Session, python: str) -> None:
    """Byte-compile the sources the lab VM imports: its root is a throw-away overlay, so whatever the
    first import there compiles (seconds under TCG, in every shim start of a fresh lab VM) is lost with it."""
    session.run(
        python, "-m", "compileall", "-q", *[f"packages/{p}/src" for p in PACKAGES], "lab", external=True
    )


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests of every package; tests marked lab or guest_assets are left to `nox -s lab`."""
    _install_workspace(session)
    session.install(*TEST_DEPS)
    session.run(
        "pytest", "-m", "not lab and not guest_assets", "-p", "no:cacheprovider", "--benchmark-disable",
        *session.posargs,
    )  # fmt: skip


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (style, imports), mypy (types) and import-linter (dependency direction of STYLE.md)."""
    _install_workspace(session)
    session.install(*LINT_DEPS, *TEST_DEPS)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports")
    session.run("mypy", *[f"packages/{p}/src" for p in PACKAGES])


@nox.session
def protos(session: nox.Session) -> None:
    """Regenerate the committed protobuf code with the pinned protoc; fail on any difference."""
    session.install(GRPCIO_TOOLS)
    session.run("python", "packages/kata-proto/tools/genprotos.py")
    # the lab's CRI client stubs: upstream cri-api at a pinned tag (lab/protos/gencri.py)
    session.run("python", "lab/protos/gencri.py")
    generated = ["packages/kata-proto/src/kata_proto/_gen", "lab/framework/_gen"]
    if shutil.which("git") and (ROOT / ".git").exists():
        session.run("git", "diff", "--exit-code", "--stat", "--", *generated, external=True)
        untracked = session.run(
            "git",
            "ls-files",
            "--others",
            "--exclude-standard",
            "--",
            *generated,
            external=True,
            silent=True,
        )
        if untracked and str(untracked).strip():
            session.error(f"generated files not committed:\n{untracked}")


@nox.session
def build(session: nox.Session) -> None:
    """Build one wheel per package into build/dist."""
    session.install("build==1.6.1", "hatchling==1.33.0")
    out = ROOT / "build" / "dist"
    shutil.rmtree(out, ignore_errors=True)
    for pkg in PACKAGES:
        session.run(
            "python", "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), f"packages/{pkg}"
        )
    wheels = sorted(p.name for p in out.glob("*.whl"))
    session.log("wheels: " + ", ".join(wheels))
    if len(wheels) != len(PACKAGES):
        session.error(f"expected {len(PACKAGES)} wheels, got {len(wheels)}")


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """Benchmarks: host micro benchmarks (pytest-benchmark), then in the lab VM kata-vmm vs QEMU (boot, virtio
    throughput, hot-plug latency: upcall vs QEMU's ACPI hot-plug), containerd-shim-kata-v2 vs runc (ctr run
    --rm, threads and memory per pod; pods started at once by ctr and through containerd's CRI plugin) and the
    pod network, our tap+tc path vs QEMU virtio-net with vhost-net (TCP throughput, round-trip latency).

    Each step prints one progress line when it starts and one with its elapsed time when it ends; a failed
    step does not stop the others. Then lab/bench/report.py writes build/bench/report.md and its PNG figures
    (a step that failed is "not measured" there), and the session fails if any step did."""
    session.run(sys.executable, "-m", "nox", "-s", "tests", "--install-only", external=True)
    python = str(ROOT / ".nox" / "tests" / "bin" / "python")
    _compile_for_labvm(session, python)
    out = ROOT / "build" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.png"), out / "report.md"]:
        stale.unlink(missing_ok=True)  # a figure of an earlier run must not pass for this one's
    meta = _bench_meta()

    def host() -> None:
        session.run(
            python,
            "-m",
            "pytest",
            "lab/bench",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            "-o",
            f"timeout={LAB_TEST_TIMEOUT}",
            f"--benchmark-json={out / 'host.json'}",
            *session.posargs,
            external=True,
        )

    def in_lab(sink: str, *argv: str, labvm: tuple[str, ...] = ()) -> Callable[[], None]:
        """A step running ``python ARGV`` in a lab VM (``labvm``: its `labvm exec` options), its stdout into
        build/bench/SINK."""

        def step() -> None:
            with open(out / sink, "w") as stdout:
                session.run("lab/labvm", "exec", *labvm, "--", python, *argv, external=True, stdout=stdout)

        return step

    # the QEMU peer of the boot bench is whichever machine type is faster in this run
    vmm_boot = in_lab("vmm_boot.json", "lab/bench/vmm_boot.py", "--runs", "5", "--machines", "q35,microvm")
    # virtio-blk and virtio-fs throughput, kata-vmm against QEMU in one lab VM
    virtio = in_lab(
        "virtio_guest.txt", "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
        "-o", f"timeout={LAB_TEST_TIMEOUT}", "lab/bench/virtio_guest.py",
    )  # fmt: skip
    # hot-plug latency (issue 17): a disk and a vCPU, upcall on kata-vmm against QEMU's ACPI hot-plug, one VM
    # each with 10 cycles inside; one lab vCPU, like nox -s lab (the test of the same hot-plug runs there)
    hotplug = in_lab(
        "hotplug.txt", "lab/bench/hotplug_bench.py", "--runs", "10", "--json", str(out / "hotplug.json"),
        labvm=("--cpus", "1"),
    )  # fmt: skip
    # containerd-shim-kata-v2 against runc on one containerd: ctr run --rm, threads and memory per pod
    # (one lab vCPU: a two-vCPU lab VM froze in this step's qemu series on 2026-12-07, lab/README.md)
    shim = in_lab(
        "shim.txt", "lab/bench/shim_bench.py", "--json", str(out / "shim.json"), labvm=("--cpus", "1")
    )
    # pods started at once and side by side: several nested VMs at the same time, so one lab vCPU
    load = in_lab(
        "load.txt", "lab/bench/load_bench.py", "--json", str(out / "load.json"),
        labvm=("--cpus", "1", "--memory", "6G"),
    )  # fmt: skip
    # the same through containerd's CRI plugin as the kubelet drives it (issue 18): runc, template, cold
    cri_in_lab = in_lab(
        "cri.txt", "lab/bench/cri_bench.py", "--json", str(out / "cri.json"),
        labvm=("--cpus", "1", "--memory", "6G"),
    )  # fmt: skip

    def cri() -> None:
        (out / "cri.json").unlink(missing_ok=True)  # a run that dies early must not report an older one's
        cri_in_lab()

    steps: list[tuple[str, Callable[[], None]]] = [
        ("host", host),
        ("images", lambda: session.run("python3", "lab/images/build.py", external=True)),
        ("vmm_boot", vmm_boot),
        ("virtio", virtio),
        ("hotplug", hotplug),
        ("shim", shim),
        ("load", load),
        ("cri", cri),
        ("net", lambda: _net_bench(session, python, out)),
    ]
    for number, (name, step) in enumerate(steps, 1):
        _bench_step(session, meta, f"[{number}/{len(steps)}] {name}", name, step)
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # partial, if the session dies
    meta["finished"] = _utc_now()
    meta["loadavg_end"] = _loadavg()
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    session.run(python, "lab/bench/report.py", "--dir", str(out), external=True)
    session.log(f"report: {out / 'report.md'}")
    failed = [f"{s['name']} ({s['detail']})" for s in meta["steps"] if s["status"] != "ok"]
    if failed:
        session.error(f"bench steps failed: {', '.join(failed)} (not measured in the report)")


def _utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def _loadavg() -> str:
    try:
        return pathlib.Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def _bench_meta() -> dict[str, Any]:
    """What the report's header prints: commit, start, load, CPU model, how the lab VM runs its guests."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    described = subprocess.run(
        [str(ROOT / "lab" / "labvm"), "describe"], capture_output=True, text=True, check=False
    )
    lab_vm = json.loads(described.stdout) if described.returncode == 0 else {}
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu_model = value.strip()
                break
    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "started": _utc_now(),
        "loadavg_start": _loadavg(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        # every lab step runs in the lab VM, which emulates its CPU (TCG); guests boot on its nested KVM
        "nested_tcg": lab_vm.get("accel", "").startswith("tcg"),
        "lab_vm": lab_vm,
        "steps": [],
    }


def _bench_step(
    session: nox.Session, meta: dict[str, Any], shown: str, name: str, step: Callable[[], None]
) -> None:
    """One bench step with a progress line before and after; a failure is recorded in ``meta``, not raised."""
    session.log(f"bench {shown}: started at {_utc_now()} UTC")
    start = time.monotonic()
    status, detail = "ok", ""
    try:
        step()
    except CommandFailed as err:
        status, detail = "failed", err.reason or "failed"
        if err.return_code == shards.LABVM_FAILED:
            detail += " (the lab VM failed, not the benchmark)"
    elapsed = time.monotonic() - start
    meta["steps"].append({"name": name, "seconds": round(elapsed, 1), "status": status, "detail": detail})
    line = f"bench {shown}: {status} in {elapsed:.1f} s" + (f": {detail}" if detail else "")
    (session.log if status == "ok" else session.warn)(line)


def _net_bench(session: nox.Session, python: str, out: pathlib.Path, *options: str) -> None:
    """Our tap+tc path against QEMU's virtio-net-pci with vhost-net, both guests on one CNI bridge."""
    with open(out / "net.txt", "w") as sink:
        session.run(
            "lab/labvm",
            "exec",
            "--",
            python,
            "lab/bench/net_bench.py",
            "--json",
            str(out / "net.json"),
            "--markdown",
            str(out / "net.md"),
            *options,
            external=True,
            stdout=sink,
        )


@nox.session(python=False, name="bench-net")
def bench_net(session: nox.Session) -> None:
    """Only the network bench of `bench` (`nox -s bench-net -- --mib 8` passes net_bench.py options)."""
    session.run(sys.executable, "-m", "nox", "-s", "tests", "--install-only", external=True)
    python = str(ROOT / ".nox" / "tests" / "bin" / "python")
    _compile_for_labvm(session, python)
    session.run("python3", "lab/images/build.py", external=True)
    out = ROOT / "build" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    _net_bench(session, python, out, *session.posargs)
    session.log(f"results in {out / 'net.md'}")


@nox.session(python=False)
def images(session: nox.Session) -> None:
    """Build (or reuse, by hash of inputs) the guest assets in build/lab/guest."""
    session.run("python3", "lab/images/build.py", *session.posargs, external=True)


@nox.session(python=False, name="upcall-module")
def upcall_module(session: nox.Session) -> None:
    """Build only the guest's upcall server, build/lab/upcall/kata_upcall_srv.ko (`images` builds it too)."""
    out = session.posargs[0] if session.posargs else "build/lab/upcall"
    session.run("python3", "lab/images/build.py", "--upcall-module", out, external=True)


@nox.session(python=False)
def lab(session: nox.Session) -> None:
    """Integration tests marked `lab`, run inside nested-KVM lab VMs: one lab VM of one vCPU per test file,
    LAB_VMS of them at once (lab/shards.py).

    `nox -s lab -- PYTEST ARGS` replaces the default selection (lab/tests and packages): its paths and node
    ids choose the files, its options (-k EXPR, -x ...) go to every file's pytest.
    """
    session.run("python3", "lab/images/build.py", external=True)
    venv = ROOT / ".nox" / "tests"
    session.run(
        sys.executable, "-m", "nox", "-s", "tests", "--install-only", external=True
    )  # the tests venv, up to date
    python = str(venv / "bin" / "python")
    _compile_for_labvm(session, python)
    pytest_args = ["-p", "no:cacheprovider", "--benchmark-disable", "-o", f"timeout={LAB_TEST_TIMEOUT}"]
    # host side first: labvm and the image builder, no VM needed (seconds)
    session.run(python, "-m", "pytest", "lab/tests", "-m", "not lab", "-q", *pytest_args, external=True)
    # then the package tests that need what `images` built or installed: the guest assets booted on the
    # host itself (QEMU under TCG), the upcall module built against the pinned kernel headers
    session.run(python, "-m", "pytest", "packages", "-m", "guest_assets", "-q", *pytest_args, external=True)
    path = f"{venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    logdir = ROOT / "build" / "lab" / "logs"
    logdir.mkdir(parents=True, exist_ok=True)

    def command(passed: pathlib.Path, resume: bool, tests: list[str]) -> list[str]:
        # each passed test is written to PASSED as it passes (lab/plugins/kata_lab_resume.py); one vCPU:
        # two nested guests on two vCPUs of one lab VM break QEMU's TCG (lab/shards.py)
        return [
            "lab/labvm", "exec", "--cpus", "1",
            "--timeout", str(LAB_RUN_TIMEOUT), "--idle-timeout", str(LAB_IDLE_TIMEOUT),
            "--env", f"PATH={path}", "--env", "KATA_LAB_BACKENDS", "--env", "PYTEST_ADDOPTS",
            "--env", f"PYTHONPATH={ROOT / 'lab' / 'plugins'}", "--env", f"KATA_LAB_PASSED={passed}",
            "--env", f"KATA_LAB_RESUME={int(resume)}",
            "--", python, "-m", "pytest", "-m", "lab", "-p", "kata_lab_resume", "--durations", "12",
            *pytest_args, *tests,
        ]  # fmt: skip

    # the selection, collected on the host (seconds), one shard per file
    listed = session.run(
        python, "-m", "pytest", "--collect-only", "-q", "-m", "lab", "-p", "no:cacheprovider",
        *(session.posargs or ["lab/tests", "packages"]), external=True, silent=True,
    )  # fmt: skip
    counts = shards.files_of(str(listed).splitlines())
    if not counts:
        session.error(f"no lab test selected by {session.posargs or 'lab/tests packages'}")
    # posargs: their paths and node ids chose the files; the rest (-k EXPR, -x, -v ...) goes to every shard
    options = [a for a in session.posargs if not (ROOT / a.split("::")[0]).exists()]

    def tests_of(file: str) -> list[str]:
        ids = [a for a in session.posargs if "::" in a and a.split("::")[0] == file]
        return [*options, *(ids or [file])]

    plan = shards.plan(counts, shards.load_durations(logdir), logdir)
    workers = max(1, min(LAB_VMS, len(plan)))
    session.log(f"{sum(counts.values())} lab tests in {len(plan)} files, {workers} one-vCPU lab VMs at once")
    done = shards.run(
        plan,
        lambda shard, resume: command(shard.passed_file, resume, tests_of(shard.path)),
        workers=workers,
        attempts=LAB_VM_ATTEMPTS,
        say=lambda line: print(line, flush=True),
    )
    shards.save_durations(logdir, done)
    failed = [f"{s.path} (labvm exit {s.code})" for s in done if s.code != 0]
    if failed:
        session.error(f"lab tests failed: {', '.join(failed)}")
