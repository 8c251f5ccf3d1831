"""A private containerd for the shim's lab tests and the demo, with containerd-shim-kata-v2 on its PATH.

    with private_containerd() as ctrd:          # own root/state/sockets under /tmp, CRI off
    with private_containerd(cri=CriConfig(...)) as ctrd:  # CRI on: `kata`, `runc` handlers (framework.cri)
    with private_containerd(version=CONTAINERD_2) as ctrd:   # containerd 2.x (config version 3)
        ctrd.import_image(busybox_tar)           # -> docker.io/library/busybox:kata
        out = ctrd.ctr("run", "--rm", "--runtime", KATA_RUNTIME, IMAGE, "t1", "echo", "hi")

Two containerds: "1.6" (`CONTAINERD_1_6`, the default), the system's from bookworm, and "2.x"
(`CONTAINERD_2`), Debian sid's 2.x that lab/images/build.py unpacks into build/lab/containerd-2.x (its
containerd, ctr and runc shim; `containerd2_missing()` says why it cannot run). A CriConfig carries the
version its tables are written for; `private_containerd` takes it from there.

containerd finds the shim as `containerd-shim-kata-v2` on its PATH: the running interpreter's venv bin
directory comes first (then, for 2.x, its own bin directory: its containerd-shim-runc-v2 before
bookworm's). The shim's shipped configuration reads the guest assets from
/usr/share/kata-containers; `install_guest_assets()` points that directory at build/lab/guest with symlinks.
It refuses to run outside the lab VM: there the root file system is a tmpfs overlay that vanishes with the
VM, while on the host it would change the machine.

Teardown kills containerd's process group and every shim started for it (found by this containerd's socket
path in their argv), unmounts what is left below its directory and removes it, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from images.build import CONTAINERD2_BINARIES, CONTAINERD2_DIR, CONTAINERD2_VERSION

from framework.assets import REPO, GuestAssets, in_labvm, venv_bin

# The private containerd's lifecycle (config, start, readiness, teardown of the group, stray shims and mounts)
# is kata-proto's host-test fixture; this module adds the lab's PATH, guest assets and ctr conveniences.
sys.path.insert(0, str(REPO / "packages" / "kata-proto" / "tests"))
import containerd_fixture as _fixture
from containerd_fixture import CTR, kill_strays, mounts_below, processes, unmount_below

if TYPE_CHECKING:
    from framework.cri import CriConfig

KATA_RUNTIME = "io.containerd.kata.v2"
SHIM_BINARY = "containerd-shim-kata-v2"
BUSYBOX_IMAGE = "docker.io/library/busybox:kata"
KATA_ASSET_DIR = Path("/usr/share/kata-containers")
KATA_STATE_ROOT = Path("/run/kata")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINERD_1_6 = "1.6"
CONTAINERD_2 = "2.x"
CONTAINERD_VERSIONS = (CONTAINERD_1_6, CONTAINERD_2)
# the containerd configuration's version each one reads natively
CONFIG_VERSION = {CONTAINERD_1_6: 2, CONTAINERD_2: 3}
CONTAINERD2_BIN = CONTAINERD2_DIR / "usr" / "bin"


class ContainerdError(Exception):
    """The private containerd did not start, or a ctr command failed (the message has its output)."""


def containerd2_missing() -> str | None:
    """Why containerd 2.x cannot run here (its binaries not unpacked), or None when it can."""
    missing = [name for name in CONTAINERD2_BINARIES if not os.access(CONTAINERD2_BIN / name, os.X_OK)]
    if missing:
        fetch = "python3 lab/images/build.py --containerd2"
        return (
            f"containerd {CONTAINERD2_VERSION} not unpacked in {CONTAINERD2_DIR} ({', '.join(missing)}"
            f" missing): run `{fetch}` (nox -s images and nox -s lab run it)"
        )
    return None


def check_version(version: str) -> str:
    """``version`` if it is one of `CONTAINERD_VERSIONS`, else ValueError."""
    if version not in CONTAINERD_VERSIONS:
        raise ValueError(f"containerd version {version!r}: one of {CONTAINERD_VERSIONS}")
    return version


def install_guest_assets(assets: GuestAssets | None = None, target: Path = KATA_ASSET_DIR) -> dict[str, Path]:
    """Point the shim's default asset paths at the lab-built guest (symlinks); lab VM only."""
    if not in_labvm():
        raise ContainerdError(
            f"refusing to write {target} outside the lab VM (its root is a throw-away overlay)"
        )
    assets = assets or GuestAssets()
    links = {
        "vmlinuz": assets.kernel,
        "kata-containers-initrd.img": assets.initrd_sandbox,
        # KATA_LAB_GUEST_IMAGE: try another sandbox root (e.g. one with a work-in-progress agent)
        "kata-containers.img": Path(os.environ.get("KATA_LAB_GUEST_IMAGE") or assets.rootfs_sandbox),
    }
    target.mkdir(parents=True, exist_ok=True)
    for name, source in links.items():
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return {name: target / name for name in links}


@dataclass
class PrivateContainerd(_fixture.ContainerdLog):
    """A running private containerd and where to reach it."""

    base: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    # the CRI plugin's settings when it is enabled (framework.cri), else None
    cri: CriConfig | None = None
    # which containerd runs (`CONTAINERD_VERSIONS`) and the ctr that talks to it
    version: str = CONTAINERD_1_6
    ctr_path: str = CTR
    address: str = field(init=False)
    root: Path = field(init=False)
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        self.address = str(self.base / "containerd.sock")
        self.root = self.base / "root"
        self.state = self.base / "state"

    @property
    def ttrpc_address(self) -> str:
        return self.address + ".ttrpc"

    def ctr_argv(self, *args: str, namespace: str = "default") -> list[str]:
        """argv of `ctr` talking to this containerd."""
        return [self.ctr_path, "--address", self.address, "--namespace", namespace, *args]

    def ctr(
        self,
        *args: str,
        namespace: str = "default",
        timeout: float = 300,
        input: bytes | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run one ctr command; raise `ContainerdError` with its output when it fails and ``check``."""
        argv = self.ctr_argv(*args, namespace=namespace)
        done = subprocess.run(
            argv,
            input=input.decode() if input is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if check and done.returncode != 0:
            raise ContainerdError(
                f"{' '.join(args)} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
                f"\ncontainerd log tail:\n{self.log_tail()}"
            )
        return done

    def popen_ctr(
        self, *args: str, namespace: str = "default", stdout: IO[bytes] | int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running ctr command (e.g. `events`)."""
        return subprocess.Popen(
            self.ctr_argv(*args, namespace=namespace),
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
        )

    def import_image(self, tarball: Path, namespace: str = "default") -> str:
        """`ctr images import` the OCI tarball; returns ctr's output."""
        return self.ctr("images", "import", str(tarball), namespace=namespace).stdout

    def remove(self, cid: str, timeout: float = 120) -> None:
        """Take container ``cid`` away whatever its state, not checked: SIGKILL its task, retry the task's
        delete until containerd takes it (the shim answers once the exit is through) or ``timeout``
        passes, then delete the container. Callers assert what must be gone afterwards."""
        self.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.ctr("task", "delete", cid, check=False).returncode != 0:
            time.sleep(1)
        self.ctr("container", "delete", cid, check=False)

    def shim_pids(self, binary: str = SHIM_BINARY) -> list[int]:
        """Processes of ``binary`` (by default containerd-shim-kata-v2) started for this containerd."""
        return sorted(self.shim_argvs(binary))

    def shim_argvs(self, binary: str = SHIM_BINARY) -> dict[int, str]:
        """`shim_pids` -> each one's argv (joined by spaces)."""
        return {pid: argv for pid, argv in processes() if binary in argv and self.address in argv}

    def processes_below(self, pid: int) -> list[tuple[int, str]]:
        """(pid, comm) of ``pid`` and all its descendants (`processes_below`)."""
        return processes_below(pid)


def processes_below(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    comms: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        comms[int(entry.name)] = comm
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in comms:
            out.append((p, comms[p]))
        todo.extend(children.get(p, []))
    return out


def thread_names(pid: int) -> list[str]:
    """Names (comm) of every thread of ``pid``."""
    names = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
        with contextlib.suppress(OSError):
            names.append((task / "comm").read_text().strip())
    return names


@contextlib.contextmanager
def private_containerd(
    *,
    ready_timeout: float = 120.0,
    debug: bool = True,
    extra_env: dict[str, str] | None = None,
    cri: CriConfig | None = None,
    version: str | None = None,
) -> Iterator[PrivateContainerd]:
    """Start a private containerd (state on /tmp), wait for both sockets, stop and remove it after:
    kata-proto's test fixture (one copy of the lifecycle), with the venv's bin directory first on its PATH.
    ``cri`` enables the CRI plugin with those settings (by default it is disabled: ctr only). ``version``
    (`CONTAINERD_VERSIONS`) is ``cri``'s when None, else 1.6; one that differs from ``cri``'s is a
    ValueError (its tables are written for one version)."""
    if version is None:
        version = cri.version if cri is not None else CONTAINERD_1_6
    check_version(version)
    if cri is not None and version != cri.version:
        raise ValueError(f"containerd {version} asked for a CriConfig written for {cri.version}")
    binary, ctr, path = None, CTR, f"{venv_bin()}:{SYSTEM_PATH}"
    if version == CONTAINERD_2:
        reason = containerd2_missing()
        if reason is not None:
            raise ContainerdError(reason)
        binary, ctr = str(CONTAINERD2_BIN / "containerd"), str(CONTAINERD2_BIN / "ctr")
        path = f"{venv_bin()}:{CONTAINERD2_BIN}:{SYSTEM_PATH}"
    env = {
        "PATH": path,
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        **(extra_env or {}),
    }
    with _fixture.private_containerd(
        ready_timeout=ready_timeout,
        debug=debug,
        env=env,
        error=ContainerdError,
        keep_log=keep_log,
        cri_config=cri.render if cri is not None else None,
        containerd=binary,
        config_version=CONFIG_VERSION[version],
    ) as ctrd:
        yield PrivateContainerd(ctrd.base, ctrd.process, ctrd.log_path, env, cri, version, ctr)


LOG_DIR = REPO / "build" / "lab" / "logs"
LOGS_KEPT = 20


def keep_log(log_path: Path) -> None:
    """Copy a private containerd's log (with every shim's log lines in it) to build/lab/logs, the newest
    `LOGS_KEPT` only: the lab VM's /tmp is gone after the run, and a failure's log tail is often too short."""
    with contextlib.suppress(OSError):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        shutil.copyfile(log_path, LOG_DIR / f"containerd-{stamp}-{log_path.parent.name}.log")
        for old in sorted(LOG_DIR.glob("containerd-*.log"))[:-LOGS_KEPT]:
            old.unlink()


__all__ = [
    "BUSYBOX_IMAGE",
    "CONTAINERD2_BIN",
    "CONTAINERD_1_6",
    "CONTAINERD_2",
    "CONTAINERD_VERSIONS",
    "KATA_ASSET_DIR",
    "KATA_RUNTIME",
    "KATA_STATE_ROOT",
    "REPO",
    "ContainerdError",
    "PrivateContainerd",
    "check_version",
    "containerd2_missing",
    "install_guest_assets",
    "kill_strays",
    "mounts_below",
    "private_containerd",
    "thread_names",
    "unmount_below",
    "venv_bin",
]


@contextlib.contextmanager
def busybox_containerd(workdir: Path, **options: Any) -> Iterator[PrivateContainerd]:
    """`private_containerd(**options)` ready for the kata runtime: the guest assets installed where the
    shim's shipped configuration looks, lab/images' busybox built into ``workdir`` and imported (what the
    shim's lab tests and benches start from)."""
    from images import busybox_oci

    install_guest_assets()
    tar = busybox_oci.build(workdir / "busybox.tar")
    with private_containerd(**options) as instance:
        instance.import_image(tar)
        yield instance
