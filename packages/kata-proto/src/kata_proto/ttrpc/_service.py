"""Unary rpc tables built from protobuf ServiceDescriptors, shared by the server and the stubs."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor, message, message_factory


@dataclass(frozen=True, slots=True)
class RpcMethod:
    """One rpc of a service: its name, message classes and whether it streams."""

    service: str
    name: str
    request_type: type[message.Message]
    response_type: type[message.Message]
    streaming: bool


def service_methods(service: descriptor.ServiceDescriptor) -> dict[str, RpcMethod]:
    """The rpcs of `service` by bare method name."""
    return {
        m.name: RpcMethod(
            service=service.full_name,
            name=m.name,
            request_type=message_factory.GetMessageClass(m.input_type),
            response_type=message_factory.GetMessageClass(m.output_type),
            streaming=bool(m.client_streaming or m.server_streaming),
        )
        for m in service.methods
    }
