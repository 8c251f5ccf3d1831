"""Pod-wide IPC/UTS (and, when asked, PID) namespaces shared by a sandbox's containers.

The agent runs in this test process, so every test that creates a sandbox first moves the test's thread
into a private UTS namespace (`private_uts`) and checks afterwards that the host's hostname is what it
was: a regression that sets the hostname outside the pod's namespace renames nothing but that private
namespace, and still fails the test.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from agent_harness import mounts_under, running_agent

from kata_agent._namespaces import CLONE_NEWUTS, PodNamespaces
from kata_agent_client import AgentInvalidArgument, ContainerSpec, Mount, Process, Storage

_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def private_uts() -> Iterator[str]:
    """Run the test's thread (where trio runs the agent's handlers) in a new UTS namespace; on the way out,
    return to the host's and assert its hostname did not change. Yields the private namespace's name."""
    if os.geteuid() != 0:
        pytest.skip("needs root (unshare, mount)")
    host_fd = os.open("/proc/thread-self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    host_name = socket.gethostname()
    try:
        assert _libc.unshare(CLONE_NEWUTS) == 0, os.strerror(ctypes.get_errno())
        try:
            yield socket.gethostname()
        finally:
            assert _libc.setns(host_fd, CLONE_NEWUTS) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(host_fd)
    assert socket.gethostname() == host_name, "the host's hostname changed"


def _hostname_in(uts_path: str) -> str:
    """gethostname() on a thread that joined the UTS namespace at `uts_path`."""
    out: list[str] = []

    def look() -> None:
        fd = os.open(uts_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWUTS) == 0:
                out.append(socket.gethostname())
        finally:
            os.close(fd)

    thread = threading.Thread(target=look)
    thread.start()
    thread.join()
    assert out, "could not join the pod's UTS namespace"
    return out[0]


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_apply_points_the_containers_namespaces_at_the_pod() -> None:
    ns = PodNamespaces("/run/kata-containers/sandbox/ns", share_pid=True)
    config = {"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]}}
    ns.apply(config)  # no pid namespace yet: the first container makes it
    assert config["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "ipc", "path": "/run/kata-containers/sandbox/ns/ipc"},
        {"type": "mount"},
        {"type": "uts", "path": "/run/kata-containers/sandbox/ns/uts"},
    ]
    ns.container_created(42)
    ns.container_created(43)  # only the first container's counts
    ns.apply(config)
    assert config["linux"]["namespaces"][0] == {"type": "pid", "path": "/proc/42/ns/pid"}


def test_pid_namespace_is_not_shared_unless_asked() -> None:
    ns = PodNamespaces("/x")
    ns.container_created(42)
    config: dict = {"linux": {"namespaces": [{"type": "pid"}]}}
    ns.apply(config)
    assert config["linux"]["namespaces"][0] == {"type": "pid"}


def test_a_container_that_asks_joins_the_first_containers_pid_namespace() -> None:
    """CreateContainerRequest.sandbox_pidns (CRI's shareProcessNamespace) shares it for that container even
    when CreateSandbox did not ask for the whole pod (the shim cannot see shareProcessNamespace there)."""
    ns = PodNamespaces("/x")
    ns.container_created(42)
    mine: dict = {"linux": {"namespaces": [{"type": "pid"}]}}
    ns.apply(mine, share_pid=True)
    assert mine["linux"]["namespaces"][0] == {"type": "pid", "path": "/proc/42/ns/pid"}
    other: dict = {"linux": {"namespaces": [{"type": "pid"}]}}
    ns.apply(other)
    assert other["linux"]["namespaces"][0] == {"type": "pid"}


@pytest.mark.root
def test_sandbox_hostname_is_set_in_the_pod_namespace_only(private_uts: str) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            await agent.client.create_sandbox("sbx", hostname="kata-pod-host")
            pod = agent.service.pod_namespaces
            assert pod is not None
            assert socket.gethostname() == private_uts  # the agent's own (the guest's) is untouched
            assert _hostname_in(pod.uts) == "kata-pod-host"
            assert set(mounts_under(pod.dir)) == {pod.ipc, pod.uts}
            await agent.client.destroy_sandbox()
            assert mounts_under(pod.dir) == []
            dirs.append(pod.dir)

    dirs: list[str] = []
    trio.run(main)
    assert not os.path.exists(dirs[0])


@pytest.mark.root
def test_bad_hostname_fails_create_sandbox_and_leaves_nothing(private_uts: str) -> None:

    async def main() -> None:
        async with running_agent() as agent:
            with pytest.raises(AgentInvalidArgument, match="sethostname"):
                await agent.client.create_sandbox("sbx", hostname="h" * 100)
            assert mounts_under(agent.run_dir) == []
            assert agent.service.pod_namespaces is None
            assert socket.gethostname() == private_uts

    trio.run(main)


@pytest.mark.root
@pytest.mark.parametrize("share_pid", [False, True])
def test_containers_of_a_sandbox_share_ipc_and_uts(
    busybox_rootfs: Path, private_uts: str, share_pid: bool
) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            await c.create_sandbox("sbx", hostname="pod", sandbox_pidns=share_pid)
            pids = []
            for cid in ("pause", "app"):
                spec = ContainerSpec(
                    root=str(busybox_rootfs), process=Process(["sleep", "100"]), hostname="pod"
                )
                await c.create_container(cid, spec)
                await c.start_container(cid)
                init = agent.service.containers[cid].init
                assert init is not None
                pids.append(init.pid)
            a, b = pids
            for kind in ("ipc", "uts"):
                assert _ns(a, kind) == _ns(b, kind)
                assert _ns(a, kind) != _ns(os.getpid(), kind)
            assert (_ns(a, "pid") == _ns(b, "pid")) is share_pid
            assert _ns(a, "mnt") != _ns(b, "mnt")
            await c.destroy_sandbox()
            assert mounts_under(agent.run_dir) == []
            assert socket.gethostname() == private_uts

    trio.run(main)


@pytest.mark.root
def test_a_container_created_with_sandbox_pidns_joins_the_pause_containers_pid_namespace(
    busybox_rootfs: Path, private_uts: str
) -> None:
    """End to end through the client: CreateSandbox without sandbox_pidns, then "app" created with it shares
    "pause"'s PID namespace and "other", created without, does not (the shim sends it per container)."""

    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            await c.create_sandbox("sbx", hostname="pod")
            pids = {}
            for cid, share in (("pause", False), ("app", True), ("other", False)):
                spec = ContainerSpec(root=str(busybox_rootfs), process=Process(["sleep", "100"]))
                await c.create_container(cid, spec, sandbox_pidns=share)
                await c.start_container(cid)
                init = agent.service.containers[cid].init
                assert init is not None
                pids[cid] = init.pid
            assert _ns(pids["app"], "pid") == _ns(pids["pause"], "pid")
            assert _ns(pids["other"], "pid") != _ns(pids["pause"], "pid")
            await c.destroy_sandbox()
            assert mounts_under(agent.run_dir) == []

    trio.run(main)


@pytest.mark.root
def test_containers_of_a_sandbox_see_one_hostname_and_one_dev_shm(
    busybox_rootfs: Path, private_uts: str
) -> None:
    """The pod's shm storage (as kata_resources.pod_shm_storage plans it) bound on each /dev/shm."""

    def spec(*args: str) -> ContainerSpec:
        out = ContainerSpec(root=str(busybox_rootfs), process=Process(list(args)))
        out.mounts = [m for m in out.mounts if m.destination != "/dev/shm"]
        out.mounts.append(Mount("/dev/shm", "bind", shm, ["rbind"]))
        return out

    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            pod_shm = Storage(
                "ephemeral", shm, source="shm", fstype="tmpfs", options=["mode=1777", "size=1m"]
            )
            await c.create_sandbox("sbx", hostname="podname", storages=[pod_shm])
            await c.create_container("writer", spec("sh", "-c", "echo shared > /dev/shm/f"))
            await c.start_container("writer")
            assert await c.wait_process("writer") == 0
            await c.create_container("reader", spec("sh", "-c", "hostname; cat /dev/shm/f"))
            await c.start_container("reader")
            assert await c.read_all("reader") == b"podname\nshared\n"
            assert await c.wait_process("reader") == 0
            await c.destroy_sandbox()
            assert mounts_under(agent.run_dir) == []
            assert mounts_under(shm) == []
            assert socket.gethostname() == private_uts

    shm = tempfile.mkdtemp(prefix="ka-shm-", dir="/tmp")
    try:
        trio.run(main)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
