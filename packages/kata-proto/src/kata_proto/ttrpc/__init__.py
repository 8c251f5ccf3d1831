"""ttrpc (containerd's lightweight RPC) over trio: framing, a server and a client for unary calls.

server = TtrpcServer()
server.register(events_pb2.DESCRIPTOR.services_by_name["Events"], MyEvents())
await server.serve_unix(path)                      # or serve_stream(any trio stream)

async with open_ttrpc_client(path) as client:
    stub = ServiceStub(client, events_pb2.DESCRIPTOR.services_by_name["Events"])
    await stub.Forward(request)
"""

from kata_proto.ttrpc._client import TtrpcClient, open_ttrpc_client
from kata_proto.ttrpc._context import NAMESPACE_METADATA_KEY, CallContext, Metadata, MetadataArg
from kata_proto.ttrpc._errors import (
    Aborted,
    AlreadyExists,
    Canceled,
    Code,
    ConnectionClosed,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    TtrpcError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    error_for_status,
)
from kata_proto.ttrpc._frame import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    HEADER_LENGTH,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
)
from kata_proto.ttrpc._server import ServerStatistics, TtrpcServer
from kata_proto.ttrpc._stub import ServiceStub, UnaryMethod

__all__ = [
    "FLAG_NO_DATA",
    "FLAG_REMOTE_CLOSED",
    "FLAG_REMOTE_OPEN",
    "HEADER_LENGTH",
    "MAX_PAYLOAD",
    "NAMESPACE_METADATA_KEY",
    "Aborted",
    "AlreadyExists",
    "CallContext",
    "Canceled",
    "Code",
    "ConnectionClosed",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Frame",
    "FrameDecoder",
    "Internal",
    "InvalidArgument",
    "MessageType",
    "Metadata",
    "MetadataArg",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ProtocolError",
    "ResourceExhausted",
    "ServerStatistics",
    "ServiceStub",
    "TtrpcClient",
    "TtrpcError",
    "TtrpcServer",
    "UnaryMethod",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "encode_frame",
    "error_for_status",
    "open_ttrpc_client",
]
