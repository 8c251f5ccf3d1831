#!/usr/bin/env python3
"""The main job, end to end: `ctr run --runtime io.containerd.kata.v2` of a busybox container in a KVM VM.

`./dev demo` installs the toolchain and runs this with a venv holding every package. On the host it builds
the guest assets (lab/images/build.py) and the busybox OCI image (lab/images/busybox_oci.py), then runs
itself again inside ONE lab VM (lab/labvm: nested KVM), where it

1. points /usr/share/kata-containers at the guest assets (the lab VM's root is a throw-away overlay),
2. starts a private containerd 1.6 (own root and sockets on tmpfs, CRI off) with containerd-shim-kata-v2 on
   its PATH,
3. imports the busybox image and runs
   `ctr run --rm --runtime io.containerd.kata.v2 IMAGE demo sh -c 'uname -r; echo hello from a Kata VM'`,
4. prints the container's output and how long each step took (the lab VM is emulated: expect minutes).

    python3 lab/demo.py [--command 'CMD'] [--keep-log]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

LAB = Path(__file__).resolve().parent
REPO = LAB.parent
# lab/labvm's exit status when the lab VM itself failed; boots of it per demo
LABVM_FAILED = 125
LAB_VM_ATTEMPTS = 2
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))

DEFAULT_COMMAND = "uname -r; echo hello from a Kata VM"
IMAGE_TAR = REPO / "build" / "lab" / "busybox-oci.tar"
LOG_COPY = REPO / "build" / "lab" / "demo-containerd.log"
ERROR_LOG = REPO / "build" / "lab" / "demo-error.log"


def say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


class StepFailed(Exception):
    """A step of the demo failed; the message is one line: what failed and what to do."""


def step(what: str, argv: list[str], hint: str) -> None:
    """Run one build step; its own output shows, a failure becomes StepFailed (no traceback)."""
    try:
        done = subprocess.run(argv, check=False)
    except OSError as err:
        raise StepFailed(f"{what}: {err}; {hint}") from err
    if done.returncode != 0:
        raise StepFailed(f"{what} failed (exit {done.returncode}); {hint}")


def on_host(args: argparse.Namespace) -> int:
    """Build what the lab VM needs, then run the inside part there."""
    t0 = time.monotonic()
    say("building the guest assets (python3 lab/images/build.py; cached by input hash)")
    step(
        "building the guest assets",
        [sys.executable, str(LAB / "images" / "build.py")],
        "fix what the [images] line above says, then rerun ./dev demo",
    )
    say("building the busybox OCI image from Debian's busybox-static")
    step(
        "building the busybox OCI image",
        [sys.executable, str(LAB / "images" / "busybox_oci.py"), "--out", str(IMAGE_TAR)],
        "install busybox-static (./dev installs it), then rerun ./dev demo",
    )
    # the lab VM's root is a throw-away overlay: compile here, or the shim's first start compiles under TCG
    sources = [str(p) for p in sorted((REPO / "packages").glob("*/src"))]
    step(
        "byte-compiling the packages",
        [sys.executable, "-m", "compileall", "-q", *sources],
        "fix the syntax error shown above",
    )
    say("booting the lab VM (QEMU/TCG with nested KVM); everything below runs inside it")
    # one vCPU, as `nox -s lab` runs its lab VMs: QEMU's TCG has crashed two-vCPU lab VMs under nested
    # guests (lab/README.md, "The lab VM's own failures"); seen in ./dev demo on 2026-12-07
    argv = [str(LAB / "labvm"), "exec", "--cpus", "1"]
    if os.environ.get("KATA_LAB_GUEST_IMAGE"):  # another sandbox root to try (framework.containerd)
        argv += ["--env", "KATA_LAB_GUEST_IMAGE"]
    argv += ["--", sys.executable, str(Path(__file__).resolve()), "--inside"]
    argv += ["--command", args.command]
    if args.keep_log:
        argv.append("--keep-log")
    code = run_in_lab_vm(argv)
    say(f"total (host + lab VM): {time.monotonic() - t0:.1f} s")
    return code


def run_in_lab_vm(
    argv: list[str], attempts: int = LAB_VM_ATTEMPTS, run: Callable[[list[str]], int] | None = None
) -> int:
    """`labvm exec` ``argv``; when the lab VM itself failed (exit 125: the emulator crashed or froze, not the
    demo) it is booted again, up to ``attempts`` boots, saying so. Any other status is the demo's."""
    run = run or (lambda a: subprocess.run(a, check=False).returncode)
    for attempt in range(1, attempts + 1):
        code = run(argv)
        if code != LABVM_FAILED or attempt == attempts:
            return code
        say(
            f"LAB VM FAILURE, not the demo's: the emulated lab VM died or froze (QEMU's TCG, lab/README.md);"
            f" booting a new one ({attempt + 1} of {attempts})"
        )
    return LABVM_FAILED


def inside(args: argparse.Namespace) -> int:
    """In the lab VM: containerd, import, ctr run with the kata runtime."""
    from framework.containerd import (
        BUSYBOX_IMAGE,
        KATA_RUNTIME,
        install_guest_assets,
        private_containerd,
        venv_bin,
    )

    shim = venv_bin() / "containerd-shim-kata-v2"
    if not shim.exists():
        say(f"{shim} is missing: install the packages into this venv (./dev demo does)")
        return 1
    links = install_guest_assets()
    say("guest assets: " + ", ".join(f"{p} -> {os.readlink(p)}" for p in links.values()))
    t = time.monotonic()
    with private_containerd() as ctrd:
        say(f"containerd ready in {time.monotonic() - t:.1f} s ({ctrd.address})")
        t = time.monotonic()
        ctrd.import_image(IMAGE_TAR)
        say(f"imported {BUSYBOX_IMAGE} in {time.monotonic() - t:.1f} s")
        argv = ["run", "--rm", "--runtime", KATA_RUNTIME, BUSYBOX_IMAGE, "demo", "sh", "-c", args.command]
        say("ctr " + shlex.join(argv))
        t = time.monotonic()
        try:
            done = ctrd.ctr(*argv, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            say("ctr run did not finish within 900 s; containerd log tail:\n" + ctrd.log_tail(80))
            return 1
        wall = time.monotonic() - t
        print(done.stdout, end="", flush=True)
        if done.stderr:
            print(done.stderr, end="", file=sys.stderr, flush=True)
        say(f"ctr run --rm --runtime {KATA_RUNTIME}: exit {done.returncode}, wall time {wall:.1f} s")
        LOG_COPY.write_text(ctrd.log())
        if done.returncode != 0 or args.keep_log:
            shim_lines = [line for line in ctrd.log().splitlines() if "kata-shim[" in line]
            say("shim log (last 40 lines):\n" + "\n".join(shim_lines[-40:]))
            say(f"containerd's whole log (with the shim's and the guest console): {LOG_COPY}")
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a busybox container in a Kata VM through containerd")
    parser.add_argument("--command", default=DEFAULT_COMMAND, help="what the container's sh -c runs")
    parser.add_argument("--keep-log", action="store_true", help="print containerd's log even on success")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        say("run as root (containerd, KVM and the lab VM need it)")
        return 1
    try:
        return inside(args) if args.inside else on_host(args)
    except StepFailed as err:
        say(f"FAILED: {err}")
    except Exception as err:  # the edge of the program: one line, the details in a file
        where = "in the lab VM" if args.inside else "on the host"
        text = str(err).strip() or type(err).__name__
        ERROR_LOG.parent.mkdir(parents=True, exist_ok=True)
        ERROR_LOG.write_text("".join(traceback.format_exception(err)))
        say(f"FAILED {where}: {text.splitlines()[0]} (details: {ERROR_LOG}); fix that, then rerun ./dev demo")
    return 1


if __name__ == "__main__":
    sys.exit(main())
