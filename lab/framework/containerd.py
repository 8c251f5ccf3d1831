"""A private containerd for the shim's lab tests and the demo, with containerd-shim-kata-v2 on its PATH.

    with private_containerd() as ctrd:          # own root/state/sockets under /tmp, CRI off
    with private_containerd(cri=CriConfig(...)) as ctrd:  # CRI on: `kata`, `runc` handlers (framework.cri)
    with private_containerd(version=CONTAINERD_2) as ctrd:   # containerd 2.x (config version 3)
    with private_containerd(version=CONTAINERD_2, snapshotter=BlockfileSnapshotter()) as ctrd:
        ctrd.import_image(busybox_tar)           # -> docker.io/library/busybox:kata (unpacked into blockfile)
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

A `BlockfileSnapshotter` configures containerd 2.x's ``blockfile`` snapshotter (each snapshot a copy of an
ext4 image file, mounted with "loop"; the shim hot-plugs the file as the container's disk) over a small
scratch image made in containerd's directory; images are imported into it (`import_image`) and ``ctr run
--snapshotter blockfile`` uses it. A `DevmapperSnapshotter` does the same for containerd 1.6's
``devmapper`` (a thin pool over two loop files, made before containerd starts and removed after it
stopped; lab VM only: the host's kernel has no device-mapper).

Teardown kills containerd's process group and every shim started for it (found by this containerd's socket
path in their argv), unmounts what is left below its directory and removes it, whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
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
ZYGOTE_ENV = ("KATA_SHIM_ZYGOTE_DIR", "KATA_SHIM_ZYGOTE_IDLE")
"""Of this process's environment, what containerd passes on to the shims (kata-shim's zygote)."""
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


BLOCKFILE = "blockfile"
BLOCKFILE_PLUGIN = f"io.containerd.snapshotter.v1.{BLOCKFILE}"
TRANSFER_PLUGIN = "io.containerd.transfer.v1.local"
UNPACK_PLATFORM = "linux/amd64"


@dataclass(frozen=True)
class BlockfileSnapshotter:
    """containerd 2.x's ``blockfile`` snapshotter (plugins/snapshots/blockfile): every snapshot is a copy
    of its parent's image file (the first one of ``scratch_file``), and its Mount is ``fs_type`` on that
    file with the "loop" option (plus "rw", or "ro" for a view). `render` makes the scratch image in
    containerd's directory (``truncate`` + ``mkfs.ext4``) and returns the plugin's table. Keep it small:
    each snapshot copies it whole (blockfile writes every byte: the copies are not sparse)."""

    size_mib: int = 64
    fs_type: str = "ext4"
    name: str = BLOCKFILE
    # the containerds that have it (1.6 has no blockfile)
    versions: tuple[str, ...] = (CONTAINERD_2,)
    # containerd's environment needs nothing more
    env: dict[str, str] = field(default_factory=dict)

    def release(self) -> None:
        """Nothing outlives containerd's directory."""

    def scratch(self, base: Path) -> Path:
        """The scratch image `render` makes for the containerd in ``base``."""
        return base / f"{self.name}-scratch.{self.fs_type}"

    def root(self, ctrd_root: Path) -> Path:
        """Where the plugin keeps its snapshots' files (``<root>/snapshots/<id>``): containerd's default."""
        return ctrd_root / BLOCKFILE_PLUGIN

    def render(self, base: Path) -> str:
        """Make the scratch image below ``base`` and return the plugin's TOML table (config version 3)."""
        scratch = self.scratch(base)
        try:
            subprocess.run(["truncate", "-s", f"{self.size_mib}M", str(scratch)], check=True)
            subprocess.run(
                [f"mkfs.{self.fs_type}", "-q", str(scratch)], check=True, capture_output=True, text=True
            )
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or err
            raise ContainerdError(f"cannot make the {self.name} scratch image {scratch}: {detail}") from err
        lines = [
            "",
            f'[plugins."{BLOCKFILE_PLUGIN}"]',
            f"  scratch_file = {json.dumps(str(scratch))}",  # JSON strings and arrays are TOML's
            f"  fs_type = {json.dumps(self.fs_type)}",
            f"  mount_options = {json.dumps(['loop'])}",
            "  recreate_scratch = true",
        ]
        # the transfer service (ctr 2.x's import) unpacks only for the snapshotters listed here; its
        # default lists overlayfs alone ("no unpack platforms defined" for another)
        for snapshotter in ("overlayfs", self.name):
            lines += [
                "",
                f'[[plugins."{TRANSFER_PLUGIN}".unpack_config]]',
                f'  platform = "{UNPACK_PLATFORM}"',
                f"  snapshotter = {json.dumps(snapshotter)}",
                '  differ = "walking"',
            ]
        return "\n".join([*lines, ""])


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
    # the block snapshotter it was configured with (`import_image` unpacks into it), else None
    snapshotter: Snapshotter | None = None
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
        """`ctr images import` the OCI tarball, unpacked into `snapshotter` when there is one (else
        containerd's default); returns ctr's output."""
        where = ["--snapshotter", self.snapshotter.name] if self.snapshotter is not None else []
        return self.ctr("images", "import", *where, str(tarball), namespace=namespace).stdout

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


DEVMAPPER = "devmapper"
DEVMAPPER_PLUGIN = f"io.containerd.snapshotter.v1.{DEVMAPPER}"
# dm-thin-pool's table: data block size in 512-byte sectors (64 KiB) and low water mark in blocks
THIN_BLOCK_SECTORS = 128
THIN_LOW_WATER_BLOCKS = 32768


@dataclass
class DevmapperSnapshotter:
    """containerd 1.6's ``devmapper`` snapshotter over a thin pool of two sparse files behind loop devices
    (``data_mib`` of data, ``meta_mib`` of metadata): every snapshot is a thin device, its Mount
    ``fs_type`` on ``/dev/mapper/<pool>-snap-<id>``. `render` makes the pool (``modprobe dm_thin_pool``,
    ``losetup``, ``dmsetup create``: the lab VM's kernel has the module, the host's has no device-mapper)
    and returns the plugin's table; `release`, after containerd stopped, removes the pool's devices and
    loop devices."""

    data_mib: int = 1024
    meta_mib: int = 64
    base_image_size_mib: int = 64
    fs_type: str = "ext4"
    name: str = DEVMAPPER
    versions: tuple[str, ...] = (CONTAINERD_1_6,)
    # for dmsetup here and containerd's: the lab VM runs no udev, so libdevmapper makes the /dev/mapper nodes
    env: dict[str, str] = field(default_factory=lambda: {"DM_DISABLE_UDEV": "1"})
    pool: str = field(default_factory=lambda: f"kata-lab-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    loops: list[str] = field(default_factory=list)
    created: bool = False

    def table(self) -> str:
        """The thin pool's device-mapper table (its metadata and data loop devices made)."""
        meta, data = self.loops
        sectors = (self.data_mib << 20) // 512
        blocks = f"{THIN_BLOCK_SECTORS} {THIN_LOW_WATER_BLOCKS}"
        return f"0 {sectors} thin-pool {meta} {data} {blocks} 1 skip_block_zeroing"

    def render(self, base: Path) -> str:
        """Make the pool (files in ``base``) and return the plugin's TOML table (config version 2)."""
        try:
            subprocess.run(["modprobe", "dm_thin_pool"], check=True, capture_output=True, text=True)
            for part, mib in (("meta", self.meta_mib), ("data", self.data_mib)):
                image = base / f"{self.pool}-{part}.img"
                subprocess.run(["truncate", "-s", f"{mib}M", str(image)], check=True)
                done = subprocess.run(
                    ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
                )
                self.loops.append(done.stdout.strip())
            subprocess.run(
                ["dmsetup", "create", self.pool, "--table", self.table()],
                env={**os.environ, **self.env},
                check=True,
                capture_output=True,
                text=True,
            )
            self.created = True
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or err
            self.release()
            raise ContainerdError(f"cannot make the thin pool {self.pool}: {detail}") from err
        return self.plugin_table()

    def plugin_table(self) -> str:
        """The plugin's TOML table (config version 2)."""
        return "\n".join(
            [
                "",
                f'[plugins."{DEVMAPPER_PLUGIN}"]',
                f"  pool_name = {json.dumps(self.pool)}",
                f'  base_image_size = "{self.base_image_size_mib}MB"',
                "  discard_blocks = true",
                f"  fs_type = {json.dumps(self.fs_type)}",
                "",
            ]
        )

    def devices(self) -> list[str]:
        """The device-mapper devices of the pool's snapshots (``<pool>-snap-<id>``), by ``dmsetup ls``."""
        done = subprocess.run(
            ["dmsetup", "ls"], env={**os.environ, **self.env}, capture_output=True, text=True, check=False
        )
        names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
        return [n for n in names if n.startswith(f"{self.pool}-snap-")]

    def release(self) -> None:
        """Remove the snapshots' devices, the pool and its loop devices (best effort, each step)."""
        if self.created:
            for device in self.devices():
                remove = ["dmsetup", "remove", "--force", device]
                subprocess.run(remove, env={**os.environ, **self.env}, capture_output=True, check=False)
            remove = ["dmsetup", "remove", self.pool]
            subprocess.run(remove, env={**os.environ, **self.env}, capture_output=True, check=False)
            self.created = False
        for loop in reversed(self.loops):
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
        self.loops.clear()


Snapshotter = BlockfileSnapshotter | DevmapperSnapshotter


@contextlib.contextmanager
def private_containerd(
    *,
    ready_timeout: float = 120.0,
    debug: bool = True,
    extra_env: dict[str, str] | None = None,
    cri: CriConfig | None = None,
    version: str | None = None,
    snapshotter: Snapshotter | None = None,
) -> Iterator[PrivateContainerd]:
    """Start a private containerd (state on /tmp), wait for both sockets, stop and remove it after:
    kata-proto's test fixture (one copy of the lifecycle), with the venv's bin directory first on its PATH.
    ``cri`` enables the CRI plugin with those settings (by default it is disabled: ctr only). ``version``
    (`CONTAINERD_VERSIONS`) is ``cri``'s when None, else the ``snapshotter``'s first, else 1.6; one that
    differs from ``cri``'s is a ValueError (its tables are written for one version). ``snapshotter``
    configures that block snapshotter (blockfile: 2.x only; devmapper: 1.6 here), released after
    containerd stopped."""
    if version is None:
        version = (
            cri.version if cri is not None else snapshotter.versions[0] if snapshotter else CONTAINERD_1_6
        )
    check_version(version)
    if cri is not None and version != cri.version:
        raise ValueError(f"containerd {version} asked for a CriConfig written for {cri.version}")
    if snapshotter is not None and version not in snapshotter.versions:
        wanted = " or ".join(snapshotter.versions)
        raise ValueError(f"the {snapshotter.name} snapshotter needs containerd {wanted}, not {version}")
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
        # the shims' zygotes: a session's own (lab/tests/conftest.py, the benches), else the host default
        **{name: os.environ[name] for name in ZYGOTE_ENV if name in os.environ},
        **(snapshotter.env if snapshotter is not None else {}),
        **(extra_env or {}),
    }
    try:
        with _fixture.private_containerd(
            ready_timeout=ready_timeout,
            debug=debug,
            env=env,
            error=ContainerdError,
            keep_log=keep_log,
            cri_config=cri.render if cri is not None else None,
            containerd=binary,
            config_version=CONFIG_VERSION[version],
            plugin_config=snapshotter.render if snapshotter is not None else None,
        ) as ctrd:
            yield PrivateContainerd(
                ctrd.base, ctrd.process, ctrd.log_path, env, cri, version, ctr, snapshotter
            )
    finally:
        if snapshotter is not None:
            snapshotter.release()


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
    "BLOCKFILE",
    "BUSYBOX_IMAGE",
    "CONTAINERD2_BIN",
    "CONTAINERD_1_6",
    "CONTAINERD_2",
    "CONTAINERD_VERSIONS",
    "DEVMAPPER",
    "KATA_ASSET_DIR",
    "KATA_RUNTIME",
    "KATA_STATE_ROOT",
    "REPO",
    "BlockfileSnapshotter",
    "ContainerdError",
    "DevmapperSnapshotter",
    "PrivateContainerd",
    "Snapshotter",
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
