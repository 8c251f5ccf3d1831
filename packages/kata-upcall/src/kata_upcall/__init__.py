"""dbs-upcall message codec and client state machine (VMM -> guest kernel hotplug channel).

The codec and the sans-I/O core need only the standard library; the trio driver (`open_upcall_client`,
`UpcallClient`) is imported on first use, so codec users never import trio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kata_upcall.__about__ import __version__
from kata_upcall._client import (
    Event,
    Handshake,
    ReplyReceived,
    ServiceConnected,
    UpcallClientCore,
    UpcallState,
)
from kata_upcall._codec import (
    APIC_IDS_LEN,
    CPU_PAYLOAD_SIZE,
    CPU_REPLY_PAYLOAD_SIZE,
    DEV_MGR_MAGIC_VERSION,
    DEV_MGR_MSG_SIZE,
    DEV_MGR_SERVICE_BYTE,
    HEADER_SIZE,
    MAX_ACCEPT_LINE,
    MMIO_PAYLOAD_SIZE,
    PCI_PAYLOAD_SIZE,
    UPCALL_PORT,
    AddCpu,
    AddMmio,
    AddPci,
    Connect,
    CpuReply,
    DelCpu,
    DelMmio,
    DelPci,
    MmioReply,
    MsgHeader,
    MsgType,
    PciReply,
    Reply,
    Request,
    decode_accept_line,
    decode_connect,
    decode_reply,
    decode_request,
    encode_hybrid_connect,
)
from kata_upcall._errors import (
    UpcallBusy,
    UpcallConnectionLost,
    UpcallError,
    UpcallNotConnected,
    UpcallProtocolError,
    UpcallRequestFailed,
    UpcallTimeout,
)

if TYPE_CHECKING:
    from kata_upcall._trio_client import (
        DEFAULT_HANDSHAKE_TIMEOUT,
        DEFAULT_REQUEST_TIMEOUT,
        StreamConnector,
        UpcallClient,
        UpcallStatistics,
        open_upcall_client,
        socket_connector,
    )

_TRIO_NAMES = frozenset(
    {
        "DEFAULT_HANDSHAKE_TIMEOUT",
        "DEFAULT_REQUEST_TIMEOUT",
        "StreamConnector",
        "UpcallClient",
        "UpcallStatistics",
        "open_upcall_client",
        "socket_connector",
    }
)


def __getattr__(name: str) -> Any:
    # The trio driver on first use: importing the codec must not import trio.
    if name in _TRIO_NAMES:
        from kata_upcall import _trio_client

        return getattr(_trio_client, name)
    raise AttributeError(f"module 'kata_upcall' has no attribute {name!r}")


__all__ = [
    "APIC_IDS_LEN",
    "CPU_PAYLOAD_SIZE",
    "CPU_REPLY_PAYLOAD_SIZE",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEV_MGR_MAGIC_VERSION",
    "DEV_MGR_MSG_SIZE",
    "DEV_MGR_SERVICE_BYTE",
    "HEADER_SIZE",
    "MAX_ACCEPT_LINE",
    "MMIO_PAYLOAD_SIZE",
    "PCI_PAYLOAD_SIZE",
    "UPCALL_PORT",
    "AddCpu",
    "AddMmio",
    "AddPci",
    "Connect",
    "CpuReply",
    "DelCpu",
    "DelMmio",
    "DelPci",
    "Event",
    "Handshake",
    "MmioReply",
    "MsgHeader",
    "MsgType",
    "PciReply",
    "Reply",
    "ReplyReceived",
    "Request",
    "ServiceConnected",
    "StreamConnector",
    "UpcallBusy",
    "UpcallClient",
    "UpcallClientCore",
    "UpcallConnectionLost",
    "UpcallError",
    "UpcallNotConnected",
    "UpcallProtocolError",
    "UpcallRequestFailed",
    "UpcallState",
    "UpcallStatistics",
    "UpcallTimeout",
    "__version__",
    "decode_accept_line",
    "decode_connect",
    "decode_reply",
    "decode_request",
    "encode_hybrid_connect",
    "open_upcall_client",
    "socket_connector",
]
