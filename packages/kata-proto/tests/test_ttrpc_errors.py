"""Status codes and the typed errors they map to."""

from __future__ import annotations

import pytest
import trio
from google.protobuf import any_pb2

from kata_proto import ttrpc
from kata_proto._gen.google.rpc import status_pb2

EXPECTED = {
    1: ttrpc.Canceled,
    2: ttrpc.Unknown,
    3: ttrpc.InvalidArgument,
    4: ttrpc.DeadlineExceeded,
    5: ttrpc.NotFound,
    6: ttrpc.AlreadyExists,
    7: ttrpc.PermissionDenied,
    8: ttrpc.ResourceExhausted,
    9: ttrpc.FailedPrecondition,
    10: ttrpc.Aborted,
    11: ttrpc.OutOfRange,
    12: ttrpc.Unimplemented,
    13: ttrpc.Internal,
    14: ttrpc.Unavailable,
    15: ttrpc.DataLoss,
    16: ttrpc.Unauthenticated,
}


@pytest.mark.parametrize(("code", "cls"), sorted(EXPECTED.items()))
def test_error_for_status_returns_the_class_named_for_the_code(
    code: int, cls: type[ttrpc.TtrpcError]
) -> None:
    detail = any_pb2.Any(type_url="x/y", value=b"z")
    err = ttrpc.error_for_status(status_pb2.Status(code=code, message="why", details=[detail]))
    assert type(err) is cls
    assert err.code == code == cls.code
    assert err.message == "why"
    assert list(err.details) == [detail]
    assert err.to_status() == status_pb2.Status(code=code, message="why", details=[detail])


def test_gRPC_code_numbers() -> None:
    assert [c.value for c in ttrpc.Code] == list(range(17))
    assert (int(ttrpc.Code.UNIMPLEMENTED), int(ttrpc.Code.RESOURCE_EXHAUSTED)) == (12, 8)


def test_unknown_code_becomes_unknown_and_ok_is_not_an_error() -> None:
    err = ttrpc.error_for_status(status_pb2.Status(code=99, message="odd"))
    assert type(err) is ttrpc.Unknown
    assert "99" in err.message
    with pytest.raises(ValueError):
        ttrpc.error_for_status(status_pb2.Status(code=0))


def test_connection_closed_is_unavailable_and_broken_resource() -> None:
    err = ttrpc.ConnectionClosed("gone")
    assert isinstance(err, ttrpc.Unavailable)
    assert isinstance(err, trio.BrokenResourceError)
    assert err.code == ttrpc.Code.UNAVAILABLE
    assert str(err) == "UNAVAILABLE: gone"
