"""A framed ttrpc channel over any trio byte stream (unix socket, vsock, hybrid vsock, memory)."""

from __future__ import annotations

import math
import socket

import trio

from kata_proto.ttrpc._frame import Frame, FrameDecoder, encode_frame

_RECEIVE_CHUNK = 64 * 1024
_WRITE_BATCH = 256 * 1024


class Channel:
    """Frames in and out of one stream.

    Outgoing frames are handed over synchronously (`send_nowait`): on a socket with nothing
    queued, one non-blocking send usually writes the whole frame at once; whatever does not
    go out is queued for one writer task (`run_writer`). Either way a caller cancelled after
    `send_nowait` can never leave half a frame on the wire, and frames go out in the order
    they were handed over, which keeps client stream ids increasing on the wire.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._out_send, self._out_receive = trio.open_memory_channel[bytes](math.inf)
        self._queued = 0  # frames handed to the writer and not yet written
        # A socket stream lets a frame go out at once with one non-blocking send when nothing
        # is queued before it, saving the hop to the writer task.
        self._raw: socket.socket | None = None
        if isinstance(stream, trio.SocketStream):
            self._raw = getattr(stream.socket, "_sock", None)

    async def receive_frame(self) -> Frame | None:
        """The next frame, or None at a clean end of stream.

        Raises ProtocolError for bad framing, and whatever the stream raises when it breaks.
        """
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            data = await self.stream.receive_some(_RECEIVE_CHUNK)
            if not data:
                self._decoder.close()
                return None
            self._decoder.feed(data)

    def send_nowait(self, stream_id: int, type: int, payload: bytes = b"", flags: int = 0) -> None:
        """Send one frame now if the socket takes it, else queue it for the writer task.

        ValueError if the payload is above the maximum; trio.BrokenResourceError once the
        writer has stopped.
        """
        data = encode_frame(stream_id, type, payload, flags)
        if self._queued == 0 and self._raw is not None:
            try:
                sent = self._raw.send(data)
            except OSError:
                # Would block, or the socket broke: the writer sends, or meets the error
                # and reports the stream broken.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self._queued += 1
        self._out_send.send_nowait(data)

    async def run_writer(self) -> None:
        """Write queued frames until `close_writer`; frames queued together go out in one write."""
        async with self._out_receive:
            async for data in self._out_receive:
                batch = [data]
                size = len(data)
                while size < _WRITE_BATCH:
                    try:
                        more = self._out_receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    batch.append(more)
                    size += len(more)
                await self.stream.send_all(batch[0] if len(batch) == 1 else b"".join(batch))
                self._queued -= len(batch)

    def close_writer(self) -> None:
        """Let the writer finish the queued frames and return."""
        self._out_send.close()

    async def aclose(self) -> None:
        """Close the underlying stream."""
        self._out_send.close()
        await self.stream.aclose()
