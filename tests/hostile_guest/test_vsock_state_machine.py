"""A hypothesis state machine for the hybrid vsock muxer with interleaved host and guest events.

Host side: CONNECT clients, passfd with odd fd types (pipe, fifo, socket, regular file, O_PATH, /dev/null),
fds the VMM cannot poll (POLLNVAL), hang-ups, slow readers that never read, writes. Guest side: accepts,
refusals, data, shutdowns, RSTs, bogus packets, withheld receive buffers, device resets. Time: ticks far
into the future.

After every step: no exception escaped (nothing logged by the device's catch-all), the device is not in
NEEDS_RESET, and a canary connection set up first still carries bytes both ways unless the guest reset the
device. At the end every fd the machine opened is closed again (no leak).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
from pathlib import Path
from tempfile import TemporaryDirectory

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kata_virtio import VirtioVsock
from kata_virtio._vsock import (
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VSOCK_HDR,
)
from kata_virtio.testing import FakeGuestMemory, activate, pump

CANARY_PORT = 7


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


class VsockMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.baseline = _fds()
        self.tmp = TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        self.dev = VirtioVsock(self.dir / "v.sock")
        self.errors = _Errors()
        logging.getLogger("kata_virtio").addHandler(self.errors)
        self.now = 0.0
        self.clients: list[socket.socket] = []  # host-side sockets we own
        self.own_fds: list[int] = []  # pipe/fifo ends we own
        self.pending: list[tuple[int, int]] = []  # (host port, guest port) REQUESTs seen by the guest
        self.live: list[tuple[int, int]] = []  # streams the guest accepted
        self.resets = 0
        self.fifos = 0
        self._activate()
        self._canary()

    # -- guest driver ------------------------------------------------------------------------------
    def _activate(self) -> None:
        self.mem = FakeGuestMemory(32 << 20)
        (self.rx, self.tx, _), self.irq = activate(self.dev, self.mem, [32, 32, 8])
        self.posted = 0
        self._refill(16)

    def _refill(self, n: int) -> None:
        for _ in range(n):
            if self.posted >= 24:
                return
            self.rx.add_chain([(VSOCK_HDR.size, True), (1024, True)], indirect=True)
            self.posted += 1
        self.dev.notify(0)

    def _send(self, src: int, dst: int, op: int, payload: bytes = b"", flags: int = 0, **kw: int) -> None:
        fields = dict(src_cid=3, dst_cid=2, ptype=1, buf_alloc=1 << 16, fwd_cnt=0) | kw
        hdr = VSOCK_HDR.pack(
            fields["src_cid"], fields["dst_cid"], src, dst, len(payload), fields["ptype"], op, flags,
            fields["buf_alloc"], fields["fwd_cnt"],
        )  # fmt: skip
        self.tx.add_chain([(hdr + payload, False)])
        self.dev.notify(1)
        self.tx.get_used()

    def _drain(self, refill: bool = True) -> list[tuple[tuple[int, ...], bytes]]:
        out = []
        used = self.rx.get_used()
        self.posted -= len(used)
        for head, n in used:
            raw = self.rx.written(head, n)
            hdr = VSOCK_HDR.unpack_from(raw)
            out.append((hdr, raw[VSOCK_HDR.size : VSOCK_HDR.size + hdr[4]]))
            if hdr[6] == VIRTIO_VSOCK_OP_REQUEST:
                self.pending.append((hdr[2], hdr[3]))
            elif hdr[6] in (VIRTIO_VSOCK_OP_RST,):
                key = (hdr[2], hdr[3])
                self.live = [k for k in self.live if k != key]
                self.pending = [k for k in self.pending if k != key]
        if refill:
            self._refill(len(used))
        return out

    def _pump(self) -> None:
        pump(self.dev, timeout=0, rounds=50)

    def _canary(self) -> None:
        self.canary = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.canary.connect(self.dev.uds_path)
        self.canary.sendall(b"CONNECT %d\n" % CANARY_PORT)
        self.canary.settimeout(5)
        self._pump()
        self._drain()
        [(host_port, _)] = [p for p in self.pending if p[1] == CANARY_PORT]
        self.pending.remove((host_port, CANARY_PORT))
        self._send(CANARY_PORT, host_port, VIRTIO_VSOCK_OP_RESPONSE)
        self.canary_port = host_port
        assert self.canary.recv(64) == b"OK %d\n" % host_port
        self.canary_alive = True

    # -- host rules --------------------------------------------------------------------------------
    @rule(port=st.sampled_from([1024, 1025, 2000]), line=st.sampled_from([b"CONNECT", b"connect", b"bogus"]))
    def host_connect(self, port: int, line: bytes) -> None:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        c.connect(self.dev.uds_path)
        c.send(line + b" %d\n" % port)
        self.clients.append(c)
        self._pump()

    @rule(kind=st.sampled_from(["pipe_r", "pipe_w", "fifo", "socket", "file", "o_path", "devnull"]))
    def host_passfd(self, kind: str) -> None:
        if kind in ("pipe_r", "pipe_w"):
            r, w = os.pipe()
            self.own_fds += [r, w]
            fd = r if kind == "pipe_r" else w
        elif kind == "fifo":
            self.fifos += 1
            path = self.dir / f"fifo{self.fifos}"
            os.mkfifo(path)
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            self.own_fds.append(fd)
        elif kind == "socket":
            a, b = socket.socketpair()
            self.clients += [a, b]
            fd = a.fileno()
        elif kind == "file":
            fd = os.open(self.dir / "f", os.O_RDWR | os.O_CREAT, 0o600)
            self.own_fds.append(fd)
        elif kind == "o_path":
            fd = os.open(self.dir, os.O_PATH)
            self.own_fds.append(fd)
        else:
            fd = os.open("/dev/null", os.O_RDWR)
            self.own_fds.append(fd)
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control.connect(self.dev.uds_path)
        control.sendall(b"passfd\n")
        socket.send_fds(control, [b"1027 keep" if kind != "pipe_r" else b"1027"], [fd])
        control.setblocking(False)
        self.clients.append(control)
        self._pump()

    @precondition(lambda self: self.clients)
    @rule(i=st.integers(0, 1000), data=st.binary(min_size=1, max_size=3000))
    def host_write(self, i: int, data: bytes) -> None:
        c = self.clients[i % len(self.clients)]
        with contextlib.suppress(OSError):
            c.send(data)
        self._pump()

    @precondition(lambda self: self.clients)
    @rule(i=st.integers(0, 1000))
    def host_hang_up(self, i: int) -> None:
        self.clients.pop(i % len(self.clients)).close()
        self._pump()

    @precondition(lambda self: self.own_fds)
    @rule(i=st.integers(0, 1000))
    def host_closes_a_pipe_end(self, i: int) -> None:
        os.close(self.own_fds.pop(i % len(self.own_fds)))
        self._pump()

    @rule(i=st.integers(0, 1000))
    def host_fd_turns_unpollable(self, i: int) -> None:
        """The VMM's poller could not poll one connection's fd (as for a file or closed fd): POLLNVAL."""
        fds = [fd for fd in self.dev.watched() if fd != self.canary.fileno()]
        canary_side = [c.sock.fileno() for c in self.dev._conns.values() if c.local_port == self.canary_port]
        own = [self.dev._listener.fileno(), self.dev._wake_r]  # the device's own fds are always pollable
        fds = [fd for fd in fds if fd not in canary_side + own]
        if fds:
            self.dev.handle_event(fds[i % len(fds)], select.POLLNVAL)
        self._pump()

    @rule(seconds=st.sampled_from([0.5, 3.0, 30.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.dev.tick(10_000.0 + self.now * 1000)  # far past every deadline when seconds is large
        self._pump()

    # -- guest rules -------------------------------------------------------------------------------
    @rule(accept=st.booleans())
    def guest_answers(self, accept: bool) -> None:
        self._drain()
        if not self.pending:
            return
        host_port, guest_port = self.pending.pop(0)
        op = VIRTIO_VSOCK_OP_RESPONSE if accept else VIRTIO_VSOCK_OP_RST
        self._send(guest_port, host_port, op)
        if accept:
            self.live.append((host_port, guest_port))
        self._pump()

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 1000), data=st.binary(min_size=1, max_size=2000))
    def guest_writes(self, i: int, data: bytes) -> None:
        host_port, guest_port = self.live[i % len(self.live)]
        self._send(guest_port, host_port, VIRTIO_VSOCK_OP_RW, data)
        self._pump()

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 1000), flags=st.integers(0, 3), rst=st.booleans())
    def guest_closes(self, i: int, flags: int, rst: bool) -> None:
        host_port, guest_port = self.live[i % len(self.live)]
        if rst:
            self._send(guest_port, host_port, VIRTIO_VSOCK_OP_RST)
            self.live.remove((host_port, guest_port))
        else:
            self._send(guest_port, host_port, VIRTIO_VSOCK_OP_SHUTDOWN, flags=flags)
        self._pump()

    @rule(
        src=st.integers(0, 2**32 - 1), dst=st.integers(0, 2**32 - 1), op=st.integers(0, 9),
        ptype=st.sampled_from([1, 2, 3]), src_cid=st.sampled_from([3, 2, 99]),
    )  # fmt: skip
    def guest_sends_a_bogus_packet(self, src: int, dst: int, op: int, ptype: int, src_cid: int) -> None:
        if dst == self.canary_port and src == CANARY_PORT:
            return  # hurting the canary on purpose is allowed to hurt it
        if op == VIRTIO_VSOCK_OP_REQUEST and src_cid == 3 and ptype == 1:
            return  # a guest-initiated connect to <uds>_<port>: nothing listens, fine but not bogus
        self._send(src, dst, op, ptype=ptype, src_cid=src_cid)
        self._pump()

    @rule()
    def guest_withholds_rx_buffers(self) -> None:
        self._drain(refill=False)

    @rule()
    def guest_gives_rx_buffers(self) -> None:
        self._refill(32)
        self._pump()

    @rule()
    def guest_resets_the_device(self) -> None:
        self.dev.reset()
        self.resets += 1
        self.pending, self.live = [], []
        self.canary_alive = False
        self._activate()

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def device_healthy(self) -> None:
        assert self.errors.records == []
        assert not self.dev.broken and self.irq.needs_reset == []

    @invariant()
    def canary_unaffected(self) -> None:
        if not self.canary_alive:
            return
        assert (self.canary_port, CANARY_PORT) in self.dev._conns
        self.canary.sendall(b"ping")
        self._pump()
        self._refill(32)
        self._pump()
        got = b"".join(d for h, d in self._drain() if h[2] == self.canary_port and h[6] == VIRTIO_VSOCK_OP_RW)
        assert got == b"ping"
        self._send(CANARY_PORT, self.canary_port, VIRTIO_VSOCK_OP_RW, b"pong")
        self._pump()
        assert self.canary.recv(64) == b"pong"

    def teardown(self) -> None:
        for c in self.clients:
            c.close()
        self.canary.close()
        for fd in self.own_fds:
            os.close(fd)
        self.dev.close()
        logging.getLogger("kata_virtio").removeHandler(self.errors)
        self.tmp.cleanup()
        leaked = _fds() - self.baseline
        assert not leaked, {
            fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")
        }


VsockMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)
TestVsockMuxerStateMachine = VsockMachine.TestCase
