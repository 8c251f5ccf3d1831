"""oci.proto Spec -> runtime-spec config.json (no root needed)."""

from __future__ import annotations

import json

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from kata_agent._mount import MS_BIND, MS_NODEV, MS_RDONLY, MS_REC, parse_options
from kata_agent._oci import process_to_json, spec_to_config
from kata_proto import ttrpc
from kata_proto.agent import oci_pb2


def _spec() -> oci_pb2.Spec:
    spec = oci_pb2.Spec(Version="1.0.2", Hostname="box")
    spec.Process.Args.extend(["sh", "-c", "true"])
    spec.Process.Env.append("A=1")
    spec.Process.User.UID = 1000
    spec.Process.User.AdditionalGids.append(5)
    spec.Process.ConsoleSize.Height = 24
    spec.Process.OOMScoreAdj = 100
    spec.Process.Rlimits.add(Type="RLIMIT_NOFILE", Hard=1024, Soft=1024)
    spec.Process.Capabilities.Bounding.append("CAP_KILL")
    spec.Root.Path = "/run/kata-containers/shared/containers/c1/rootfs"
    spec.Mounts.add(destination="/proc", type="proc", source="proc")
    spec.Annotations["io.kubernetes.cri.container-type"] = "container"
    spec.Linux.Resources.Memory.Limit = 64 << 20
    spec.Linux.Resources.Memory.DisableOOMKiller = True
    spec.Linux.Resources.CPU.Quota = 50000
    spec.Linux.UIDMappings.add(HostID=0, ContainerID=0, Size=1)
    spec.Linux.Namespaces.add(Type="network", Path="/var/run/netns/cni-1234")
    spec.Linux.Namespaces.add(Type="pid")
    spec.Linux.Namespaces.add(Type="mount", Path="/proc/1/ns/mnt")
    spec.Hooks.Prestart.add(Path="/usr/bin/host-hook")
    return spec


def test_spec_maps_to_runtime_spec_json_names_and_int_types() -> None:
    config = spec_to_config(_spec(), "c1")
    json.dumps(config)
    assert config["ociVersion"] == "1.0.2"
    assert config["hostname"] == "box"
    p = config["process"]
    assert p["args"] == ["sh", "-c", "true"] and p["cwd"] == "/"
    assert p["user"] == {"uid": 1000, "gid": 0, "additionalGids": [5]}
    assert p["consoleSize"] == {"height": 24}
    assert p["oomScoreAdj"] == 100
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert p["capabilities"] == {"bounding": ["CAP_KILL"]}
    assert config["root"] == {"path": "/run/kata-containers/shared/containers/c1/rootfs"}
    assert config["mounts"] == [{"destination": "/proc", "type": "proc", "source": "proc"}]
    assert config["annotations"] == {"io.kubernetes.cri.container-type": "container"}
    linux = config["linux"]
    assert linux["resources"]["memory"] == {"limit": 64 << 20, "disableOOMKiller": True}
    assert isinstance(linux["resources"]["memory"]["limit"], int)
    assert linux["resources"]["cpu"] == {"quota": 50000}
    assert linux["uidMappings"] == [{"size": 1}]
    # host namespace paths are dropped; the guest's network is shared; own pid/ipc/uts/mount
    assert sorted(ns["type"] for ns in linux["namespaces"]) == ["ipc", "mount", "pid", "uts"]
    assert all("path" not in ns for ns in linux["namespaces"])
    assert linux["cgroupsPath"] == "/kata_agent/c1"
    assert "hooks" not in config


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.Process.ClearField("Args"), "no args"),
        (lambda s: s.Root.ClearField("Path"), "root.path"),
        (lambda s: setattr(s.Root, "Path", "relative/rootfs"), "not absolute"),
        (lambda s: setattr(s.Process, "Cwd", "tmp"), "cwd"),
        (lambda s: s.Linux.Namespaces.add(Type="bogus"), "unknown namespace"),
        (lambda s: s.Mounts.add(destination="proc", type="proc"), "destination"),
    ],
)
def test_bad_specs_are_invalid_argument(mutate: object, message: str) -> None:
    spec = _spec()
    mutate(spec)  # type: ignore[operator]
    with pytest.raises(ttrpc.InvalidArgument, match=message):
        spec_to_config(spec, "c1")


def test_empty_spec_and_exec_process() -> None:
    with pytest.raises(ttrpc.InvalidArgument):
        spec_to_config(oci_pb2.Spec(), "c1")
    proc = oci_pb2.Process(Args=["ls"], Cwd="/tmp", Terminal=True)
    assert process_to_json(proc) == {
        "args": ["ls"],
        "cwd": "/tmp",
        "terminal": True,
        "user": {"uid": 0, "gid": 0},
    }


def test_mount_options_split_into_flags_and_data() -> None:
    assert parse_options(["ro", "nodev", "size=1m", "mode=755"]) == (MS_RDONLY | MS_NODEV, "size=1m,mode=755")
    assert parse_options(["rbind", "rw", "defaults"]) == (MS_BIND | MS_REC, "")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_spec_bytes_give_config_or_invalid_argument(data: bytes) -> None:
    try:
        spec = oci_pb2.Spec.FromString(data)
    except DecodeError:
        return
    try:
        config = spec_to_config(spec, "c1")
    except ttrpc.InvalidArgument:
        return
    json.dumps(config)
    assert config["process"]["args"] and config["root"]["path"].startswith("/")


@settings(max_examples=100, deadline=None)
@given(
    args=st.lists(st.text(max_size=8), max_size=3),
    root=st.text(max_size=12),
    cwd=st.text(max_size=6),
    namespaces=st.lists(st.sampled_from(["pid", "network", "mount", "user", "bogus", ""]), max_size=4),
)
def test_structured_specs_give_config_or_invalid_argument(
    args: list[str], root: str, cwd: str, namespaces: list[str]
) -> None:
    spec = oci_pb2.Spec()
    spec.Process.Args.extend(args)
    spec.Process.Cwd = cwd
    spec.Root.Path = root
    for ns in namespaces:
        spec.Linux.Namespaces.add(Type=ns)
    try:
        config = spec_to_config(spec, "c1")
    except ttrpc.InvalidArgument:
        return
    json.dumps(config)
    assert {ns["type"] for ns in config["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount"}
