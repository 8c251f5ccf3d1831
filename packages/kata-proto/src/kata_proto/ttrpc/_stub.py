"""Client stubs made at run time from a protobuf ServiceDescriptor: `await stub.Forward(req)`."""

from __future__ import annotations

from google.protobuf import descriptor, message

from kata_proto.ttrpc._client import TtrpcClient
from kata_proto.ttrpc._context import MetadataArg
from kata_proto.ttrpc._errors import Unimplemented
from kata_proto.ttrpc._service import RpcMethod, service_methods


class UnaryMethod:
    """One rpc bound to a client: `await method(request, timeout=..., metadata=...)`."""

    def __init__(
        self, client: TtrpcClient, rpc: RpcMethod, timeout: float | None, metadata: MetadataArg | None
    ) -> None:
        self.rpc = rpc
        self._client = client
        self._timeout = timeout
        self._metadata = metadata

    async def __call__(
        self,
        request: message.Message,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (sent to the server as timeout_nano)
        metadata: MetadataArg | None = None,
    ) -> message.Message:
        """Call the rpc; `timeout` and `metadata` default to the stub's."""
        rpc = self.rpc
        if rpc.streaming:
            raise Unimplemented(f"{rpc.service}/{rpc.name}: streaming rpcs are not supported by this client")
        if not isinstance(request, rpc.request_type):
            raise TypeError(f"{rpc.name} takes {rpc.request_type.__name__}, not {type(request).__name__}")
        return await self._client.call(
            rpc.service,
            rpc.name,
            request,
            rpc.response_type,
            timeout=self._timeout if timeout is None else timeout,
            metadata=self._metadata if metadata is None else metadata,
        )


class ServiceStub:
    """Attribute access by rpc name gives a `UnaryMethod` of the service.

    `timeout` and `metadata` are the defaults for every call made through the stub (for
    instance the containerd namespace, or the agent client's 30 s).
    """

    def __init__(
        self,
        client: TtrpcClient,
        service: descriptor.ServiceDescriptor,
        *,
        timeout: float | None = None,
        metadata: MetadataArg | None = None,
    ) -> None:
        self.service_name = service.full_name
        rpcs = service_methods(service)
        self._methods = {name: UnaryMethod(client, rpc, timeout, metadata) for name, rpc in rpcs.items()}

    def __getattr__(self, name: str) -> UnaryMethod:
        try:
            return self.__dict__["_methods"][name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(f"service {self.__dict__.get('service_name')} has no rpc {name!r}") from None

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *self._methods]
