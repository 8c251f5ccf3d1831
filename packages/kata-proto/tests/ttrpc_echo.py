"""A small test service (`kata_proto.test.Echo`) built at run time, and its implementation.

Its descriptor lives in a private pool so it never clashes with generated code.
"""

from __future__ import annotations

from typing import Any

import trio
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from kata_proto import ttrpc
from kata_proto._gen.google.rpc import status_pb2

_F = descriptor_pb2.FieldDescriptorProto


def _build() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="kata_proto_test/echo.proto", package="kata_proto.test")
    fd.syntax = "proto3"
    req = fd.message_type.add(name="EchoRequest")
    req.field.add(name="text", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    req.field.add(name="sleep_ms", number=2, type=_F.TYPE_UINT32, label=_F.LABEL_OPTIONAL)
    req.field.add(name="fail_code", number=3, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
    req.field.add(name="blob", number=4, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    req.field.add(name="crash", number=5, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    resp = fd.message_type.add(name="EchoResponse")
    resp.field.add(name="text", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    resp.field.add(name="metadata", number=2, type=_F.TYPE_STRING, label=_F.LABEL_REPEATED)
    resp.field.add(name="timeout_s", number=3, type=_F.TYPE_DOUBLE, label=_F.LABEL_OPTIONAL)
    resp.field.add(name="blob", number=4, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    svc = fd.service.add(name="Echo")
    types = {"input_type": ".kata_proto.test.EchoRequest", "output_type": ".kata_proto.test.EchoResponse"}
    svc.method.add(name="Echo", **types)
    svc.method.add(name="Wrong", **types)
    svc.method.add(name="Missing", **types)
    svc.method.add(name="Watch", server_streaming=True, **types)
    return fd


POOL = descriptor_pool.DescriptorPool()
POOL.Add(_build())
FILE = POOL.FindFileByName("kata_proto_test/echo.proto")
SERVICE = FILE.services_by_name["Echo"]
SERVICE_NAME = SERVICE.full_name
EchoRequest: Any = message_factory.GetMessageClass(FILE.message_types_by_name["EchoRequest"])
EchoResponse: Any = message_factory.GetMessageClass(FILE.message_types_by_name["EchoResponse"])


class EchoService:
    """Echo: answers with the text after `sleep_ms`, fails with `fail_code`, raises `crash`.

    The response reports the metadata it saw (`key=value`) and the time left before the
    deadline. `started`/`cancelled` let tests watch handlers that never finish.
    """

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.finished = 0
        self.contexts: list[ttrpc.CallContext] = []

    async def Echo(self, request: Any, ctx: ttrpc.CallContext) -> message.Message:
        self.started += 1
        self.contexts.append(ctx)
        try:
            if request.sleep_ms:
                await trio.sleep(request.sleep_ms / 1000)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        if request.fail_code:
            status = status_pb2.Status(code=request.fail_code, message=f"failing with {request.fail_code}")
            raise ttrpc.error_for_status(status)
        if request.crash == "key":
            raise KeyError("no such thing")
        if request.crash == "enoent":
            raise FileNotFoundError(2, "No such file or directory", "/nowhere")
        self.finished += 1
        md = [f"{k}={v}" for k, vs in sorted(ctx.metadata.items()) for v in vs]
        left = ctx.time_remaining()
        return EchoResponse(
            text=request.text, metadata=md, timeout_s=left if left != float("inf") else 0.0, blob=request.blob
        )

    async def Wrong(self, request: Any, ctx: ttrpc.CallContext) -> message.Message:
        return EchoRequest(text="not a response")

    async def Watch(self, request: Any, ctx: ttrpc.CallContext) -> message.Message:
        raise AssertionError("streaming handler must never be called")
