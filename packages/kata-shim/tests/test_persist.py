"""state.json under the sandbox directory, and cleanup after a crash."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kata_shim.persist import (
    CGROUP_KEY,
    DEFAULT_STATE_ROOT,
    NETWORK_KEY,
    SHARED_ROOT,
    PersistError,
    SandboxState,
    StateStore,
    cleanup_sandbox,
    mounts_below,
    process_start_time,
    sandbox_dir,
)


def test_save_load_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = SandboxState("sb1", namespace="ns", shim_pid=123, mounts=["/m"], extra={"tap": "tap0"})
    store.save(state)
    assert store.load("sb1") == state
    assert oct(store.path("sb1").parent.stat().st_mode & 0o777) == "0o700"
    state.shim_pid = 456
    store.save(state)
    assert store.load("sb1") == state
    # Only state.json: the temporary file was renamed over it.
    assert [p.name for p in store.path("sb1").parent.iterdir()] == ["state.json"]


def test_load_missing_is_none_and_corrupt_is_an_error(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load("nothing") is None
    store.path("bad").parent.mkdir()
    store.path("bad").write_text("{not json")
    with pytest.raises(PersistError, match="cannot read"):
        store.load("bad")
    store.path("bad").write_text('{"version": 99}')
    with pytest.raises(PersistError, match="not a version 1"):
        store.load("bad")


def test_update_adds_resources_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(SandboxState("sb"))
    store.update("sb", mounts=["/a"], paths=["/p"], pids=[7])
    state = store.update("sb", mounts=["/a", "/b"], extra={"k": 1})
    assert (state.mounts, state.paths, state.pids, state.extra) == (["/a", "/b"], ["/p"], [7], {"k": 1})


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b"])
def test_sandbox_dir_rejects_ids_that_escape(tmp_path: Path, bad: str) -> None:
    with pytest.raises(PersistError):
        sandbox_dir(bad, tmp_path)


def test_cleanup_kills_recorded_processes_and_removes_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "run")
    helper = subprocess.Popen(["sleep", "60"])
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    (outside / "f").write_text("x")
    try:
        store.save(SandboxState("sb", pids=[helper.pid], paths=[str(outside)]))
        (sandbox_dir("sb", store.root) / "kata.hvsock").write_text("")
        report = cleanup_sandbox("sb", store)
        assert helper.wait(timeout=5) == -9
    finally:
        helper.kill()
    assert report.killed == [helper.pid]
    assert not outside.exists()
    assert not sandbox_dir("sb", store.root).exists()
    assert report.errors == []
    # Idempotent.
    assert cleanup_sandbox("sb", store).removed == []


def test_cleanup_spares_a_reused_pid(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    helper = subprocess.Popen(["sleep", "60"])
    try:
        start = process_start_time(helper.pid)
        assert start is not None
        store.save(SandboxState("sb", shim_pid=helper.pid, shim_start_time=start + 1))
        assert cleanup_sandbox("sb", store).killed == []
        assert helper.poll() is None
    finally:
        helper.kill()
        helper.wait()


def test_cleanup_survives_a_corrupt_state_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path("sb").parent.mkdir()
    store.path("sb").write_text("garbage")
    report = cleanup_sandbox("sb", store)
    assert report.errors and "cannot read" in report.errors[0]
    assert not store.path("sb").parent.exists()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_cleanup_unmounts_everything_below_the_sandbox_dir(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(SandboxState("sb"))
    shared = sandbox_dir("sb", store.root) / "shared"
    nested = shared / "rootfs"
    shared.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(shared)], check=True)
    try:
        nested.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(nested)], check=True)
        assert mounts_below(sandbox_dir("sb", store.root)) == [str(nested), str(shared)]
        report = cleanup_sandbox("sb", store)
    finally:
        for point in (nested, shared):
            subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
    assert report.unmounted == [str(nested), str(shared)]
    assert mounts_below(tmp_path) == []
    assert not sandbox_dir("sb", store.root).exists()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_cleanup_follows_the_mount_ledger_and_the_shared_directory(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "run", shared_root=tmp_path / "shared")
    share = tmp_path / "shared" / "sb" / "shared" / "c1" / "rootfs"
    elsewhere = tmp_path / "elsewhere"
    share.mkdir(parents=True)
    elsewhere.mkdir()
    store.save(SandboxState("sb"))
    try:
        for point in (share, elsewhere):
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(point)], check=True)
        ledger = sandbox_dir("sb", store.root) / "mounts.json"
        ledger.write_text(json.dumps([str(share), str(elsewhere)]))
        report = cleanup_sandbox("sb", store)
    finally:
        for point in (share, elsewhere):
            subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)
    # The ledger is undone newest first.
    assert report.unmounted == [str(elsewhere), str(share)]
    assert mounts_below(tmp_path) == []
    assert not (tmp_path / "shared" / "sb").exists()
    assert not sandbox_dir("sb", store.root).exists()


def test_a_private_state_root_never_reaches_the_host_shared_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KATA_SHIM_SHARED_ROOT", raising=False)
    assert StateStore(tmp_path).shared_root is None
    assert StateStore(DEFAULT_STATE_ROOT).shared_root == SHARED_ROOT
    monkeypatch.setenv("KATA_SHIM_SHARED_ROOT", str(tmp_path / "s"))
    assert StateStore(tmp_path).shared_root == tmp_path / "s"


def test_forget_drops_extra_keys(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.update("sb1", extra={"network": {"netns": "/x"}, "cgroup": {"path": "p"}})
    store.forget("sb1", "network")
    state = store.load("sb1")
    assert state is not None and state.extra == {"cgroup": {"path": "p"}}
    store.forget("sb2", "network")  # nothing saved: nothing to do
    assert store.load("sb2") is None


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, tc, cgroups)")
def test_cleanup_after_a_crash_tears_down_the_recorded_network_and_cgroup(tmp_path: Path) -> None:
    """A shim killed mid-pod leaves taps, tc redirects and its host cgroup; `cleanup_sandbox` (the
    `delete` path) finds them in state.json and removes them."""
    from kata_resources import SandboxCgroup, cgroup_version, setup_network_sync

    name = f"kvp-pod-{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    rel = f"kvp-test-{os.getpid()}"
    cg = None
    try:
        ip = ["ip", "-n", name]
        subprocess.run([*ip, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"], check=True)
        subprocess.run([*ip, "link", "set", "eth0", "up"], check=True)
        network = setup_network_sync(f"/run/netns/{name}")
        assert [e.tap for e in network.endpoints] == ["tap0_kata", "tap1_kata"]  # both ends are here
        cg = SandboxCgroup.create("sb1", f"/{rel}", sandbox_cgroup_only=True)
        store = StateStore(tmp_path)
        store.update("sb1", extra={NETWORK_KEY: network.to_dict(), CGROUP_KEY: cg.to_dict()})

        report = cleanup_sandbox("sb1", store, kill_shim=False)

        assert not report.errors, report.errors
        links = subprocess.run([*ip, "-o", "link", "show"], check=True, capture_output=True, text=True).stdout
        assert "_kata" not in links
        qdiscs = subprocess.run(
            ["tc", "-n", name, "qdisc", "show", "dev", "eth0"], check=True, capture_output=True, text=True
        ).stdout
        assert "ingress" not in qdiscs
        assert not any(d.exists() for d in cg.dirs(rel)), cg.dirs(rel)
        assert cgroup_version() in (1, 2)
        cg = None
    finally:
        if cg is not None:
            cg.delete()
        subprocess.run(["ip", "netns", "delete", name], check=False)
