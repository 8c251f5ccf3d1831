"""oci.proto Spec -> runtime-spec config.json (no root needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from kata_agent._mount import MS_BIND, MS_NODEV, MS_RDONLY, MS_REC, parse_options
from kata_agent._oci import GUEST_OCI_VERSION, process_to_json, spec_to_config
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


@pytest.mark.parametrize("version", ["1.0.2", "1.1.0", "1.2.1", ""])
def test_any_1x_spec_reaches_the_runtime_as_the_version_it_accepts(version: str) -> None:
    """containerd 2.x writes 1.2.x specs; the guest's crun 1.8.1 accepts only 1.0.x ones."""
    spec = _spec()
    spec.Version = version
    assert spec_to_config(spec, "c1")["ociVersion"] == GUEST_OCI_VERSION == "1.0.2"


@pytest.mark.parametrize("version", ["2.0.0", "0.9", "latest"])
def test_a_spec_that_is_not_1x_is_refused(version: str) -> None:
    spec = _spec()
    spec.Version = version
    with pytest.raises(ttrpc.InvalidArgument, match=r"not a 1\.x runtime spec"):
        spec_to_config(spec, "c1")


def test_a_containerd_2x_spec_gets_past_cruns_version_check(tmp_path: Path) -> None:
    """The real crun (the guest's, bookworm's 1.8.1) on a bundle written from a 1.2.1 spec: it does not stop
    at "unknown version specified" (it fails later: the rootfs is empty), which it does on the spec as is."""
    if shutil.which("crun") is None:
        pytest.fail("crun missing: the guest runs it (./dev installs it)", pytrace=False)
    spec = oci_pb2.Spec(Version="1.2.1")
    spec.Process.Args.append("/no-such-binary")
    spec.Mounts.add(destination="/proc", type="proc", source="proc")
    spec.Root.Path = str(tmp_path / "rootfs")
    (tmp_path / "rootfs").mkdir()
    config = spec_to_config(spec, "c1")
    state = tmp_path / "state"

    def crun_run(document: dict[str, object]) -> str:
        (tmp_path / "config.json").write_text(json.dumps(document))
        try:
            done = subprocess.run(
                ["crun", "--root", str(state), "--cgroup-manager=disabled", "run", "--bundle", str(tmp_path),
                 "kata-oci-version-test"],
                capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            return done.stdout + done.stderr
        finally:
            subprocess.run(["crun", "--root", str(state), "delete", "-f", "kata-oci-version-test"],
                           capture_output=True, check=False)  # fmt: skip

    assert "unknown version specified" in crun_run({**config, "ociVersion": "1.2.1"})
    assert "unknown version specified" not in crun_run(config)
