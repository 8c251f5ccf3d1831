"""What a server handler learns about the call it serves."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import trio

from kata_proto._gen.ttrpc import request_pb2

NAMESPACE_METADATA_KEY = "containerd-namespace-ttrpc"
"""Metadata key containerd uses to pass the namespace of a ttrpc call."""

Metadata = dict[str, list[str]]
"""Call metadata: lower-case key to its values, in the order they were sent (ttrpc MD)."""

MetadataArg = Mapping[str, str | Sequence[str]]
"""What callers may pass as metadata: a value or a sequence of values per key."""


def metadata_from_pairs(pairs: Iterable[request_pb2.KeyValue]) -> Metadata:
    """Group the KeyValue pairs of a Request; keys are folded to lower case as ttrpc's MD does."""
    md: Metadata = {}
    for kv in pairs:
        md.setdefault(kv.key.lower(), []).append(kv.value)
    return md


def metadata_to_pairs(metadata: MetadataArg | None) -> list[request_pb2.KeyValue]:
    """KeyValue pairs for a Request, one per value."""
    pairs: list[request_pb2.KeyValue] = []
    for key, values in (metadata or {}).items():
        for value in [values] if isinstance(values, str) else values:
            pairs.append(request_pb2.KeyValue(key=key.lower(), value=value))
    return pairs


@dataclass
class CallContext:
    """Passed to every handler with its request: who is called, the metadata and the deadline.

    The server enforces the deadline itself (the handler is cancelled and the caller gets
    DeadlineExceeded); handlers read it to pass a budget on to their own calls.
    """

    service: str
    method: str
    stream_id: int
    metadata: Metadata = field(default_factory=dict)
    deadline: float = math.inf
    """trio clock time (`trio.current_time()`) by which the call must finish; inf when none."""

    def metadata_value(self, key: str) -> str | None:
        """The first value sent for `key` (case-insensitive), or None."""
        values = self.metadata.get(key.lower())
        return values[0] if values else None

    @property
    def namespace(self) -> str | None:
        """The containerd namespace of the call, from `containerd-namespace-ttrpc`."""
        return self.metadata_value(NAMESPACE_METADATA_KEY)

    def time_remaining(self) -> float:
        """Seconds left before the deadline (inf when none, negative once passed)."""
        return self.deadline - trio.current_time()
