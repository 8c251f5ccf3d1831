"""Host tests (no lab VM) of the lab's CRI client: the generated cri-api stubs, the requests the client builds
(against a fake CRI server in this process, on a unix socket), its typed errors, the CRI plugin's
configuration, and the real containerds with that configuration: 1.6 (the system's) and 2.x (Debian sid's,
unpacked by lab/images/build.py; skipped with the command to run when it is not) each answer Version and
ImageStatus and run a runc pod through the kubelet's calls."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from framework import containerd as lab_containerd
from framework import cri, cri_pods
from framework._gen.cri import api_pb2, api_pb2_grpc
from images import busybox_oci

LAB = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(LAB / "protos"))
import gencri  # noqa: E402 - lab/protos/gencri.py

# both containerds, 2.x skipped (saying how to get it) when lab/images/build.py has not unpacked it
VERSIONS = [
    pytest.param(lab_containerd.CONTAINERD_1_6, id="containerd-1.6"),
    pytest.param(
        lab_containerd.CONTAINERD_2,
        id="containerd-2.x",
        marks=pytest.mark.skipif(
            lab_containerd.containerd2_missing() is not None, reason=str(lab_containerd.containerd2_missing())
        ),
    ),
]


def test_stubs_use_upstream_names_in_a_private_pool() -> None:
    from google.protobuf import descriptor_pool

    assert api_pb2.RunPodSandboxRequest.DESCRIPTOR.full_name == "runtime.v1.RunPodSandboxRequest"
    service = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
    for method in ("Version", "RunPodSandbox", "CreateContainer", "ExecSync", "RemovePodSandbox"):
        assert method in service.methods_by_name
    assert "ImageStatus" in api_pb2.DESCRIPTOR.services_by_name["ImageService"].methods_by_name
    assert api_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("runtime.v1.PodSandboxConfig")


def test_stubs_import_beside_another_runtime_v1_in_the_default_pool() -> None:
    """kata_proto may define a trimmed runtime.v1.PodSandboxConfig in the default pool: both must load."""
    script = f"""
import sys
sys.path.insert(0, {str(LAB)!r})
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.internal import builder
f = descriptor_pb2.FileDescriptorProto(name="kata_proto/cri.proto", package="runtime.v1", syntax="proto3")
m = f.message_type.add(name="PodSandboxConfig")
m.field.add(name="hostname", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
ours = descriptor_pool.Default().AddSerializedFile(f.SerializeToString())
g = {{}}
builder.BuildMessageAndEnumDescriptors(ours, g)
builder.BuildTopDescriptorsAndMessages(ours, "kata_cri_pb2", g)
from framework._gen.cri import api_pb2
small = g["PodSandboxConfig"](hostname="h")
full = api_pb2.PodSandboxConfig.FromString(small.SerializeToString())
print(full.hostname)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "h"


def test_generated_code_matches_the_pinned_proto(tmp_path: Path) -> None:
    """What `nox -s protos` checks, here too: the committed proto has the pinned hash, and regenerating
    gives the committed files byte for byte."""
    out = tmp_path / "cri"
    gencri.generate(out)
    committed = LAB / "framework" / "_gen" / "cri"
    names = sorted(p.name for p in committed.iterdir() if p.is_file())
    assert names == sorted(p.name for p in out.iterdir() if p.is_file())
    for name in names:
        assert (out / name).read_bytes() == (committed / name).read_bytes(), name


def test_strip_gogoproto_keeps_everything_else() -> None:
    text = (
        'syntax = "proto3";\npackage runtime.v1;\nimport "github.com/gogo/protobuf/gogoproto/gogo.proto";\n'
        "option (gogoproto.marshaler_all) = true;\nmessage A { string b = 1; }\n"
    )
    assert (
        gencri.strip_gogoproto(text)
        == 'syntax = "proto3";\npackage runtime.v1;\nmessage A { string b = 1; }\n'
    )
    with pytest.raises(gencri.GenerationError):
        gencri.strip_gogoproto("message A { string b = 1 [(gogoproto.nullable) = false]; }\n")


class FakeRuntime(api_pb2_grpc.RuntimeServiceServicer):
    """Records every request; answers Version and RunPodSandbox, NOT_FOUND for a status of pod "gone", and
    holds StopPodSandbox until `release` is set (for the deadline test)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.release = threading.Event()

    def Version(self, request: Any, context: Any) -> Any:
        self.requests.append(("Version", request))
        return api_pb2.VersionResponse(
            version="0.1.0", runtime_name="fake", runtime_version="1", runtime_api_version="v1"
        )

    def RunPodSandbox(self, request: Any, context: Any) -> Any:
        self.requests.append(("RunPodSandbox", request))
        return api_pb2.RunPodSandboxResponse(pod_sandbox_id="pod-1")

    def PodSandboxStatus(self, request: Any, context: Any) -> Any:
        self.requests.append(("PodSandboxStatus", request))
        context.abort(
            grpc.StatusCode.NOT_FOUND, f"an error occurred when try to find sandbox {request.pod_sandbox_id}"
        )

    def StopPodSandbox(self, request: Any, context: Any) -> Any:
        self.release.wait(60)
        return api_pb2.StopPodSandboxResponse()

    def ExecSync(self, request: Any, context: Any) -> Any:
        self.requests.append(("ExecSync", request))
        return api_pb2.ExecSyncResponse(stdout=b"pod-a\n", stderr=b"", exit_code=0)


@contextlib.contextmanager
def serving_runtime(runtime: Any, where: Path, workers: int = 4) -> Iterator[str]:
    """A gRPC server with ``runtime`` as the CRI RuntimeService on a unix socket in ``where``; its path."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
    address = str(where / "cri.sock")
    server.add_insecure_port(f"unix://{address}")
    server.start()
    try:
        yield address
    finally:
        server.stop(grace=None)


@pytest.fixture
def fake_cri(tmp_path: Path) -> Iterator[tuple[FakeRuntime, str]]:
    runtime = FakeRuntime()
    with serving_runtime(runtime, tmp_path) as address:
        try:
            yield runtime, address
        finally:
            runtime.release.set()  # a StopPodSandbox still waiting returns before the server stops


def test_client_sends_what_the_kubelet_sends(fake_cri: tuple[FakeRuntime, str]) -> None:
    runtime, address = fake_cri
    with cri.CriClient(address) as client:
        version = client.version()
        config = cri.pod_sandbox_config(
            "pod-a",
            namespace="lab",
            uid="uid-1",
            log_directory="/var/log/pods/a",
            annotations={"io.katacontainers.config.hypervisor.default_vcpus": "1"},
            cgroup_parent="/kata-lab",
        )
        pod_id = client.run_pod_sandbox(config, runtime_handler=cri.KATA_HANDLER)
        result = client.exec_sync("c1", ["hostname"], timeout=30)
    assert version.runtime_api_version == "v1"
    assert pod_id == "pod-1"
    assert result == cri.ExecResult(0, "pod-a\n", "")
    (name, v), (name2, run), (name3, ex) = runtime.requests
    assert (name, name2, name3) == ("Version", "RunPodSandbox", "ExecSync")
    assert v.version == cri.KUBELET_API_VERSION
    assert run.runtime_handler == "kata"
    sent = run.config
    assert (sent.metadata.name, sent.metadata.namespace, sent.metadata.uid) == ("pod-a", "lab", "uid-1")
    assert sent.hostname == "pod-a" and sent.log_directory == "/var/log/pods/a"
    assert sent.annotations["io.katacontainers.config.hypervisor.default_vcpus"] == "1"
    assert sent.linux.cgroup_parent == "/kata-lab"
    ns = sent.linux.security_context.namespace_options
    assert (ns.network, ns.ipc, ns.pid) == (api_pb2.POD, api_pb2.POD, api_pb2.CONTAINER)
    assert list(ex.cmd) == ["hostname"] and ex.timeout == 30 and ex.container_id == "c1"


def test_container_config_has_the_kubelet_fields() -> None:
    config = cri.container_config(
        "web",
        "docker.io/library/busybox:kata",
        ["sh", "-c"],
        ["echo hi"],
        log_path="web/0.log",
        envs={"A": "1"},
    )
    assert config.metadata.name == "web" and config.image.image == "docker.io/library/busybox:kata"
    assert list(config.command) == ["sh", "-c"] and list(config.args) == ["echo hi"]
    assert config.log_path == "web/0.log"
    assert [(e.key, e.value) for e in config.envs] == [("A", "1")]


def test_errors_are_typed(fake_cri: tuple[FakeRuntime, str], tmp_path: Path) -> None:
    _, address = fake_cri
    with cri.CriClient(address, timeouts={"StopPodSandbox": 1.0}) as client:
        with pytest.raises(cri.CriNotFound) as found:
            client.pod_sandbox_status("gone")
        assert found.value.method == "PodSandboxStatus" and "gone" in found.value.details
        with pytest.raises(cri.CriUnimplemented):
            client.list_containers()
        with pytest.raises(cri.CriDeadlineExceeded):
            client.stop_pod_sandbox("slow")  # the fake holds it past the 1 s deadline
    with (
        cri.CriClient(str(tmp_path / "nobody.sock"), timeout=30) as client,
        pytest.raises(cri.CriUnavailable),
    ):
        client.version()


def test_read_cri_log_parses_full_and_partial_lines(tmp_path: Path) -> None:
    log = tmp_path / "0.log"
    log.write_text("2026-12-07T03:00:00.1Z stdout F hello world\n2026-12-07T03:00:00.2Z stderr P part\n")
    assert cri.read_cri_log(log) == [
        cri.LogLine("2026-12-07T03:00:00.1Z", "stdout", False, "hello world"),
        cri.LogLine("2026-12-07T03:00:00.2Z", "stderr", True, "part"),
    ]
    assert cri.read_cri_log(tmp_path / "missing.log") == []


def _full_config(config: cri.CriConfig, base: Path) -> dict[str, Any]:
    """The private containerd's whole configuration as the fixture writes it, parsed."""
    header = f'version = {config.config_version}\ndisabled_plugins = []\n[grpc]\n  address = "x"\n'
    return tomllib.loads(header + config.render(base))


def test_cri_config_has_the_kata_and_runc_handlers_and_cni(tmp_path: Path) -> None:
    net_d = tmp_path / "net.d"
    parsed = _full_config(
        cri.CriConfig(cni_conf_dir=net_d, kata_config_path=Path("/etc/kata/x.toml")), tmp_path
    )
    plugin = parsed["plugins"]["io.containerd.grpc.v1.cri"]
    assert plugin["sandbox_image"] == cri.PAUSE_IMAGE
    assert plugin["stream_server_port"] == "0"
    runtimes = plugin["containerd"]["runtimes"]
    assert plugin["containerd"]["default_runtime_name"] == "runc"
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"
    kata = runtimes["kata"]
    assert kata["runtime_type"] == "io.containerd.kata.v2"
    assert kata["pod_annotations"] == ["io.katacontainers.*"]
    assert kata["options"] == {"ConfigPath": "/etc/kata/x.toml"}
    assert plugin["cni"] == {"bin_dir": "/usr/lib/cni", "conf_dir": str(net_d), "max_conf_num": 1}
    assert net_d.is_dir()
    # without a conf dir: one under the private base; without a ConfigPath: no options table
    parsed = _full_config(cri.CriConfig(), tmp_path)
    plugin = parsed["plugins"]["io.containerd.grpc.v1.cri"]
    assert plugin["cni"]["conf_dir"] == str(tmp_path / "cni" / "net.d")
    assert "options" not in plugin["containerd"]["runtimes"]["kata"]


def test_cri_config_for_containerd_2_uses_its_three_plugins_and_the_shim_sandboxer(tmp_path: Path) -> None:
    net_d = tmp_path / "net.d"
    config = cri.CriConfig(
        cni_conf_dir=net_d,
        kata_config_path=Path("/etc/kata/x.toml"),
        version=lab_containerd.CONTAINERD_2,
        extra_runtimes={"other": "io.containerd.other.v2"},
    )
    assert config.config_version == 3
    parsed = _full_config(config, tmp_path)
    assert parsed["version"] == 3
    plugins = parsed["plugins"]
    assert set(plugins) == {
        "io.containerd.cri.v1.images",
        "io.containerd.cri.v1.runtime",
        "io.containerd.grpc.v1.cri",
    }
    images = plugins["io.containerd.cri.v1.images"]
    assert images == {"snapshotter": "overlayfs", "pinned_images": {"sandbox": cri.PAUSE_IMAGE}}
    runtime = plugins["io.containerd.cri.v1.runtime"]
    assert runtime["containerd"]["default_runtime_name"] == "runc"
    runtimes = runtime["containerd"]["runtimes"]
    assert runtimes["runc"] == {"runtime_type": "io.containerd.runc.v2", "sandboxer": "podsandbox"}
    kata = runtimes["kata"]
    assert (kata["runtime_type"], kata["sandboxer"]) == ("io.containerd.kata.v2", "shim")
    assert kata["pod_annotations"] == ["io.katacontainers.*"]
    assert kata["options"] == {"ConfigPath": "/etc/kata/x.toml"}
    assert runtimes["other"]["sandboxer"] == "podsandbox"
    assert runtime["cni"] == {"bin_dirs": ["/usr/lib/cni"], "conf_dir": str(net_d), "max_conf_num": 1}
    assert plugins["io.containerd.grpc.v1.cri"] == {
        "stream_server_address": "127.0.0.1",
        "stream_server_port": "0",
    }
    # the pause container's way, as on 1.6, is a parameter
    podsandbox = cri.CriConfig(version=lab_containerd.CONTAINERD_2, kata_sandboxer=cri.SANDBOXER_PODSANDBOX)
    kata = _full_config(podsandbox, tmp_path)["plugins"]["io.containerd.cri.v1.runtime"]["containerd"][
        "runtimes"
    ]
    assert kata["kata"]["sandboxer"] == "podsandbox"
    # 1.6's tables name no sandboxer (1.6 has none)
    runtimes = _full_config(cri.CriConfig(), tmp_path)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert "sandboxer" not in runtimes["runtimes"]["kata"]


def test_readme_kubernetes_snippets_are_the_tested_kata_tables(tmp_path: Path) -> None:
    """The root README's "Use it with Kubernetes" RuntimeClass and containerd snippets say what the lab's
    CriConfig writes for the kata handler, on 1.6 (config version 2) and 2.x (version 3)."""
    readme = (LAB.parent / "README.md").read_text()
    section = readme.split("## Use it with Kubernetes", 1)[1].split("\n## ", 1)[0]
    assert f"handler: {cri.KATA_HANDLER}" in section
    v2, v3 = (tomllib.loads(block) for block in re.findall(r"```toml\n(.*?)```", section, re.DOTALL))
    config_path = Path("/etc/kata-containers/runtime-rs/configuration.toml")
    for snippet, version, plugin in (
        (v2, lab_containerd.CONTAINERD_1_6, "io.containerd.grpc.v1.cri"),
        (v3, lab_containerd.CONTAINERD_2, "io.containerd.cri.v1.runtime"),
    ):
        tested = _full_config(cri.CriConfig(version=version, kata_config_path=config_path), tmp_path)
        assert snippet["version"] == tested["version"]
        kata = tested["plugins"][plugin]["containerd"]["runtimes"][cri.KATA_HANDLER]
        assert snippet["plugins"][plugin]["containerd"]["runtimes"][cri.KATA_HANDLER] == kata


@pytest.mark.parametrize("version", lab_containerd.CONTAINERD_VERSIONS)
def test_more_kata_handlers_each_name_their_configuration(tmp_path: Path, version: str) -> None:
    """A second RuntimeClass of our runtime (the bench's `kata-template`): written like `kata`, with its own
    ConfigPath; `kata` keeps the shim's own lookup."""
    template = Path("/tmp/bench/template/configuration.toml")
    config = cri.CriConfig(version=version, extra_kata_handlers={"kata-template": template})
    plugin = (
        "io.containerd.grpc.v1.cri"
        if version == lab_containerd.CONTAINERD_1_6
        else "io.containerd.cri.v1.runtime"
    )
    runtimes = _full_config(config, tmp_path)["plugins"][plugin]["containerd"]["runtimes"]
    assert set(runtimes) == {"runc", "kata", "kata-template"}
    assert runtimes["kata-template"] == {**runtimes["kata"], "options": {"ConfigPath": str(template)}}
    assert "options" not in runtimes["kata"]
    for taken in ("runc", "kata"):
        with pytest.raises(ValueError, match="defined twice"):
            cri.CriConfig(version=version, extra_kata_handlers={taken: template})


def test_cri_config_refuses_unknown_versions_and_sandboxers() -> None:
    with pytest.raises(ValueError, match="containerd version"):
        cri.CriConfig(version="1.7")
    with pytest.raises(ValueError, match="sandboxer"):
        cri.CriConfig(version=lab_containerd.CONTAINERD_2, kata_sandboxer="vm")
    # a containerd of another version than the tables were written for
    with (
        pytest.raises(ValueError, match=r"written for 1\.6"),
        lab_containerd.private_containerd(cri=cri.CriConfig(), version=lab_containerd.CONTAINERD_2),
    ):
        pass


def test_bridge_conflist_is_one_bridge_with_host_local(tmp_path: Path) -> None:
    conf = cri.bridge_conflist("kata-cri", "kata-cri0", "10.90.0.0/24", tmp_path / "ipam")
    (plugin,) = conf["plugins"]
    assert plugin["type"] == "bridge" and plugin["bridge"] == "kata-cri0" and plugin["isGateway"]
    assert plugin["ipam"]["type"] == "host-local"
    assert plugin["ipam"]["ranges"] == [[{"subnet": "10.90.0.0/24"}]]


def test_pause_image_sleeps_for_good(tmp_path: Path) -> None:
    import json
    import tarfile

    tar = cri.build_pause_image(tmp_path / "pause.tar")
    with tarfile.open(tar) as t:
        index = json.loads(t.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest_digest = index["manifests"][0]["digest"].removeprefix("sha256:")
        assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == cri.PAUSE_IMAGE
        manifest = json.loads(t.extractfile(f"blobs/sha256/{manifest_digest}").read())  # type: ignore[union-attr]
        config_digest = manifest["config"]["digest"].removeprefix("sha256:")
        config = json.loads(t.extractfile(f"blobs/sha256/{config_digest}").read())  # type: ignore[union-attr]
    assert config["config"]["Entrypoint"] == ["/bin/sleep"]
    assert config["config"]["Cmd"] == ["2147483647"]


@pytest.mark.containerd
@pytest.mark.root
@pytest.mark.skipif(lab_containerd._fixture.skip_reason() is not None, reason="needs root and containerd")
@pytest.mark.parametrize("containerd_version", VERSIONS)
def test_containerd_serves_cri_v1_with_this_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, containerd_version: str
) -> None:
    """The real containerd (1.6, 2.x) accepts the configuration, serves runtime.v1 (Version), and its CRI
    plugin sees the pause image imported into k8s.io (ImageStatus): what the lab's pods need before any VM."""
    monkeypatch.setattr(lab_containerd, "keep_log", lambda path: None)
    config = cri.CriConfig(cni_conf_dir=tmp_path / "net.d", version=containerd_version)
    tar = cri.build_pause_image(tmp_path / "pause.tar")
    before = cri.netns_names()
    with lab_containerd.private_containerd(cri=config) as ctrd:
        assert ctrd.cri is config and ctrd.version == containerd_version
        ctrd.import_image(tar, namespace=cri.CRI_NAMESPACE)
        with cri.CriClient(ctrd.address, timeout=60) as client:
            version = client.version()
            assert version.runtime_api_version == "v1", version
            assert version.runtime_name == "containerd"
            assert version.runtime_version.startswith(containerd_version.removesuffix("x")), version
            if containerd_version == lab_containerd.CONTAINERD_2:
                # 2.x lists the deprecated settings it was given (1.6's `ctr` has no such command)
                deprecations = ctrd.ctr("deprecations", "list").stdout
                assert deprecations.strip().splitlines()[1:] == [], deprecations
            conditions = client.status()
            assert conditions["RuntimeReady"][0], conditions
            # an empty CNI conf dir: the network is not ready (the kubelet would wait)
            assert not conditions["NetworkReady"][0], conditions
            image = client.image_status(cri.PAUSE_IMAGE)
            assert image is not None, ctrd.log_tail()
            assert cri.PAUSE_IMAGE in image.repo_tags
            assert client.image_status("docker.io/library/nothing:here") is None
            assert client.list_pod_sandbox() == []
        base = ctrd.base
    assert not base.exists()
    assert cri.netns_names() == before


@pytest.mark.containerd
@pytest.mark.root
@pytest.mark.skipif(lab_containerd._fixture.skip_reason() is not None, reason="needs root and containerd")
@pytest.mark.parametrize("containerd_version", VERSIONS)
def test_private_containerd_runs_the_version_asked_for_and_nothing_host_wide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, containerd_version: str
) -> None:
    """CRI off or on, the containerd (and ctr) of ``containerd_version`` runs, and it serves nothing on a
    host-wide path: containerd 2.x's NRI socket (/var/run/nri/nri.sock) stays off."""
    monkeypatch.setattr(lab_containerd, "keep_log", lambda path: None)
    nri = Path("/var/run/nri/nri.sock")
    had_nri = nri.exists()
    configs = [None, cri.CriConfig(cni_conf_dir=tmp_path / "net.d", version=containerd_version)]
    for config in configs:
        with lab_containerd.private_containerd(version=containerd_version, cri=config) as ctrd:
            assert ctrd.version == containerd_version
            server = ctrd.ctr("version").stdout.split("Server:", 1)[1]
            assert f"Version:  {containerd_version.removesuffix('x')}" in server, server
            assert nri.exists() == had_nri
    assert nri.exists() == had_nri


def _remove_cgroup(parent: str) -> None:
    """rmdir ``parent`` (and anything empty below it) in every cgroup hierarchy (v1 and v2)."""
    root = Path("/sys/fs/cgroup")
    for top in [root / parent.strip("/"), *(d / parent.strip("/") for d in root.iterdir() if d.is_dir())]:
        if top.is_dir():
            for d in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                d.rmdir()
            top.rmdir()


@pytest.mark.containerd
@pytest.mark.root
@pytest.mark.skipif(lab_containerd._fixture.skip_reason() is not None, reason="needs root and containerd")
@pytest.mark.parametrize("containerd_version", VERSIONS)
def test_a_host_network_runc_pod_goes_through_the_kubelets_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, containerd_version: str
) -> None:
    """The lab test's flow without a VM or CNI (a hostNetwork pod, runc): the client, the pause image, the
    CRI log files and the teardown work against the real containerd (1.6, 2.x) before the lab adds kata
    and CNI."""
    monkeypatch.setattr(lab_containerd, "keep_log", lambda path: None)
    # restrict_oom_score_adj: the sandbox's -998 needs CAP_SYS_RESOURCE, which a containerized host may lack
    config = cri.CriConfig(
        cni_conf_dir=tmp_path / "net.d", restrict_oom_score_adj=True, version=containerd_version
    )
    busybox = lab_containerd.BUSYBOX_IMAGE
    logs = tmp_path / "logs"
    parent = f"/kata-cri-test-{os.getpid()}-{tmp_path.name}"  # not a name an interrupted earlier run left
    pod = cri.pod_sandbox_config("host-pod", log_directory=str(logs), host_network=True, cgroup_parent=parent)
    script = "echo to-stdout; echo to-stderr >&2; exec sleep 3600"
    try:
        with lab_containerd.private_containerd(cri=config, ready_timeout=60) as ctrd:
            ctrd.import_image(cri.build_pause_image(tmp_path / "pause.tar"), namespace=cri.CRI_NAMESPACE)
            ctrd.import_image(busybox_oci.build(tmp_path / "busybox.tar"), namespace=cri.CRI_NAMESPACE)
            with cri.CriClient(ctrd.address, timeout=120) as client:
                try:
                    pod_id = client.run_pod_sandbox(pod, runtime_handler=cri.RUNC_HANDLER)
                    assert client.pod_sandbox_status(pod_id).status.state == api_pb2.SANDBOX_READY
                    cid = client.create_container(
                        pod_id,
                        cri.container_config("w", busybox, ["sh", "-c", script], log_path="w/0.log"),
                        pod,
                    )
                    client.start_container(cid)
                    assert client.exec_sync(cid, ["echo", "exec-ok"]) == cri.ExecResult(0, "exec-ok\n", "")
                    status = client.container_status(cid)
                    assert status.state == api_pb2.CONTAINER_RUNNING and status.log_path == str(
                        logs / "w/0.log"
                    )
                    (shim,) = ctrd.shim_pids("containerd-shim-runc-v2")
                    # 2.x runs its own runc shim (first on its PATH), 1.6 bookworm's
                    shim_dir = Path(f"/proc/{shim}/exe").resolve().parent
                    v2 = containerd_version == lab_containerd.CONTAINERD_2
                    assert shim_dir == (lab_containerd.CONTAINERD2_BIN if v2 else Path("/usr/bin")), shim_dir
                    assert [c.id for c in client.list_containers(pod_id)] == [cid]
                    client.stop_container(cid, timeout=1)
                    assert client.container_status(cid).state == api_pb2.CONTAINER_EXITED
                    lines = {(x.stream, x.content) for x in cri.read_cri_log(logs / "w" / "0.log")}
                    assert {("stdout", "to-stdout"), ("stderr", "to-stderr")} <= lines, ctrd.log_tail()
                    client.remove_container(cid)
                    client.stop_pod_sandbox(pod_id)
                    client.remove_pod_sandbox(pod_id)
                    with pytest.raises(cri.CriNotFound):
                        client.pod_sandbox_status(pod_id)
                    assert ctrd.shim_pids("containerd-shim-runc-v2") == []
                    assert lab_containerd.mounts_below(ctrd.base) == []
                except BaseException:
                    cri_pods.remove_all_pods(client)  # a failed check must not leave runc's pods running
                    raise
    finally:
        _remove_cgroup(parent)


# the private-namespace scripts' common start: a CNI bridge conflist (framework.cri_pods' bridge), framework
# and test_cri_lab importable
PRIVATE_PRELUDE = """
import json, sys
from pathlib import Path
sys.path[:0] = [{lab!r}, {tests!r}]
from framework import containerd, cri, cri_pods
from images import busybox_oci
import test_cri_lab as flow
containerd.keep_log = lambda path: None
tmp = Path({tmp!r})
net_d = tmp / "net.d"
net_d.mkdir()
conflist = cri.bridge_conflist("kata-cri", cri_pods.BRIDGE, cri_pods.SUBNET, tmp / "ipam")
(net_d / "10-kata-cri.conflist").write_text(json.dumps(conflist))
config = cri.CriConfig(
    cni_conf_dir=net_d, restrict_oom_score_adj=True, version={version!r}, kata_sandboxer={sandboxer!r}
)
"""
RUNC_FLOW = """
with containerd.private_containerd(cri=config) as ctrd:
    ctrd.import_image(busybox_oci.build(tmp / "busybox.tar"), namespace=cri.CRI_NAMESPACE)
    ctrd.import_image(cri.build_pause_image(tmp / "pause.tar"), namespace=cri.CRI_NAMESPACE)
    with cri.CriClient(ctrd.address) as client:
        try:
            flow.pod_flow(cri_pods.CriLab(ctrd, client, tmp), cri.RUNC_HANDLER, cgroup_parent={parent!r})
        finally:
            cri_pods.remove_all_pods(client)
print("pod flow passed")
"""
# what the CRI plugin and CNI write host-wide, each a tmpfs in the test's private mount namespace
PRIVATE_DIRS = ("/run/containerd", "/run/netns", "/var/lib/cni")
CNI_PLUGINS = [cri.CNI_BIN_DIR / p for p in ("bridge", "host-local", "loopback")]
needs_cni = pytest.mark.skipif(
    not all(p.exists() for p in CNI_PLUGINS) or shutil.which("unshare") is None,
    reason="needs Debian's containernetworking-plugins and unshare",
)


def run_in_private_namespaces(
    tmp_path: Path, body: str, version: str, sandboxer: str = cri.SANDBOXER_SHIM, **fields: str
) -> str:
    """`PRIVATE_PRELUDE` (its CriConfig for ``version``, 2.x's kata handler with ``sandboxer``) + ``body``
    (format ``fields``) run by this interpreter in private mount and network namespaces: containerd's and
    CNI's host-wide directories tmpfs, lo up. Its stdout; AssertionError with both streams when it fails."""
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / "flow.py"
    where = {"lab": str(LAB), "tests": str(LAB / "tests"), "tmp": str(work), "version": version}
    where["sandboxer"] = sandboxer
    script.write_text(PRIVATE_PRELUDE.format(**where) + body.format(**fields))
    created = tmp_path / "created"
    shell = "set -e\n"
    for d in PRIVATE_DIRS:
        shell += f"[ -d {d} ] || {{ mkdir -p {d}; echo {d} >> {created}; }}; mount -t tmpfs tmpfs {d}\n"
    shell += f"ip link set lo up\nexec {sys.executable} {script}\n"
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", shell],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        made = created.read_text().split() if created.exists() else []
        for d in reversed(made):
            Path(d).rmdir()
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-6000:]}"
    return done.stdout


@pytest.mark.containerd
@pytest.mark.root
@pytest.mark.skipif(lab_containerd._fixture.skip_reason() is not None, reason="needs root and containerd")
@needs_cni
@pytest.mark.parametrize("containerd_version", VERSIONS)
def test_the_lab_pod_flow_passes_with_runc_in_private_namespaces(
    tmp_path: Path, containerd_version: str
) -> None:
    """test_cri_lab's whole flow with the `runc` handler (its control) on the host, on containerd 1.6 and
    2.x: containerd, CNI's bridge and the pod run in a private network namespace, containerd's and CNI's
    host-wide directories are tmpfs in a private mount namespace. A failure here is the CRI/CNI set-up,
    never a VM."""
    parent = f"/kata-cri-flow-{tmp_path.name}"
    try:
        out = run_in_private_namespaces(tmp_path, RUNC_FLOW, containerd_version, parent=parent)
    finally:
        _remove_cgroup(parent)
    assert "pod flow passed" in out, out


KATA_SANDBOXER = """
import os, time
state = tmp / "run-kata"
bad = tmp / "env-config.toml"
bad.write_text('[hypervisor.dragonball]\\nkernel = "/bin/sh"\\n[runtime]\\nhypervisor_name = "nosuchvmm"\\n')
env = {{"KATA_CONF_FILE": str(bad), "KATA_SHIM_STATE_ROOT": str(state)}}
env["KATA_SHIM_SHARED_ROOT"] = str(tmp / "shared")
# not a hostNetwork pod: containerd before 2.3.0 panics on one with the shim sandboxer (the nil sandbox spec
# that upstream's b32cecd31 guards in NewBundle)
pod = cri.pod_sandbox_config("kata-pod", log_directory=str(tmp / "logs"))
with containerd.private_containerd(cri=config, extra_env=env) as ctrd:
    ctrd.import_image(cri.build_pause_image(tmp / "pause.tar"), namespace=cri.CRI_NAMESPACE)
    with cri.CriClient(ctrd.address, timeout=120) as client:
        try:
            client.run_pod_sandbox(pod, runtime_handler=cri.KATA_HANDLER)
        except cri.CriError as err:
            failed = err
        else:
            raise AssertionError("RunPodSandbox passed with a configuration naming no hypervisor")
        assert "unknown hypervisor 'nosuchvmm'" in failed.details, (failed, ctrd.log_tail())
        log = ctrd.log()
        calls = [m for m in ("Sandbox.CreateSandbox", "Sandbox.ShutdownSandbox") if m in log]
        if config.kata_sandboxer == cri.SANDBOXER_SHIM:
            assert calls == ["Sandbox.CreateSandbox", "Sandbox.ShutdownSandbox"], ctrd.log_tail()
            assert log.index("Sandbox.CreateSandbox") < log.index("Sandbox.ShutdownSandbox"), ctrd.log_tail()
        else:
            # podsandbox: the pause container's task Create failed, the Sandbox service never called
            assert calls == [] and "Create failed" in log, ctrd.log_tail()
        # 2.x took `start`'s plain address as a ttrpc shim of version 2 (no bootstrap JSON)
        assert 'protocol=ttrpc version=2' in log, ctrd.log_tail()
        end = time.monotonic() + 60
        while ctrd.shim_pids() and time.monotonic() < end:
            time.sleep(0.2)
        assert ctrd.shim_pids() == [], ctrd.log_tail()
        assert client.list_pod_sandbox() == []
        assert cri.netns_names() == set()
    assert containerd.mounts_below(ctrd.base) == []
assert not state.exists() or os.listdir(state) == [], os.listdir(state)
print("kata sandboxer passed")
"""


@pytest.mark.containerd
@pytest.mark.root
@pytest.mark.skipif(lab_containerd._fixture.skip_reason() is not None, reason="needs root and containerd")
@pytest.mark.skipif(
    lab_containerd.containerd2_missing() is not None, reason=str(lab_containerd.containerd2_missing())
)
@needs_cni
@pytest.mark.parametrize("sandboxer", cri.SANDBOXERS)
def test_containerd_2_runs_the_kata_shim_as_the_pods_sandboxer(tmp_path: Path, sandboxer: str) -> None:
    """containerd 2.x with `sandboxer = "shim"`, no VM (in private namespaces, with CNI): RunPodSandbox
    starts our shim with `start -id <pod>` in a bundle without config.json, takes its printed address (not
    bootstrap JSON: a ttrpc shim of version 2), and calls the Sandbox service on it: CreateSandbox fails on
    the configuration KATA_CONF_FILE names, containerd reports our message and shuts the shim down
    (ShutdownSandbox): no shim, pod, netns, mount or shim state left. With `podsandbox` the same failure
    comes from the pause container's Task Create, and no Sandbox call is made."""
    out = run_in_private_namespaces(tmp_path, KATA_SANDBOXER, lab_containerd.CONTAINERD_2, sandboxer)
    assert "kata sandboxer passed" in out, out
