"""A container rootfs on a block device through containerd (issue 17), with the sandbox guest on the
shipped configuration (dragonball: hot-plug through upcall, the guest's kata_upcall_srv). Two block
snapshotters, one private containerd each (module-scoped, parametrized):

- containerd 2.x's ``blockfile``: one ``ext4`` mount of a regular file with the "loop" option, which the
  shim hot-plugs as a virtio-blk disk backed by that file (our addition: runtime-rs takes device nodes);
- containerd 1.6's ``devmapper`` over a thin pool of two loop files: ``ext4`` on ``/dev/mapper/<pool>-snap-N``
  (runtime-rs's block rootfs).

`lab`: ``ctr run --rm --snapshotter S --runtime io.containerd.kata.v2`` runs a script that shows ``/`` is
ext4 on a hot-plugged /dev/vdX, writes a file and reads it back, then waits for SIGTERM; while it waits the
host checks that the snapshot is neither mounted (by path, node or major:minor) nor behind a loop device,
that nothing is mounted below containerd and that the shim logged the plug; after the run no shim,
container, snapshot (devmapper: thin device), loop device, mount or /run/kata state is left. The blockfile
setup is skipped only when containerd 2.x is not unpacked.

Host (root, containerd 2.x, no VM; the host's kernel has no device-mapper): the blockfile configuration;
the Mount blockfile returns for an active snapshot is what the shim takes as a block rootfs
(`block_rootfs_source`, "loop" kept from the guest by `guest_mount_options`); and the lab test's run with
runc as the control (the host loop-mounts the snapshot, and the checks see it).

`./dev nox -s lab -- lab/tests/test_block_rootfs_lab.py` runs it alone (``-k blockfile`` or ``-k
devmapper`` one setup).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from framework import containerd as lab_containerd
from framework.assets import in_labvm
from framework.containerd import (
    BLOCKFILE,
    BUSYBOX_IMAGE,
    CONTAINERD_1_6,
    DEVMAPPER,
    KATA_RUNTIME,
    KATA_STATE_ROOT,
    BlockfileSnapshotter,
    DevmapperSnapshotter,
    PrivateContainerd,
    Snapshotter,
    busybox_containerd,
    containerd2_missing,
    mounts_below,
)

from kata_shim.runtime import RootfsMount
from kata_shim.virt_container._devices import block_rootfs_source, guest_mount_options

RUN_TIMEOUT = 600
# eventually-waits (a VM boot under nested TCG): generous, never a timed assert
EVENTUALLY = 300
CID = "blkroot1"
# in the container: its root's mount line, a write read back, then wait for the host's SIGTERM
SCRIPT = (
    "trap 'echo BLOCK-ROOT-BYE; exit 0' TERM; "
    "grep ' / ' /proc/mounts; "
    "echo kata-block-rootfs > /written && sync && cat /written; "
    "echo BLOCK-ROOT-READY; "
    "while :; do sleep 1; done"
)
ROOT_LINE = re.compile(r"^/dev/vd[b-z]+ / ext4 rw[, ]", re.MULTILINE)  # /dev/vda is the sandbox image

needs_containerd2 = pytest.mark.skipif(containerd2_missing() is not None, reason=str(containerd2_missing()))


def eventually(
    check: Callable[[], bool], what: str, log: Callable[[], str], timeout: float = EVENTUALLY
) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"{what} within {timeout} s\n{log()}")
        time.sleep(1)


def loop_backing_files() -> list[str]:
    """The backing file of every loop device set up on the host (sysfs: what ``losetup -a`` lists)."""
    files = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            files.append(backing.read_text().strip())
        except OSError:
            continue  # detached meanwhile
    return files


def mounted_sources() -> list[str]:
    """The source field of every line of the host's /proc/self/mounts."""
    with open("/proc/self/mounts") as f:
        return [line.split()[0].replace("\\040", " ") for line in f]


def mounted_devices() -> list[str]:
    """The major:minor of every host mount (/proc/self/mountinfo's third field)."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[2] for line in f]


def snapshot_source(ctrd: PrivateContainerd, key: str) -> tuple[Path, list[str]]:
    """The source and options of snapshot ``key``'s one mount (``ctr snapshots mounts`` prints
    ``mount -t TYPE SOURCE TARGET -o OPTIONS``) in the containerd's snapshotter."""
    assert ctrd.snapshotter is not None
    out = ctrd.ctr("snapshots", "--snapshotter", ctrd.snapshotter.name, "mounts", "/mnt", key).stdout
    argv = shlex.split(out.strip().splitlines()[0])
    assert argv[:3] == ["mount", "-t", "ext4"] and argv[5] == "-o", out
    return Path(argv[3]), (argv[6].split(",") if len(argv) > 6 else [])


def top_layer(ctrd: PrivateContainerd) -> str:
    """The committed snapshot no other one has as parent: the busybox image's top layer."""
    assert ctrd.snapshotter is not None
    listed = ctrd.ctr("snapshots", "--snapshotter", ctrd.snapshotter.name, "ls").stdout
    rows = [line.split() for line in listed.splitlines()]
    committed = {
        row[0]: row[1] if len(row) == 3 else "" for row in rows[1:] if row and row[-1] == "Committed"
    }
    tops = [key for key in committed if key not in committed.values()]
    assert len(tops) == 1, rows
    return tops[0]


@dataclass
class BlockRun:
    """What `run_on_snapshotter` saw: the container's output, its snapshot's mount source (a blockfile
    image or a devmapper device), and the host's state while the container ran and after."""

    output: str = ""
    returncode: int | None = None
    source: Path = Path()
    options: list[str] = field(default_factory=list)
    source_was_file: bool = False
    during: dict[str, object] = field(default_factory=dict)
    after: dict[str, object] = field(default_factory=dict)
    shims: int = 0
    log: str = ""


def host_state(ctrd: PrivateContainerd, source: Path) -> dict[str, object]:
    """Whether the host has ``source`` behind a loop device or mounted (by its path, the node it names or
    that node's major:minor), and the mounts below containerd."""
    paths = {str(source), os.path.realpath(source)}
    try:
        st = os.stat(source)
        device = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" if stat.S_ISBLK(st.st_mode) else ""
    except OSError:
        device = ""
    return {
        "looped": bool(paths & set(loop_backing_files())),
        "mounted": bool(paths & set(mounted_sources())) or (bool(device) and device in mounted_devices()),
        "mounts below containerd": mounts_below(ctrd.base),
    }


def run_on_snapshotter(ctrd: PrivateContainerd, runtime: str, cid: str = CID) -> BlockRun:
    """``ctr run --rm --snapshotter SNAPSHOTTER --runtime RUNTIME busybox CID sh -c SCRIPT`` with the
    containerd's snapshotter: once the script is READY, the host's state and the shim count; then SIGTERM
    ends it; then the host's state again."""
    assert ctrd.snapshotter is not None
    out_path = ctrd.base / f"{cid}.out"
    argv = ctrd.ctr_argv(
        "run", "--rm", "--snapshotter", ctrd.snapshotter.name, "--runtime", runtime,
        BUSYBOX_IMAGE, cid, "sh", "-c", SCRIPT,
    )  # fmt: skip
    with open(out_path, "wb") as out:
        run = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=ctrd.env
        )
    seen = BlockRun()

    def output() -> str:
        return out_path.read_text(errors="replace")

    def log() -> str:
        return f"ctr run: {output()}\n--- containerd log tail ---\n{ctrd.log_tail(100)}"

    try:
        eventually(
            lambda: "BLOCK-ROOT-READY" in output() or run.poll() is not None, "the container ready", log
        )
        assert run.poll() is None, log()
        # while the container runs
        seen.source, seen.options = snapshot_source(ctrd, cid)
        seen.source_was_file = seen.source.is_file()
        seen.during = host_state(ctrd, seen.source)
        seen.shims = len(ctrd.shim_pids())
        ctrd.ctr("task", "kill", "-s", "SIGTERM", cid)
        seen.returncode = run.wait(timeout=RUN_TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
            ctrd.remove(cid)
    seen.output, seen.log = output(), log()
    seen.after = host_state(ctrd, seen.source)
    seen.after["containers"] = ctrd.ctr("containers", "ls", "-q").stdout.split()
    # ctr run --rm removed the snapshot (a blockfile image goes at containerd's next garbage collection)
    listed = ctrd.ctr("snapshots", "--snapshotter", ctrd.snapshotter.name, "ls").stdout
    seen.after["snapshot"] = cid in listed.split()
    return seen


# --- lab: ctr run with the snapshot as the container's disk ------------------------------------------
SETUPS = [
    pytest.param(BLOCKFILE, id="blockfile-containerd-2.x"),
    pytest.param(DEVMAPPER, id="devmapper-containerd-1.6"),
]


@pytest.fixture(scope="module", params=SETUPS)
def block_ctrd(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[PrivateContainerd]:
    """The module's containerd with a block snapshotter (blockfile on 2.x, devmapper on 1.6), busybox
    unpacked into it and the guest assets installed."""
    if not in_labvm():
        pytest.fail("the containerd lab tests run inside the lab VM", pytrace=False)
    snapshotter: Snapshotter
    if request.param == BLOCKFILE:
        reason = containerd2_missing()
        if reason is not None:
            pytest.skip(reason)
        snapshotter = BlockfileSnapshotter()
    else:
        snapshotter = DevmapperSnapshotter()
    with busybox_containerd(tmp_path_factory.mktemp("image"), snapshotter=snapshotter) as ctrd:
        yield ctrd


@pytest.mark.lab
def test_a_block_snapshot_is_the_containers_disk_and_the_host_never_mounts_it(
    block_ctrd: PrivateContainerd,
) -> None:
    ctrd = block_ctrd
    seen = run_on_snapshotter(ctrd, KATA_RUNTIME)
    assert seen.returncode == 0, seen.log
    assert ROOT_LINE.search(seen.output), seen.log  # / is ext4 on the hot-plugged /dev/vdX
    assert seen.output.count("kata-block-rootfs") == 1 and "BLOCK-ROOT-BYE" in seen.output, seen.log
    if isinstance(ctrd.snapshotter, BlockfileSnapshotter):  # a regular file with "loop": our addition
        assert seen.source_was_file and "loop" in seen.options, (seen.source, seen.options)
    else:  # devmapper's thin device (runtime-rs's block rootfs)
        assert seen.source.parent == Path("/dev/mapper"), seen.source
    # while it ran: the snapshot was the guest's disk and nothing of it was on the host; one shim
    assert seen.during == {"looped": False, "mounted": False, "mounts below containerd": []}, seen.log
    assert seen.shims == 1, seen.log
    assert f"container {CID}: rootfs {seen.source} (ext4) is /dev/vd" in ctrd.log(), seen.log
    # after the run: the shim and every trace of the container are gone
    eventually(lambda: not ctrd.shim_pids(), "the shim gone", ctrd.log_tail)
    gone: dict[str, object] = {
        "looped": False, "mounted": False, "mounts below containerd": [], "containers": [], "snapshot": False
    }  # fmt: skip
    assert seen.after == gone, seen.log
    if isinstance(ctrd.snapshotter, DevmapperSnapshotter):  # containerd's snapshot removal takes it away
        snapshotter = ctrd.snapshotter
        eventually(
            lambda: seen.source.name not in snapshotter.devices(), "the thin device removed", ctrd.log_tail
        )
    assert not list(KATA_STATE_ROOT.glob(f"*{CID}*")), list(KATA_STATE_ROOT.glob("*"))


# --- host: the configuration, and what blockfile hands a runtime --------------------------------------
def test_blockfile_configuration_makes_an_ext4_scratch_and_lists_blockfile_for_unpacking(
    tmp_path: Path,
) -> None:
    snapshotter = BlockfileSnapshotter(size_mib=32)
    config = tomllib.loads(snapshotter.render(tmp_path))
    plugin = config["plugins"]["io.containerd.snapshotter.v1.blockfile"]
    scratch = snapshotter.scratch(tmp_path)
    assert plugin == {
        "scratch_file": str(scratch),
        "fs_type": "ext4",
        "mount_options": ["loop"],
        "recreate_scratch": True,
    }
    unpack = config["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"]
    assert [(u["platform"], u["snapshotter"]) for u in unpack] == [
        ("linux/amd64", "overlayfs"),
        ("linux/amd64", "blockfile"),
    ]
    assert scratch.stat().st_size == 32 << 20
    with open(scratch, "rb") as f:
        f.seek(1024 + 0x38)  # the ext2/3/4 superblock's s_magic
        assert f.read(2) == b"\x53\xef"
    with (
        pytest.raises(ValueError, match=r"needs containerd 2\.x"),
        lab_containerd.private_containerd(version=CONTAINERD_1_6, snapshotter=snapshotter),
    ):
        pass


@pytest.mark.containerd
@pytest.mark.root
@pytest.mark.skipif(lab_containerd._fixture.skip_reason() is not None, reason="needs root and containerd")
@needs_containerd2
def test_the_mount_blockfile_returns_is_taken_by_the_shim_as_a_block_rootfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real containerd 2.x, no VM: busybox unpacked into blockfile; an active snapshot's Mount (ext4 on a
    regular file, "loop" and "rw") is a block rootfs for the shim, whose guest options drop "loop"; the
    host holds no mount and no loop device of that snapshot after unpacking."""
    from images import busybox_oci

    monkeypatch.setattr(lab_containerd, "keep_log", lambda path: None)
    tar = busybox_oci.build(tmp_path / "busybox.tar")
    with lab_containerd.private_containerd(snapshotter=BlockfileSnapshotter(size_mib=32)) as ctrd:
        assert ctrd.version == lab_containerd.CONTAINERD_2
        ctrd.import_image(tar)
        prepare = ("snapshots", "--snapshotter", BLOCKFILE, "prepare", "--mounts", "active1", top_layer(ctrd))
        mounts = [
            RootfsMount(m["Type"], m["Source"], m.get("Target") or "", tuple(m["Options"]))
            for m in json.loads(ctrd.ctr(*prepare).stdout)
        ]
        assert len(mounts) == 1 and mounts[0].type == "ext4" and set(mounts[0].options) == {"loop", "rw"}
        source = Path(mounts[0].source)
        assert source.parent == BlockfileSnapshotter().root(ctrd.root) / "snapshots", source
        assert block_rootfs_source(mounts) == source
        assert guest_mount_options(mounts[0].options) == ["rw"]
        assert snapshot_source(ctrd, "active1") == (source, ["loop", "rw"])
        assert str(source) not in loop_backing_files() and str(source) not in mounted_sources()
        assert not mounts_below(ctrd.base)


@pytest.mark.containerd
@pytest.mark.root
@pytest.mark.skipif(lab_containerd._fixture.skip_reason() is not None, reason="needs root and containerd")
@needs_containerd2
def test_with_runc_the_host_mounts_the_snapshot_and_run_on_snapshotter_sees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control of the lab test's checks, on the host without a VM: runc's shim mounts the blockfile
    snapshot through a loop device, and `run_on_snapshotter` reports exactly that while the container runs,
    and nothing once ``ctr run --rm`` is done."""
    from images import busybox_oci

    monkeypatch.setattr(lab_containerd, "keep_log", lambda path: None)
    tar = busybox_oci.build(tmp_path / "busybox.tar")
    with lab_containerd.private_containerd(snapshotter=BlockfileSnapshotter(size_mib=32)) as ctrd:
        ctrd.import_image(tar)
        seen = run_on_snapshotter(ctrd, "io.containerd.runc.v2")
    assert seen.returncode == 0, seen.log
    assert re.search(r"^/dev/loop\d+ / ext4 rw", seen.output, re.MULTILINE), seen.output
    assert "kata-block-rootfs" in seen.output and "BLOCK-ROOT-BYE" in seen.output, seen.output
    assert seen.during["looped"] is True and seen.during["mounts below containerd"], seen.during
    assert seen.after == {
        "looped": False, "mounted": False, "mounts below containerd": [], "containers": [], "snapshot": False
    }  # fmt: skip


def test_devmapper_configuration_names_the_pool_and_its_table_spans_the_data_file() -> None:
    """What the lab's thin pool and containerd 1.6's devmapper table say (the host cannot make the pool:
    its kernel has no device-mapper)."""
    snapshotter = DevmapperSnapshotter(data_mib=1024, base_image_size_mib=64, pool="kata-lab-t")
    assert tomllib.loads(snapshotter.plugin_table())["plugins"]["io.containerd.snapshotter.v1.devmapper"] == {
        "pool_name": "kata-lab-t",
        "base_image_size": "64MB",
        "discard_blocks": True,
        "fs_type": "ext4",
    }
    snapshotter.loops = ["/dev/loop7", "/dev/loop8"]  # metadata, data: as render sets them up
    assert snapshotter.table() == "0 2097152 thin-pool /dev/loop7 /dev/loop8 128 32768 1 skip_block_zeroing"
    snapshotter.loops = []
    with (
        pytest.raises(ValueError, match=r"needs containerd 1\.6"),
        lab_containerd.private_containerd(version=lab_containerd.CONTAINERD_2, snapshotter=snapshotter),
    ):
        pass
