"""Passfd stdio in the shim: config keys, the dragonball kernel parameter, and the passfd handshake
against the real kata-virtio hybrid vsock muxer (its guest side driven through fake queues)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from kata_shim.config import ConfigError, load_config_file, shipped_config
from kata_shim.hypervisor._base import HypervisorConfig
from kata_shim.hypervisor._dragonball import Dragonball
from kata_shim.virt_container._passfd import PassfdError, PassfdListener, passfd_connect, passfd_stdio
from kata_virtio import VirtioVsock
from kata_virtio._vsock import (
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VSOCK_HDR,
)
from kata_virtio.testing import FakeGuestMemory, activate, event_thread


# -- config -----------------------------------------------------------------------------------------
def _write(tmp_path: Path, runtime_extra: str) -> Path:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"")
    path = tmp_path / "c.toml"
    path.write_text(
        f'[hypervisor.dragonball]\nkernel = "{kernel}"\n[agent.kata]\n[runtime]\nname = "virt_container"\n'
        + runtime_extra
    )
    return path


def test_passfd_keys_default_parse_and_shipped_config_turns_it_on(tmp_path: Path) -> None:
    cfg = load_config_file(_write(tmp_path, ""))
    assert (cfg.runtime.use_passfd_io, cfg.runtime.passfd_listener_port) == (False, 1027)
    cfg = load_config_file(_write(tmp_path, "use_passfd_io = true\npassfd_listener_port = 2000\n"))
    assert (cfg.runtime.use_passfd_io, cfg.runtime.passfd_listener_port) == (True, 2000)
    shipped = shipped_config().read_text()
    assert "use_passfd_io = true" in shipped and "passfd_listener_port = 1027" in shipped


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('use_passfd_io = "yes"\n', "runtime.use_passfd_io"),
        ("passfd_listener_port = 0\n", "runtime.passfd_listener_port"),
        ("passfd_listener_port = 4294967296\n", "runtime.passfd_listener_port"),
        ('passfd_listener_port = "1027"\n', "runtime.passfd_listener_port"),
    ],
)
def test_bad_passfd_keys_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config_file(_write(tmp_path, extra))


def test_dragonball_puts_the_port_on_the_kernel_cmdline(tmp_path: Path) -> None:
    hv = Dragonball(HypervisorConfig(kernel=tmp_path / "k"), state_root=tmp_path)
    assert "passfd" not in hv.cmdline() and hv.passfd_listener() is None
    hv.set_passfd_listener_port(1027)
    assert hv.cmdline().split()[-1] == "agent.passfd_listener_port=1027"
    hv.state_dir = tmp_path / "sb"
    assert hv.passfd_listener() == (tmp_path / "sb" / "kata.hvsock", 1027)


# -- the handshake against the real muxer -------------------------------------------------------------
class _Guest:
    """A guest vsock driver reduced to its queues: accepts every connection, records what arrives."""

    def __init__(self, dev: VirtioVsock) -> None:
        self.dev = dev
        self.mem = FakeGuestMemory(16 << 20)
        (self.rx, self.tx, _), _ = activate(dev, self.mem, [128, 128, 16])
        self.fill(32)
        self.requests: list[tuple[int, int]] = []  # (host port, guest port)
        self.data: dict[int, bytes] = {}
        self.shut: set[int] = set()
        self.outbox: list[tuple[int, int, bytes]] = []  # (host port, op, payload) to send
        self.lock = threading.Lock()

    def fill(self, n: int) -> None:
        for _ in range(n):
            self.rx.add_chain([(VSOCK_HDR.size, True), (4096, True)], indirect=True)
        self.dev.notify(0)

    def send(self, dst: int, op: int, payload: bytes = b"") -> None:
        # A SHUTDOWN is a full one (RCV|SEND), as Linux sends when the agent closes its socket.
        flags = 3 if op == VIRTIO_VSOCK_OP_SHUTDOWN else 0
        hdr = VSOCK_HDR.pack(3, 2, 1027, dst, len(payload), 1, op, flags, 1 << 20, 0)
        self.tx.add_chain([(hdr, False)] + ([(payload, False)] if payload else []))
        self.dev.notify(1)
        self.tx.get_used()

    def step(self) -> None:
        used = self.rx.get_used()
        for head, n in used:
            raw = self.rx.written(head, n)
            hdr = VSOCK_HDR.unpack_from(raw)
            src, op = hdr[2], hdr[6]
            if op == VIRTIO_VSOCK_OP_REQUEST:
                self.requests.append((src, hdr[3]))
                self.send(src, VIRTIO_VSOCK_OP_RESPONSE)
            elif op == VIRTIO_VSOCK_OP_RW:
                self.data[src] = self.data.get(src, b"") + raw[VSOCK_HDR.size : VSOCK_HDR.size + hdr[4]]
            elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
                self.shut.add(src)
        if used:
            self.fill(len(used))
        with self.lock:
            outbox, self.outbox = self.outbox, []
        for dst, op, payload in outbox:
            self.send(dst, op, payload)


@pytest.fixture
def muxer(tmp_path: Path) -> Iterator[tuple[VirtioVsock, _Guest]]:
    """The real muxer on its own thread (as the VMM's event thread runs it), with an accepting guest."""
    dev = VirtioVsock(tmp_path / "kata.hvsock")
    guest = _Guest(dev)
    try:
        with event_thread(dev, guest.step):
            yield dev, guest
    finally:
        dev.close()


def _fd_count(path: Path) -> int:
    """How many fds of this process (shim and in-process VMM alike) are open on `path`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile (the listing's own fd, the muxer)
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


def test_passfd_stdio_bridges_fifos_and_keeps_no_fd(
    tmp_path: Path, muxer: tuple[VirtioVsock, _Guest]
) -> None:
    dev, guest = muxer
    fifos = {name: tmp_path / name for name in ("stdin", "stdout", "stderr")}
    for f in fifos.values():
        os.mkfifo(f)

    async def main() -> None:
        listener = PassfdListener(Path(dev.uds_path), 1027)
        ports = await passfd_stdio(
            listener, str(fifos["stdin"]), str(fifos["stdout"]), str(fifos["stderr"]), terminal=False
        )
        # Each port is a connection the guest saw on 1027, in stdin/stdout/stderr order.
        assert [(ports.stdin, 1027), (ports.stdout, 1027), (ports.stderr, 1027)] == guest.requests
        # containerd's ends: its stdout reader, its stdin writer (the VMM holds the other ends).
        out_r = os.open(fifos["stdout"], os.O_RDONLY | os.O_NONBLOCK)
        in_w = os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK)
        try:
            # The shim kept nothing: only the VMM's copy (and containerd's) remain.
            assert _fd_count(fifos["stdout"]) == 2 and _fd_count(fifos["stderr"]) == 1
            # More than the fifo holds, before containerd reads: the VMM must only ever write into it.
            big = os.urandom(150_000)
            with guest.lock:
                for off in range(0, len(big), 4096):
                    guest.outbox.append((ports.stdout, VIRTIO_VSOCK_OP_RW, big[off : off + 4096]))
            await trio.sleep(0.3)  # the stream stays open while the fifo is full
            with guest.lock:
                guest.outbox.append((ports.stdout, VIRTIO_VSOCK_OP_SHUTDOWN, b""))
            got = b""
            with trio.fail_after(5):
                while True:
                    await trio.lowlevel.wait_readable(out_r)
                    try:
                        chunk = os.read(out_r, 4096)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        break  # EOF: the VMM closed its end when the guest shut the stream
                    got += chunk
            assert got == big
            os.write(in_w, b"typed")
            os.close(in_w)  # CloseIO: containerd closes its write end
            in_w = -1
            with trio.fail_after(5):
                while ports.stdin not in guest.shut:  # noqa: ASYNC110 (set by the muxer thread)
                    await trio.sleep(0.01)
            assert guest.data[ports.stdin] == b"typed"
        finally:
            os.close(out_r)
            if in_w >= 0:
                os.close(in_w)

    trio.run(main)


def test_a_vmm_that_closes_without_answering_is_a_clear_error(tmp_path: Path) -> None:
    """The muxer resets a passfd connection the guest refused: the shim says so."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "hv.sock"))
    server.listen(1)
    server.settimeout(10)

    def refuse() -> None:  # read `passfd\n`, then the port with its fd, and hang up without `OK`
        conn, _ = server.accept()
        with conn:
            got = b""
            while not got.endswith(b"1027"):
                msg, fds, _, _ = socket.recv_fds(conn, 64, 1)
                got += msg
                for fd in fds:
                    os.close(fd)

    thread = threading.Thread(target=refuse)
    thread.start()
    r, w = os.pipe()
    try:
        with pytest.raises(PassfdError, match="closed the connection without an answer"):
            trio.run(passfd_connect, PassfdListener(tmp_path / "hv.sock", 1027), w)
    finally:
        thread.join(10)
        server.close()
        os.close(r)
        os.close(w)


def test_terminal_has_no_stderr_and_refusal_is_an_error(
    tmp_path: Path, muxer: tuple[VirtioVsock, _Guest]
) -> None:
    dev, guest = muxer
    out = tmp_path / "out"
    os.mkfifo(out)

    async def main() -> None:
        listener = PassfdListener(Path(dev.uds_path), 1027)
        ports = await passfd_stdio(listener, "", str(out), str(tmp_path / "none"), terminal=True)
        assert ports.stdin == 0 and ports.stderr == 0 and ports.stdout == guest.requests[0][0]
        with pytest.raises(PassfdError):
            await passfd_connect(PassfdListener(tmp_path / "nothing.sock", 1027), 0)
        with pytest.raises(FileNotFoundError):
            await passfd_stdio(listener, "", str(tmp_path / "missing"), "", terminal=False)

    trio.run(main)
