"""Hostile host-side fds through passfd (issue 11, findings 8 and 9), against the real vsock muxer.

Only fifo/socket/pipe fds may become a guest stream; anything else is answered with an error line on the
passfd connection that sent it, closed, and never puts the device into NEEDS_RESET. A passfd REQUEST the
guest never answers expires and the client hears so.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from kata_shim.virt_container import _passfd
from kata_shim.virt_container._passfd import PassfdError, PassfdListener, passfd_connect, passfd_stdio
from kata_virtio import VirtioVsock
from kata_virtio._vsock import VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VSOCK_HDR
from kata_virtio.testing import FakeGuestMemory, activate, event_thread, pump
from kata_vmm import VsockSpec


class _Guest:
    def __init__(self, dev: VirtioVsock, rx_buffers: int = 16) -> None:
        self.dev = dev
        self.mem = FakeGuestMemory(4 << 20)
        (self.rx, self.tx, _), self.irq = activate(dev, self.mem, [64, 64, 16])
        for _ in range(rx_buffers):
            self.rx.add_chain([(VSOCK_HDR.size, True), (4096, True)])
        dev.notify(0)

    def requests(self) -> list[tuple[int, ...]]:
        out = []
        for head, n in self.rx.get_used():
            hdr = VSOCK_HDR.unpack_from(self.rx.written(head, n))
            if hdr[6] == VIRTIO_VSOCK_OP_REQUEST:
                out.append(hdr)
        return out

    def accept(self, hdr: tuple[int, ...]) -> None:
        raw = VSOCK_HDR.pack(3, 2, hdr[3], hdr[2], 0, 1, VIRTIO_VSOCK_OP_RESPONSE, 0, 1 << 20, 0)
        self.tx.add_chain([(raw, False)])
        self.dev.notify(1)


@pytest.fixture
def vsock(tmp_path: Path) -> Iterator[VirtioVsock]:
    dev = VirtioVsock(tmp_path / "kata.hvsock")
    yield dev
    dev.close()


def _send_passfd(dev: VirtioVsock, fd: int, text: bytes = b"1027") -> socket.socket:
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.connect(dev.uds_path)
    control.settimeout(10)
    control.sendall(b"passfd\n")
    socket.send_fds(control, [text], [fd])
    return control


def _reply(control: socket.socket) -> bytes:
    data = b""
    while chunk := control.recv(128):
        data += chunk
    return data


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _odd_fd(kind: str, tmp_path: Path) -> int:
    target = tmp_path / "file"
    target.write_bytes(b"host secret")
    if kind == "o_path_file":
        return os.open(target, os.O_PATH | os.O_CLOEXEC)
    if kind == "o_path_fifo":
        os.mkfifo(tmp_path / "fifo")
        return os.open(tmp_path / "fifo", os.O_PATH | os.O_CLOEXEC)
    if kind == "regular_file":
        return os.open(target, os.O_RDWR | os.O_CLOEXEC)
    if kind == "directory":
        return os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if kind == "dev_null":
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["o_path_file", "o_path_fifo", "regular_file", "directory", "dev_null"])
def test_passfd_refuses_a_non_stream_fd_with_an_error_to_that_connection_alone(
    vsock: VirtioVsock, tmp_path: Path, kind: str
) -> None:
    """Finding 9: an O_PATH or regular-file fd is refused (ERR line), closed, and the device keeps serving."""
    guest = _Guest(vsock)
    r, w = os.pipe()
    try:
        good = _send_passfd(vsock, w)  # a live passfd stream on the same device
        pump(vsock)
        [hdr] = guest.requests()
        guest.accept(hdr)
        pump(vsock)
        assert good.recv(64) == f"OK {hdr[2]}\n".encode()
        before = _open_fds()
        odd = _odd_fd(kind, tmp_path)
        control = _send_passfd(vsock, odd)
        os.close(odd)
        pump(vsock)
        reply = _reply(control)
        assert reply.startswith(b"ERR ") and reply.endswith(b"\n") and b"\n" not in reply[:-1]
        assert not vsock.broken and guest.irq.needs_reset == []
        assert guest.requests() == []  # the guest never heard of it
        control.close()
        pump(vsock)
        assert _open_fds() <= before  # the VMM's copy of the odd fd is closed, nothing leaked
        assert vsock.connection_count == 1  # the good stream lives on
        good.close()
    finally:
        os.close(r)
        os.close(w)


def test_passfd_accepts_fifo_and_socket_fds(vsock: VirtioVsock, tmp_path: Path) -> None:
    guest = _Guest(vsock)
    os.mkfifo(tmp_path / "f")
    fifo = os.open(tmp_path / "f", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    a, b = socket.socketpair()
    try:
        for fd in (fifo, a.fileno()):
            assert stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode)
            control = _send_passfd(vsock, fd)
            pump(vsock)
            [hdr] = guest.requests()
            guest.accept(hdr)
            pump(vsock)
            assert control.recv(64) == f"OK {hdr[2]}\n".encode()
            control.close()
        assert vsock.connection_count == 2
    finally:
        os.close(fifo)
        a.close()
        b.close()


@pytest.mark.parametrize("rx_buffers", [0, 16], ids=["request_never_delivered", "request_never_answered"])
def test_passfd_request_the_guest_never_answers_expires(vsock: VirtioVsock, rx_buffers: int) -> None:
    """Finding 8: the REQUEST expires (delivered or not); the client gets an ERR line, its fd is closed."""
    _Guest(vsock, rx_buffers=rx_buffers)
    r, w = os.pipe()
    try:
        before = _open_fds()
        control = _send_passfd(vsock, w)
        pump(vsock)
        assert vsock.connection_count == 1
        vsock.tick()
        assert vsock.connection_count == 1  # not yet
        vsock.tick(vsock.connect_timeout * 2 + 1e6)
        assert vsock.connection_count == 0
        reply = _reply(control)
        assert reply.startswith(b"ERR ") and reply.endswith(b"\n")
        assert not vsock.broken
        control.close()
        assert _open_fds() <= before
    finally:
        os.close(r)
        os.close(w)


# -- the shim's side: passfd_stdio against the real muxer whose guest never answers ----------------------
def test_shim_passfd_stdio_fails_within_its_budget_when_the_guest_never_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 8 (shim): Create/Exec's passfd step ends with a clear error, not a hang, and keeps no fd."""
    monkeypatch.setattr(_passfd, "PASSFD_TIMEOUT", 0.5)
    dev = VirtioVsock(tmp_path / "kata.hvsock", connect_timeout=1e9)  # only the shim's budget can end it
    _Guest(dev, rx_buffers=16)  # a guest that takes REQUESTs and never answers
    out = tmp_path / "stdout"
    os.mkfifo(out)
    try:
        with event_thread(dev):

            async def main() -> None:
                listener = PassfdListener(Path(dev.uds_path), 1027)
                with trio.fail_after(60):  # a generous outer guard: the budget below is what ends it
                    with pytest.raises(PassfdError, match=r"stdout: .*no answer within 0\.5 s"):
                        await passfd_stdio(listener, "", str(out), "", terminal=True)

            trio.run(main)
            assert _fds_on(out) <= 1  # the shim closed both of its fds; only the VMM's copy may remain
    finally:
        dev.close()
    assert _fds_on(out) == 0


def _fds_on(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


def test_shim_passfd_connect_reports_the_vmm_refusal(vsock: VirtioVsock, tmp_path: Path) -> None:
    """Finding 9 (shim): a refused fd is an error that names the VMM's reason."""
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with (
            event_thread(vsock),
            pytest.raises(PassfdError, match="the VMM refused: not a pipe, fifo or socket"),
        ):
            trio.run(passfd_connect, PassfdListener(Path(vsock.uds_path), 1027), fd)
    finally:
        os.close(fd)


def test_connect_timeout_is_configurable_from_the_vmm_spec(tmp_path: Path) -> None:
    dev = VsockSpec(tmp_path / "v.sock", connect_timeout=3.0).build()
    try:
        assert isinstance(dev, VirtioVsock) and dev.connect_timeout == 3.0
    finally:
        dev.close()
