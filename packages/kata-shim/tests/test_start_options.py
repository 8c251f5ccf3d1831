"""`start` reads the runtime options containerd writes on its stdin (both of containerd's formats) and
hands their config_path to the new shim, whose Creates use it when their own options name none."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from hypothesis import given

from kata_proto.containerd import runtimeoptions_pb2
from kata_shim.message import RuntimeHandlerManager
from kata_shim.persist import StateStore
from kata_shim.runtime import ContainerConfig, Stdio
from kata_shim.shim._start import stdin_config_path
from kata_shim.shim._wire import start_config_path

PATH = "/opt/kata/share/defaults/kata-containers/configuration-dragonball.toml"


def _options_any(path: str = PATH, type_url: str = "runtimeoptions.v1.Options") -> any_pb2.Any:
    options = runtimeoptions_pb2.Options(type_url="io.containerd.kata.v2", config_path=path)
    return any_pb2.Any(type_url=type_url, value=options.SerializeToString())


def _bootstrap_params() -> type[Message]:
    """containerd.runtime.bootstrap.v1.BootstrapParams (containerd 2.3+, api/runtime/bootstrap/v1), built
    from its field numbers in a private pool: the test's own copy, not one the shim could lean on."""
    f = descriptor_pb2.FileDescriptorProto(
        name="test_bootstrap.proto", package="test.bootstrap", dependency=["google/protobuf/any.proto"]
    )
    ext = f.message_type.add(name="Extension")
    ext.field.add(name="value", number=1, type=11, type_name=".google.protobuf.Any", label=1)
    params = f.message_type.add(name="BootstrapParams")
    for name, number in (("instance_id", 1), ("namespace", 2), ("containerd_version", 4)):
        params.field.add(name=name, number=number, type=9, label=1)
    params.field.add(name="log_level", number=3, type=5, label=1)  # an enum on the wire: a varint
    params.field.add(name="extensions", number=8, type=11, type_name=".test.bootstrap.Extension", label=3)
    params.field.add(name="socket_dir", number=9, type=9, label=1)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(
        descriptor_pb2.FileDescriptorProto.FromString(any_pb2.DESCRIPTOR.serialized_pb).SerializeToString()
    )
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("test.bootstrap.BootstrapParams"))


def test_config_path_from_the_any_containerd_up_to_2_2_writes() -> None:
    assert start_config_path(_options_any().SerializeToString()) == PATH
    prefixed = _options_any(type_url="type.googleapis.com/runtimeoptions.v1.Options")
    assert start_config_path(prefixed.SerializeToString()) == PATH
    cri = _options_any(type_url="cri.runtimeoptions.v1.Options")
    assert start_config_path(cri.SerializeToString()) == PATH
    runc = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x12\x03abc")
    assert start_config_path(runc.SerializeToString()) == ""
    assert start_config_path(b"") == ""


def test_config_path_from_the_bootstrap_params_of_containerd_2_3() -> None:
    params_cls = _bootstrap_params()
    params: Any = params_cls(instance_id="sb1", namespace="k8s.io", log_level=-4, socket_dir="/run/s")
    for ext in (any_pb2.Any(type_url="x.Other", value=b"\x0a\x01z"), _options_any()):
        value = params.extensions.add().value  # the private pool's Any: same wire, another class
        value.type_url, value.value = ext.type_url, ext.value
    assert start_config_path(params.SerializeToString()) == PATH
    bare: Any = params_cls(instance_id="runtimeoptions.v1.Options-lookalike", namespace="k8s.io")
    assert start_config_path(bare.SerializeToString()) == ""


@given(st.binary(max_size=256))
def test_any_bytes_give_a_path_or_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert isinstance(start_config_path(data), str)


def test_stdin_is_read_until_containerd_closes_it() -> None:
    r, w = os.pipe()
    os.write(w, _options_any().SerializeToString())
    os.close(w)
    try:
        assert stdin_config_path(r) == PATH
    finally:
        os.close(r)


def test_stdin_without_options_gives_nothing() -> None:
    with open(os.devnull, "rb") as null:
        assert stdin_config_path(null.fileno()) == ""
    r, w = os.pipe()  # a writer that never writes nor closes: given up after the timeout
    try:
        assert stdin_config_path(r, timeout=0.05) == ""
        os.write(w, b"\xff\xff\xff")  # not a protobuf message
        os.close(w)
        w = -1
        assert stdin_config_path(r) == ""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.mark.parametrize(("own", "expected"), [("", PATH), ("/etc/own.toml", "/etc/own.toml")])
def test_a_create_without_config_path_uses_the_one_start_was_given(
    tmp_path: Path, own: str, expected: str
) -> None:
    asked: list[str] = []

    def load(path: str) -> Any:
        asked.append(path)
        raise ValueError("stop here")

    async def main() -> None:
        manager = RuntimeHandlerManager(
            "sb1",
            store=StateStore(tmp_path),
            load=load,
            new_handler=lambda name: None,
            default_config_path=PATH,
        )
        first = ContainerConfig("sb1", tmp_path, {}, [], Stdio(), options={"config_path": own} if own else {})
        with pytest.raises(ValueError, match="stop here"):
            await manager.create_sandbox(first, _publish)

    trio.run(main)
    assert asked == [expected]


async def _publish(topic: str, event: Message) -> None:
    pass
