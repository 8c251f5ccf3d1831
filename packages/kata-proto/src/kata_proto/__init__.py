"""Protocol layer: Kata agent and containerd protobuf messages, and ttrpc over trio.

Submodules: `kata_proto.ttrpc` (framing, server, client, errors; its main names are
re-exported here), `kata_proto.agent` (Kata agent API messages) and `kata_proto.containerd`
(containerd task/events/types messages). Import those two as submodules.
"""

from kata_proto.__about__ import __version__
from kata_proto.ttrpc import (
    NAMESPACE_METADATA_KEY,
    CallContext,
    Code,
    ConnectionClosed,
    ProtocolError,
    ServiceStub,
    TtrpcClient,
    TtrpcError,
    TtrpcServer,
    error_for_status,
    open_ttrpc_client,
)

__all__ = [
    "NAMESPACE_METADATA_KEY",
    "CallContext",
    "Code",
    "ConnectionClosed",
    "ProtocolError",
    "ServiceStub",
    "TtrpcClient",
    "TtrpcError",
    "TtrpcServer",
    "__version__",
    "error_for_status",
    "open_ttrpc_client",
]
