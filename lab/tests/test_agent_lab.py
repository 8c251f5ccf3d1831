"""The kata-agent in the sandbox guest on kata-vmm, driven by kata-agent-client over hybrid vsock (``lab``).

One sandbox guest is booted for the module (boots cost tens of seconds under nested KVM): initrd-sandbox +
rootfs-sandbox.ext4 read-only as /dev/vda, hybrid vsock, a virtio-fs share holding a busybox root, a tap in
a fresh network namespace. The fixture waits for Health.Check SERVING and sends CreateSandbox with the
virtio-fs storage; every test then dials the agent again and runs its containers with crun in the guest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from framework import GuestAssets
from framework.assets import REPO
from framework.sandbox import (
    SANDBOX_CMDLINE,
    SHARE_TAG,
    SandboxVM,
    TapNetns,
    make_busybox_rootfs,
    spawn_sandbox,
    tap_netns,
    wait_for_socket,
)

from kata_agent_client import (
    AgentAlreadyExists,
    AgentClient,
    AgentFailedPrecondition,
    AgentNotFound,
    ContainerSpec,
    Interface,
    IPAddress,
    Process,
    Resources,
    Storage,
    open_agent_client,
)
from kata_shim.virt_container._passfd import PassfdListener, passfd_stdio

sys.path.insert(0, str(REPO / "packages" / "kata-agent" / "tests"))
from agent_harness import fd_chunks  # type: ignore[import-not-found]

pytestmark = pytest.mark.lab

SHARED_MOUNT = "/run/kata-containers/shared/containers"
ROOTFS = f"{SHARED_MOUNT}/bb/rootfs"
GUEST_MAC = "52:54:00:78:00:02"
GUEST_IP = "10.78.0.2"
PASSFD_PORT = 1027


class Sandbox:
    """The module's booted guest, its network namespace and the seconds it took to answer SERVING."""

    def __init__(self, vm: SandboxVM, net: TapNetns, ready_s: float) -> None:
        self.vm = vm
        self.net = net
        self.ready_s = ready_s

    def run(self, fn: Callable[[AgentClient], Awaitable[None]], timeout: float = 300) -> None:
        """Dial the agent afresh and run ``fn`` with the client (console tail on failure)."""

        async def main() -> None:
            with trio.fail_after(timeout):
                async with open_agent_client(self.vm.agent_address, ready_timeout=60) as client:
                    await fn(client)

        try:
            trio.run(main)
        except BaseException:
            print(self.vm.vm.console[-3000:])
            raise


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    workdir = tmp_path_factory.mktemp("agent")
    with tap_netns() as net:
        vm = spawn_sandbox(
            workdir,
            GuestAssets(),
            netns=net.netns,
            tap=net.tap,
            mac=GUEST_MAC,
            cmdline=f"{SANDBOX_CMDLINE} agent.passfd_listener_port={PASSFD_PORT}",
        )
        try:
            make_busybox_rootfs(vm.share / "bb" / "rootfs")
            wait_for_socket(vm.uds)

            async def boot() -> float:
                async with open_agent_client(vm.agent_address, ready_timeout=600, retry_interval=0.1) as c:
                    ready = time.monotonic() - vm.started_at
                    assert await c.check()
                    storage = Storage("virtio-fs", SHARED_MOUNT, source=SHARE_TAG, fstype="virtiofs")
                    await c.create_sandbox("lab-sandbox", hostname="lab", storages=[storage])
                    return ready

            try:
                ready_s = trio.run(boot)
            except BaseException:
                print(vm.vm.console[-3000:])
                raise
            print(f"sandbox guest: VM start to SERVING in {ready_s:.1f} s")
            yield Sandbox(vm, net, ready_s)
        finally:
            vm.vm.kill()


def spec(*args: str, terminal: bool = False, memory: int = 0) -> ContainerSpec:
    s = ContainerSpec(root=ROOTFS, process=Process(list(args), terminal=terminal))
    s.memory_limit = memory
    return s


async def start(c: AgentClient, cid: str, container: ContainerSpec) -> None:
    await c.create_container(cid, container)
    await c.start_container(cid)


def test_check_serving_and_version(sandbox: Sandbox) -> None:
    async def case(c: AgentClient) -> None:
        assert await c.check()
        assert (await c.version()).agent_version
        details = await c.get_guest_details()
        assert "virtio-fs" in details.storage_handlers

    sandbox.run(case)


def test_stdout_stderr_and_exit_status_are_exact(sandbox: Sandbox) -> None:
    async def case(c: AgentClient) -> None:
        await start(c, "c1", spec("sh", "-c", "echo out; echo err >&2; exit 3"))
        got: dict[str, bytes] = {}
        async with trio.open_nursery() as n:

            async def read(stderr: bool) -> None:
                got["err" if stderr else "out"] = await c.read_all("c1", stderr=stderr)

            n.start_soon(read, False)
            n.start_soon(read, True)
            assert await c.wait_process("c1") == 3
        assert got == {"out": b"out\n", "err": b"err\n"}
        await c.remove_container("c1")

    sandbox.run(case)


def test_one_mebibyte_through_cat_is_byte_identical(sandbox: Sandbox) -> None:
    data = os.urandom(1 << 20)

    async def case(c: AgentClient) -> None:
        await start(c, "cat", spec("cat"))
        out: list[bytes] = []
        async with trio.open_nursery() as n:

            async def feed() -> None:
                for i in range(0, len(data), 200_000):
                    await c.write_stdin("cat", "", data[i : i + 200_000])
                await c.write_stdin("cat", "", b"")

            async def drain() -> None:
                out.append(await c.read_all("cat"))

            n.start_soon(feed)
            n.start_soon(drain)
        assert await c.wait_process("cat") == 0
        assert len(out[0]) == len(data)
        assert out[0] == data
        await c.remove_container("cat")

    sandbox.run(case)


def test_exec_in_running_container_and_sigterm_reaches_init(sandbox: Sandbox) -> None:
    async def case(c: AgentClient) -> None:
        script = 'trap "exit 7" TERM; echo ready; while true; do sleep 0.1; done'
        await start(c, "svc", spec("sh", "-c", script))
        assert await c.read_stdout("svc") == b"ready\n"
        await c.exec_process("svc", "e1", Process(["sh", "-c", "echo exec; cat /proc/1/cmdline"]))
        out = await c.read_all("svc", "e1")
        assert out.startswith(b"exec\n") and b"sh\0-c\0trap" in out
        assert await c.wait_process("svc", "e1") == 0
        await c.exec_process("svc", "sleeper", Process(["sleep", "100"]))
        await c.signal_process("svc", "sleeper", signal.SIGKILL)
        assert await c.wait_process("svc", "sleeper") == 128 + signal.SIGKILL
        await c.signal_process("svc", "", signal.SIGTERM)
        assert await c.wait_process("svc") == 7
        await c.remove_container("svc")

    sandbox.run(case)


def test_sigkill_reaches_init(sandbox: Sandbox) -> None:
    async def case(c: AgentClient) -> None:
        await start(c, "k", spec("sleep", "100"))
        await c.signal_process("k", "", signal.SIGKILL)
        assert await c.wait_process("k") == 128 + signal.SIGKILL
        await c.remove_container("k")

    sandbox.run(case)


def test_terminal_process_sees_resize(sandbox: Sandbox) -> None:
    async def case(c: AgentClient) -> None:
        script = 'stty size; trap "stty size; exit 0" WINCH; echo armed; while true; do sleep 0.1; done'
        await start(c, "tty", spec("sh", "-c", script, terminal=True))
        text = b""
        with trio.fail_after(60):
            while b"armed" not in text:
                chunk = await c.read_stdout("tty")
                assert chunk, f"EOF before armed: {text!r}"
                text += chunk
        await c.tty_win_resize("tty", "", 33, 101)
        with trio.fail_after(60):
            while chunk := await c.read_stdout("tty"):
                text += chunk
        assert b"33 101" in text, text
        assert await c.wait_process("tty") == 0
        await c.remove_container("tty")

    sandbox.run(case)


def test_pause_resume_update_and_stats_report_memory(sandbox: Sandbox) -> None:
    async def case(c: AgentClient) -> None:
        script = "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.05; done"
        await start(c, "p", spec("sh", "-c", script, memory=64 << 20))
        await trio.sleep(1)
        stats = await c.stats_container("p")
        assert stats.memory_usage > 0
        assert stats.memory_limit == 64 << 20
        assert stats.pids_current >= 1
        await c.pause_container("p")
        with pytest.raises(AgentFailedPrecondition):
            await c.exec_process("p", "frozen", Process(["true"]))
        await trio.sleep(0.5)
        paused = await c.stats_container("p")
        await trio.sleep(1)
        still = await c.stats_container("p")
        assert still.cpu_total_ns == paused.cpu_total_ns
        await c.resume_container("p")
        await trio.sleep(1)
        assert (await c.stats_container("p")).cpu_total_ns > still.cpu_total_ns
        await c.update_container("p", Resources(memory_limit=96 << 20))
        assert (await c.stats_container("p")).memory_limit == 96 << 20
        await c.remove_container("p")

    sandbox.run(case)


def test_update_interface_gives_guest_nic_an_address(sandbox: Sandbox) -> None:
    async def case(c: AgentClient) -> None:
        nics = [i for i in await c.list_interfaces() if i.hw_addr.lower() == GUEST_MAC]
        assert len(nics) == 1, await c.list_interfaces()
        nic = nics[0]
        updated = await c.update_interface(
            Interface(name=nic.name, hw_addr=GUEST_MAC, mtu=1500, addresses=[IPAddress(GUEST_IP, 24)])
        )
        assert any(a.address == GUEST_IP and a.prefix == 24 for a in updated.addresses)
        listed = {i.name: i for i in await c.list_interfaces()}
        assert any(a.address == GUEST_IP for a in listed[nic.name].addresses)

    sandbox.run(case)
    # the host end of the tap reaches the address the agent configured
    ping = subprocess.run(
        ["ip", "netns", "exec", sandbox.net.netns, "busybox", "ping", "-c", "1", "-W", "10", GUEST_IP],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr


def test_container_over_memory_limit_gives_oom_event(sandbox: Sandbox) -> None:
    async def case(c: AgentClient) -> None:
        # tail keeps an ever-growing line of zeros in memory: the OOM killer takes it
        await start(c, "hog", spec("sh", "-c", "tail /dev/zero; sleep 100", memory=16 << 20))
        with trio.fail_after(120):
            assert await c.get_oom_event() == "hog"
        await c.remove_container("hog")

    sandbox.run(case)


def test_unknown_container_and_duplicate_id_get_status_codes(sandbox: Sandbox) -> None:
    async def case(c: AgentClient) -> None:
        with pytest.raises(AgentNotFound):
            await c.start_container("nope")
        await c.create_container("dup", spec("sleep", "100"))
        with pytest.raises(AgentAlreadyExists):
            await c.create_container("dup", spec("true"))
        await c.remove_container("dup")

    sandbox.run(case)


def test_share_is_the_busybox_root(sandbox: Sandbox) -> None:
    """The container's / is the host directory shared by virtio-fs (a file written there is seen)."""
    marker = sandbox.vm.share / "bb" / "rootfs" / "etc" / "marker"
    marker.write_text("from-host\n")

    async def case(c: AgentClient) -> None:
        await start(c, "m", spec("cat", "/etc/marker"))
        assert await c.read_all("m") == b"from-host\n"
        assert await c.wait_process("m") == 0
        await c.remove_container("m")

    sandbox.run(case)
    assert Path(marker).exists()


def test_passfd_stdio_out_err_split_and_stdin_round_trip(sandbox: Sandbox, tmp_path: Path) -> None:
    """Dragonball passfd: host fifos handed to kata-vmm, bridged to the agent's port 1027 (no ttrpc stdio)."""
    fifos = {name: tmp_path / name for name in ("stdin", "stdout", "stderr")}
    for f in fifos.values():
        os.mkfifo(f)

    async def case(c: AgentClient) -> None:
        # containerd's side opens its ends first: readers of stdout/stderr (and the stdin writer after).
        out_r = os.open(fifos["stdout"], os.O_RDONLY | os.O_NONBLOCK)
        err_r = os.open(fifos["stderr"], os.O_RDONLY | os.O_NONBLOCK)
        listener = PassfdListener(sandbox.vm.uds, PASSFD_PORT)
        ports = await passfd_stdio(
            listener, str(fifos["stdin"]), str(fifos["stdout"]), str(fifos["stderr"]), terminal=False
        )
        assert ports.stdin and ports.stdout and ports.stderr
        in_w = os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK)
        script = "read x; echo out-$x; echo err-$x >&2; exit 5"
        await c.create_container("pf1", spec("sh", "-c", script), stdio_ports=ports)
        await c.start_container("pf1")
        os.write(in_w, b"passfd\n")
        os.close(in_w)  # stdin EOF through the VMM's stream shutdown
        got: dict[str, bytes] = {}
        try:
            async with trio.open_nursery() as n:

                async def collect(name: str, fd: int) -> None:
                    got[name] = b"".join([chunk async for chunk in fd_chunks(fd)])

                n.start_soon(collect, "out", out_r)
                n.start_soon(collect, "err", err_r)
                assert await c.wait_process("pf1") == 5
        finally:
            os.close(out_r)
            os.close(err_r)
        assert got == {"out": b"out-passfd\n", "err": b"err-passfd\n"}
        await c.remove_container("pf1")

    sandbox.run(case, timeout=300)
