"""The hybrid-vsock muxer (Firecracker's ``vsock/unix/muxer.rs``): guest streams <-> AF_UNIX sockets.

The device (`kata_virtio.vsock.device`) owns the virtqueues and hands the muxer whole packets: the guest's
with `send_pkt`, and it asks `recv_pkt` for the next packet for the guest while `has_pending_rx`. The muxer
owns every host fd (listener, clients, passed fds, the wake pipe) and is itself an `EventSource`: the
event loop polls `watched()` and calls `handle_event`; `tick` expires what the guest left unanswered.
It never touches guest memory, so it is tested alone with packets built by hand.

The host side of every guest stream is an AF_UNIX socket (PROTOCOLS.md):
- host-initiated: a client connects to ``uds_path``, writes ``CONNECT <port>\\n`` and, once the guest
  accepted, reads ``OK <host_port>\\n``; then the socket carries the stream;
- guest-initiated: a guest connection to host port P is bridged to the socket ``<uds_path>_<P>``;
- passfd (Dragonball): a client writes ``passfd\n`` then ``<port>[ keep]`` with one fd (SCM_RIGHTS);
  that fd (pipe, FIFO or socket) becomes the host side of a stream to guest ``<port>`` and the client
  socket gets ``OK <host_port>\n``; with ``keep``, a closed reader of the fd drops bytes instead of
  ending the stream. Any other fd (O_PATH, regular file, directory, device) is refused: that client
  alone gets ``ERR <reason>\n`` and its socket and fd are closed. A client (CONNECT or passfd) whose
  REQUEST the guest does not answer within ``connect_timeout`` is closed (passfd: after ``ERR``);
- in-process: `VirtioVsock.connect_local` returns one end of a socketpair that behaves like a
  client that already sent ``CONNECT`` (it reads ``OK <host_port>\\n`` first).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable

from kata_virtio.vsock.connection import Connection, ConnState, FdStream, passfd_refusal
from kata_virtio.vsock.packet import (
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VSOCK_HOST_CID,
    VsockHeader,
    host_packet,
)

_log = logging.getLogger("kata_virtio.vsock")

#: Receive buffer we advertise per connection (buf_alloc): guest data we hold before the socket takes it.
CONN_BUF_ALLOC = 256 * 1024
#: Send a CREDIT_UPDATE once we forwarded this much since the guest last heard our fwd_cnt.
CREDIT_UPDATE_THRESHOLD = CONN_BUF_ALLOC // 4
MAX_CONNECTIONS = 1024
MAX_PENDING_CONTROL = 4096
_HANDSHAKE_MAX = 64
#: §5.10.6.6: how long we wait for the guest's RST after our SHUTDOWN before forcing one.
CLOSE_TIMEOUT = 2.0
#: How long a host-initiated REQUEST the guest has received may stay unanswered.
REQUEST_TIMEOUT = 2.0
#: How long a host-initiated connection may stay CONNECTING at all, delivered to the guest or not (a guest
#: that posts no receive buffers never gets the REQUEST); the default of ``connect_timeout``.
CONNECT_TIMEOUT = 10.0
_LOCAL_PORT_BASE = 1 << 30


class VsockMuxer:
    """The host end of every stream of guest ``guest_cid``, listening on ``uds_path``."""

    def __init__(
        self,
        uds_path: str | os.PathLike[str],
        guest_cid: int,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.uds_path = os.fspath(uds_path)
        self.guest_cid = guest_cid
        #: Seconds a host-initiated connection may wait for the guest's RESPONSE (delivered or not).
        self.connect_timeout = connect_timeout
        #: The clock of those expiries (and CLOSE_TIMEOUT's, REQUEST_TIMEOUT's): the VMM sets the guest's
        #: (kata-sys-util's `GuestClock.now`, which stands still while the vCPU waits for a host CPU), so a
        #: guest that shares its CPU with nine others is not refused for answering ten times later.
        self.clock: Callable[[], float] = time.monotonic
        #: False while the guest posts no receive buffers: sockets are then not polled for input.
        self.rx_space = True
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds_path)
            self._listener.bind(self.uds_path)
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._incoming: collections.deque[tuple[socket.socket, int]] = collections.deque()
        self._conns: dict[tuple[int, int], Connection] = {}
        self._by_fd: dict[int, Connection] = {}
        self._handshakes: dict[int, Connection] = {}  # fd -> conn awaiting CONNECT
        self._control: collections.deque[tuple[int, int, int, int]] = collections.deque()
        self._next_local_port = _LOCAL_PORT_BASE

    def reset(self) -> None:
        """Drop every guest stream and pending control packet (a device reset); handshakes carry on."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._control.clear()
        self.rx_space = True

    def close(self) -> None:
        """Close the listener, every connection and the wake pipe; unlink the socket path."""
        self.reset()
        for conn in list(self._handshakes.values()):
            self._close_streams(conn)
        self._handshakes.clear()
        while self._incoming:
            self._incoming.popleft()[0].close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.uds_path)

    @property
    def connection_count(self) -> int:
        """Live guest connections (handshakes not included)."""
        return len(self._conns)

    # -- in-process connector ------------------------------------------------------------------------

    def connect_local(self, port: int) -> socket.socket:
        """Open a stream to guest ``port`` from inside the VMM process (any thread).

        Returns a blocking socket that reads ``OK <host_port>\\n`` once the guest accepted, then
        carries the stream; it reaches EOF without ``OK`` if the guest refused.
        """
        if not 0 <= port <= 0xFFFFFFFF:
            raise ValueError(f"vsock port {port} out of range")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        self._incoming.append((ours, port))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\1")
        return theirs

    # -- event loop interface ----------------------------------------------------------------------

    def watched(self) -> dict[int, int]:
        """fd -> poll events the event loop must watch."""
        fds = {self._listener.fileno(): select.POLLIN, self._wake_r: select.POLLIN}
        for fd in self._handshakes:
            fds[fd] = select.POLLIN
        for conn in self._conns.values():
            events = 0
            if (
                conn.state == ConnState.ESTABLISHED
                and not conn.readable
                and not conn.host_eof
                and not conn.guest_shut_rcv
                and not conn.write_only
                and conn.peer_credit() > 0
                and self.rx_space
            ):
                events |= select.POLLIN
            if conn.pending:
                events |= select.POLLOUT
            if events or (conn.state == ConnState.CONNECTING and not conn.passed_fd):
                # A CONNECTING client is watched for hang-up only (poll reports POLLHUP unasked). Not a
                # passed fd: a stdin fifo whose writer already wrote and left polls POLLHUP, yet its bytes
                # and EOF are for the guest once it answers.
                fds[conn.sock.fileno()] = events
        return fds

    def handle_event(self, fd: int, events: int) -> None:
        """Serve ``events`` on ``fd`` (one of `watched`); the device catches what escapes."""
        if events & select.POLLNVAL:
            self._drop_unpollable(fd)
            return
        if fd == self._listener.fileno():
            self._accept()
            return
        if fd == self._wake_r:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            while self._incoming:
                sock, port = self._incoming.popleft()
                self._start_host_connection(Connection(sock, ConnState.HANDSHAKE), port)
            return
        if fd in self._handshakes:
            waiting = self._handshakes[fd]
            if waiting.state == ConnState.PASSFD:
                self._read_passfd(waiting)
            else:
                self._read_handshake(waiting)
            return
        conn = self._by_fd.get(fd)
        if conn is None:
            return
        if conn.state == ConnState.CONNECTING:
            if events & (select.POLLHUP | select.POLLERR) and not conn.passed_fd:
                self._reset(conn)  # the client gave up before the guest answered
            return
        if conn.pending and events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            self._flush(conn)
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and conn.state == ConnState.ESTABLISHED:
            conn.readable = True

    def tick(self, now: float | None = None) -> None:
        """Expire connections whose guest never answered our SHUTDOWN or REQUEST; call about once a second."""
        now = self.clock() if now is None else now
        for conn in list(self._conns.values()):
            if conn.state == ConnState.CLOSING and now - conn.closing_since > CLOSE_TIMEOUT:
                self._reset(conn)
            elif conn.state == ConnState.CONNECTING and (
                (conn.request_sent and now - conn.request_sent > REQUEST_TIMEOUT)
                or now - conn.connecting_since > self.connect_timeout
            ):
                # The guest never answered: a CONNECT client sees its socket close, passfd gets ERR.
                self._refuse(conn.control, "guest did not answer")
                self._reset(conn)

    def _drop_unpollable(self, fd: int) -> None:
        """The event loop cannot poll ``fd``: drop its connection (RST to the guest), nothing else."""
        if (waiting := self._handshakes.pop(fd, None)) is not None:
            self._close_streams(waiting)
        elif (conn := self._by_fd.get(fd)) is not None:
            _log.warning(
                "vsock: host fd %d of port %d cannot be polled: connection dropped", fd, conn.peer_port
            )
            self._refuse(conn.control, "host fd cannot be polled")
            self._reset(conn)
        elif fd in (self._listener.fileno(), self._wake_r):
            _log.error("vsock: the event loop cannot poll the device's own fd %d", fd)

    # -- host side ---------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            if len(self._handshakes) + len(self._conns) >= MAX_CONNECTIONS:
                sock.close()
                continue
            self._handshakes[sock.fileno()] = Connection(sock, ConnState.HANDSHAKE)

    def _read_handshake(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        assert isinstance(conn.sock, socket.socket)
        # One byte at a time, as Dragonball does: never consume stream bytes after the line, and a
        # partial line followed by EOF is seen as EOF (a peek would see the same bytes forever).
        while not conn.line.endswith(b"\n"):
            try:
                byte = conn.sock.recv(1)
            except BlockingIOError:
                return
            except OSError:
                byte = b""
            if not byte or len(conn.line) >= _HANDSHAKE_MAX:
                del self._handshakes[fd]
                conn.sock.close()
                return
            conn.line += byte
        line = bytes(conn.line)
        parts = line.split()
        if parts and parts[0].lower() == b"passfd" and len(parts) == 1:
            conn.state = ConnState.PASSFD  # Dragonball's passfd: the port and an fd follow in one message
            return
        del self._handshakes[fd]
        # PROTOCOLS.md: `CONNECT <port>\n`, lowercase accepted.
        if len(parts) == 2 and parts[0].lower() == b"connect" and parts[1].isdigit():
            port = int(parts[1])
            if port <= 0xFFFFFFFF:
                self._start_host_connection(conn, port)
                return
        _log.info("vsock: bad handshake %r", line[:32])
        conn.sock.close()

    def _read_passfd(self, control: Connection) -> None:
        """`<port>[ keep]` plus one fd by SCM_RIGHTS: bridge that fd to guest ``port`` (Dragonball passfd)."""
        sock = control.sock
        assert isinstance(sock, socket.socket)
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 32, 4)
        except BlockingIOError:
            return
        except OSError:
            msg, fds = b"", []
        del self._handshakes[sock.fileno()]
        parts = msg.split()
        ok = len(fds) == 1 and bool(parts) and parts[0].isdigit() and int(parts[0]) <= 0xFFFFFFFF
        if not ok:
            for extra in fds:
                os.close(extra)
            sock.close()
            return
        reason = passfd_refusal(fds[0])
        stream = None
        if reason is None:
            try:
                stream = FdStream(fds[0])
            except OSError as err:
                reason = f"unusable fd ({errno.errorcode.get(err.errno or 0, '?')})"
        if stream is None:
            # Only this client hears of it; the device and its other streams carry on.
            _log.info("vsock: passfd refused: %s", reason)
            os.close(fds[0])
            self._refuse(sock, reason or "refused")
            sock.close()
            return
        conn = Connection(stream, ConnState.HANDSHAKE, control=sock, keep=parts[1:2] == [b"keep"])
        self._start_host_connection(conn, int(parts[0]))

    @staticmethod
    def _refuse(control: socket.socket | None, reason: str) -> None:
        """Best effort ``ERR <reason>\\n`` to a passfd client (never blocks: the socket is non-blocking)."""
        if control is not None:
            with contextlib.suppress(OSError):
                control.send(f"ERR {reason}\n".encode())

    def _start_host_connection(self, conn: Connection, port: int) -> None:
        if len(self._conns) >= MAX_CONNECTIONS:
            self._refuse(conn.control, "too many connections")
            self._close_streams(conn)
            return
        local = self._alloc_local_port(port)
        conn.local_port, conn.peer_port, conn.state = local, port, ConnState.CONNECTING
        conn.connecting_since = self.clock()
        self._add(conn)
        self._queue_control(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_REQUEST)

    def _alloc_local_port(self, peer_port: int) -> int:
        while True:
            port = self._next_local_port
            self._next_local_port += 1
            if self._next_local_port > 0xFFFFFFFE:
                self._next_local_port = _LOCAL_PORT_BASE
            if (port, peer_port) not in self._conns:
                return port

    def _flush(self, conn: Connection) -> None:
        """Write pending guest data to the socket; count it forwarded."""
        while conn.pending:
            try:
                n = conn.sock.send(conn.pending[:MAX_PKT_PAYLOAD])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                if not conn.keep:
                    self._reset(conn)
                    return
                # passfd "keep": the fd's reader went away; drop the bytes, the guest stream lives on.
                n = len(conn.pending)
            del conn.pending[:n]
            conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFFFFFF
        if not conn.pending and conn.guest_shut_send:
            if conn.guest_shut_rcv:
                self._reset(conn)  # the full shutdown that waited for this flush
                return
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        if (conn.fwd_cnt - conn.last_fwd_sent) & 0xFFFFFFFF >= CREDIT_UPDATE_THRESHOLD:
            self._queue_control(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_CREDIT_UPDATE)

    def _add(self, conn: Connection) -> None:
        self._conns[conn.key] = conn
        self._by_fd[conn.sock.fileno()] = conn

    def _drop(self, conn: Connection) -> None:
        self._conns.pop(conn.key, None)
        self._by_fd.pop(conn.sock.fileno(), None)
        self._close_streams(conn)

    @staticmethod
    def _close_streams(conn: Connection) -> None:
        conn.sock.close()
        if conn.control is not None:
            conn.control.close()
            conn.control = None

    def _reset(self, conn: Connection) -> None:
        """Abort a connection: RST to the guest, close the socket."""
        self._queue_control(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_RST)
        self._drop(conn)

    # -- guest -> host (send_pkt) -------------------------------------------------------------------

    def _queue_control(self, local: int, peer: int, op: int, flags: int = 0) -> None:
        if len(self._control) >= MAX_PENDING_CONTROL:
            _log.warning("vsock: control queue full, dropping op %d for %d->%d", op, local, peer)
            return
        self._control.append((local, peer, op, flags))

    def send_pkt(self, hdr: VsockHeader, payload: bytes) -> None:
        """Take one packet from the guest (its length already checked by `read_packet`)."""
        src_cid, dst_cid, src_port, dst_port = hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port
        ptype, op, flags, buf_alloc, fwd_cnt = hdr.type, hdr.op, hdr.flags, hdr.buf_alloc, hdr.fwd_cnt
        if src_cid != self.guest_cid or dst_cid != VSOCK_HOST_CID:
            _log.debug("vsock: dropping packet %d->%d", src_cid, dst_cid)
            return
        key = (dst_port, src_port)
        conn = self._conns.get(key)
        if ptype != VIRTIO_VSOCK_TYPE_STREAM:
            if op != VIRTIO_VSOCK_OP_RST:
                self._queue_control(dst_port, src_port, VIRTIO_VSOCK_OP_RST)
            return
        if conn is None:
            if op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != VIRTIO_VSOCK_OP_RST:
                self._queue_control(dst_port, src_port, VIRTIO_VSOCK_OP_RST)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == VIRTIO_VSOCK_OP_RST:
            self._drop(conn)
        elif conn.state == ConnState.CONNECTING:
            if op == VIRTIO_VSOCK_OP_RESPONSE:
                conn.state = ConnState.ESTABLISHED
                try:
                    # passfd answers on its control socket, which is then done; others on the stream.
                    (conn.control or conn.sock).send(f"OK {conn.local_port}\n".encode())
                except OSError:
                    self._reset(conn)
                if conn.control is not None:
                    conn.control.close()
                    conn.control = None
            else:
                self._reset(conn)
        elif op == VIRTIO_VSOCK_OP_RW:
            if conn.state != ConnState.ESTABLISHED:
                return
            # §5.10.6.3: the guest may only send what our buf_alloc leaves room for.
            if len(conn.pending) + len(payload) > CONN_BUF_ALLOC:
                _log.warning("vsock: guest port %d overran its credit", conn.peer_port)
                self._reset(conn)
                return
            conn.rx_cnt = (conn.rx_cnt + len(payload)) & 0xFFFFFFFF
            conn.pending += payload
            self._flush(conn)
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            self._queue_control(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        elif op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            conn.credit_requested = False
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN:
            conn.guest_shut_rcv |= bool(flags & VIRTIO_VSOCK_SHUTDOWN_RCV)
            conn.guest_shut_send |= bool(flags & VIRTIO_VSOCK_SHUTDOWN_SEND)
            if conn.guest_shut_rcv and conn.guest_shut_send:
                # §5.10.6.6: a full shutdown is answered with RST, once the data the guest sent before
                # it reached the host side (a passfd stdout fifo must get every byte, then EOF).
                if not conn.pending:
                    self._reset(conn)
            elif conn.guest_shut_send and not conn.pending:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)
        elif op == VIRTIO_VSOCK_OP_REQUEST:
            self._reset(conn)  # a second REQUEST on a live connection

    def _guest_connect(self, local: int, peer: int, buf_alloc: int, fwd_cnt: int) -> None:
        """A guest connection to host port ``local``: bridge it to ``<uds_path>_<local>``."""
        if len(self._conns) >= MAX_CONNECTIONS:
            self._queue_control(local, peer, VIRTIO_VSOCK_OP_RST)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{local}")
        except OSError as err:
            sock.close()
            _log.info(
                "vsock: guest connect to port %d refused: %s", local, errno.errorcode.get(err.errno or 0, "?")
            )
            self._queue_control(local, peer, VIRTIO_VSOCK_OP_RST)
            return
        conn = Connection(
            sock, ConnState.ESTABLISHED, local, peer, peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt
        )
        self._add(conn)
        self._queue_control(local, peer, VIRTIO_VSOCK_OP_RESPONSE)

    # -- host -> guest (recv_pkt) ------------------------------------------------------------------

    def _packet(self, local: int, peer: int, op: int, flags: int = 0, payload: bytes = b"") -> bytes:
        """A packet for the guest carrying our credit (buf_alloc, and fwd_cnt: the guest now knows it)."""
        conn = self._conns.get((local, peer))
        fwd = 0
        if conn is not None:
            fwd = conn.fwd_cnt
            conn.last_fwd_sent = fwd
        return host_packet(
            self.guest_cid,
            local,
            peer,
            op,
            flags=flags,
            buf_alloc=CONN_BUF_ALLOC,
            fwd_cnt=fwd,
            payload=payload,
        )

    def has_pending_rx(self) -> bool:
        """Whether `recv_pkt` has something for the guest (control packets or a readable stream)."""
        return bool(self._control) or any(c.readable for c in self._conns.values())

    def recv_pkt(self, room: int) -> bytes | None:
        """The next packet for the guest (header and at most ``room`` payload bytes), or None.

        Control packets go first, then data from readable streams within the guest's credit.
        """
        if self._control:
            local, peer, op, flags = self._control.popleft()
            if op == VIRTIO_VSOCK_OP_REQUEST and (conn := self._conns.get((local, peer))) is not None:
                conn.request_sent = self.clock()
            return self._packet(local, peer, op, flags)
        for conn in list(self._conns.values()):
            if not conn.readable:
                continue
            credit = conn.peer_credit()
            if credit == 0 or conn.state != ConnState.ESTABLISHED or conn.guest_shut_rcv:
                conn.readable = False
                if credit == 0 and not conn.credit_requested and conn.state == ConnState.ESTABLISHED:
                    conn.credit_requested = True
                    return self._packet(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_CREDIT_REQUEST)
                continue
            try:
                data = conn.sock.recv(min(room, credit, MAX_PKT_PAYLOAD))
            except (BlockingIOError, InterruptedError):
                conn.readable = False
                continue
            except OSError as err:
                if err.errno == errno.EBADF and isinstance(conn.sock, FdStream):
                    conn.readable, conn.write_only = False, True
                    continue
                data = b""
            if not data:
                # EOF from the host side: tell the guest we neither send nor receive any more.
                conn.readable = False
                conn.host_eof = True
                conn.state = ConnState.CLOSING
                conn.closing_since = self.clock()
                flags = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND
                return self._packet(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_SHUTDOWN, flags)
            conn.tx_cnt = (conn.tx_cnt + len(data)) & 0xFFFFFFFF
            return self._packet(conn.local_port, conn.peer_port, VIRTIO_VSOCK_OP_RW, payload=data)
        return None
