"""The generated code is current, and the wire facts peers depend on hold."""

from __future__ import annotations

import filecmp
import importlib
import importlib.util
import pathlib
import sys
import types

import pytest
from google.protobuf.descriptor import FieldDescriptor

from kata_proto import agent, containerd, cri
from kata_proto._gen.google.rpc import status_pb2
from kata_proto._gen.ttrpc import request_pb2

PKG = pathlib.Path(__file__).resolve().parent.parent
GEN = PKG / "src" / "kata_proto" / "_gen"


def _load_generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("genprotos", PKG / "tools" / "genprotos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["genprotos"] = module
    spec.loader.exec_module(module)
    return module


def _tree(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_committed_generated_code_is_current(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "_gen"
    _load_generator().generate(out)
    assert _tree(out) == _tree(GEN), "run `nox -s protos` and commit the result"
    for rel in sorted(_tree(out)):
        assert filecmp.cmp(out / rel, GEN / rel, shallow=False), f"{rel} is stale: run `nox -s protos`"


def test_every_generated_module_imports() -> None:
    names = sorted(
        "kata_proto._gen." + ".".join(p.relative_to(GEN).with_suffix("").parts) for p in GEN.rglob("*_pb2.py")
    )
    assert "kata_proto._gen.kata.agent_pb2" in names
    assert "kata_proto._gen.containerd.runtime.task.v2.shim_pb2" in names
    for name in names:
        importlib.import_module(name)


def _numbers(message: type) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


def test_ttrpc_envelope_field_numbers() -> None:
    assert _numbers(request_pb2.Request) == {
        "service": 1,
        "method": 2,
        "payload": 3,
        "timeout_nano": 4,
        "metadata": 5,
    }
    assert _numbers(request_pb2.Response) == {"status": 1, "payload": 2}
    assert _numbers(request_pb2.KeyValue) == {"key": 1, "value": 2}
    assert _numbers(status_pb2.Status) == {"code": 1, "message": 2, "details": 3}
    assert request_pb2.Request.DESCRIPTOR.full_name == "ttrpc.Request"


def test_containerd_event_and_task_numbers() -> None:
    assert _numbers(containerd.event_pb2.Envelope) == {"timestamp": 1, "namespace": 2, "topic": 3, "event": 4}
    assert _numbers(containerd.ttrpc_events_pb2.ForwardRequest) == {"envelope": 1}
    assert _numbers(containerd.events_pb2.TaskExit) == {
        "container_id": 1,
        "id": 2,
        "pid": 3,
        "exit_status": 4,
        "exited_at": 5,
    }
    assert _numbers(containerd.events_pb2.TaskDelete)["id"] == 5
    assert _numbers(containerd.task_pb2.CreateTaskRequest)["options"] == 10
    assert _numbers(containerd.runtimeoptions_pb2.Options) == {
        "type_url": 1,
        "config_path": 2,
        "config_body": 3,
    }
    assert containerd.runtimeoptions_pb2.Options.DESCRIPTOR.full_name == "runtimeoptions.v1.Options"


def test_forward_request_bytes_match_containerd_layout() -> None:
    # Hand-assembled: ForwardRequest.envelope (field 1, LEN) holding Envelope.namespace (2) and .topic (3).
    envelope = containerd.event_pb2.Envelope(namespace="k8s.io", topic="/tasks/exit")
    wire = containerd.ttrpc_events_pb2.ForwardRequest(envelope=envelope).SerializeToString()
    inner = b"\x12\x06k8s.io" + b"\x1a\x0b/tasks/exit"
    assert wire == b"\x0a" + bytes([len(inner)]) + inner


def test_task_event_numbers_for_every_published_topic() -> None:
    e = containerd.events_pb2
    assert _numbers(e.TaskCreate) == {
        "container_id": 1,
        "bundle": 2,
        "rootfs": 3,
        "io": 4,
        "checkpoint": 5,
        "pid": 6,
    }
    assert _numbers(e.TaskStart) == {"container_id": 1, "pid": 2}
    assert _numbers(e.TaskExecAdded) == {"container_id": 1, "exec_id": 2}
    assert _numbers(e.TaskExecStarted) == {"container_id": 1, "exec_id": 2, "pid": 3}
    assert _numbers(e.TaskOOM) == {"container_id": 1}
    assert _numbers(e.TaskPaused) == {"container_id": 1}
    assert _numbers(e.TaskResumed) == {"container_id": 1}


def test_service_full_names_and_rpcs() -> None:
    assert containerd.TASK_SERVICE.full_name == "containerd.task.v2.Task"
    assert [m.name for m in containerd.TASK_SERVICE.methods] == [
        "State",
        "Create",
        "Start",
        "Delete",
        "Pids",
        "Pause",
        "Resume",
        "Checkpoint",
        "Kill",
        "Exec",
        "ResizePty",
        "CloseIO",
        "Update",
        "Wait",
        "Stats",
        "Connect",
        "Shutdown",
    ]
    assert containerd.EVENTS_SERVICE.full_name == "containerd.services.events.ttrpc.v1.Events"
    assert containerd.SANDBOX_SERVICE.full_name == "containerd.runtime.sandbox.v1.Sandbox"
    assert agent.HEALTH_SERVICE.full_name == "grpc.Health"
    assert [m.name for m in agent.HEALTH_SERVICE.methods] == ["Check", "Version"]


# The rpcs of grpc.AgentService in kata-containers 4.x, read once from upstream agent.proto.
UPSTREAM_AGENT_RPCS = [
    "CreateContainer",
    "StartContainer",
    "RemoveContainer",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "UpdateContainer",
    "UpdateEphemeralMounts",
    "StatsContainer",
    "PauseContainer",
    "ResumeContainer",
    "RemoveStaleVirtiofsShareMounts",
    "GetDiagnosticData",
    "WriteStdin",
    "ReadStdout",
    "ReadStderr",
    "CloseStdin",
    "TtyWinResize",
    "UpdateInterface",
    "UpdateRoutes",
    "ListInterfaces",
    "ListRoutes",
    "AddARPNeighbors",
    "GetIPTables",
    "SetIPTables",
    "GetMetrics",
    "MemAgentMemcgSet",
    "MemAgentCompactSet",
    "CreateSandbox",
    "DestroySandbox",
    "OnlineCPUMem",
    "ReseedRandomDev",
    "GetGuestDetails",
    "MemHotplugByProbe",
    "SetGuestDateTime",
    "CopyFile",
    "GetOOMEvent",
    "AddSwap",
    "AddSwapPath",
    "GetVolumeStats",
    "ResizeVolume",
    "SetPolicy",
]


def test_agent_service_has_every_upstream_rpc() -> None:
    assert agent.AGENT_SERVICE.full_name == "grpc.AgentService"
    assert [m.name for m in agent.AGENT_SERVICE.methods] == UPSTREAM_AGENT_RPCS


def test_agent_message_numbers() -> None:
    a = agent.agent_pb2
    assert _numbers(a.CreateContainerRequest) == {
        "container_id": 1,
        "exec_id": 2,
        "string_user": 3,
        "devices": 4,
        "storages": 5,
        "OCI": 6,
        "sandbox_pidns": 7,
        "shared_mounts": 8,
        "stdin_port": 9,
        "stdout_port": 10,
        "stderr_port": 11,
    }
    assert _numbers(a.ExecProcessRequest) == {
        "container_id": 1,
        "exec_id": 2,
        "string_user": 3,
        "process": 4,
        "stdin_port": 5,
        "stdout_port": 6,
        "stderr_port": 7,
    }
    assert _numbers(a.WaitProcessResponse) == {"status": 1}
    assert a.WaitProcessResponse.DESCRIPTOR.fields_by_name["status"].type == FieldDescriptor.TYPE_INT32
    assert _numbers(a.ReadStreamRequest) == {"container_id": 1, "exec_id": 2, "len": 3}
    assert _numbers(a.WriteStreamRequest) == {"container_id": 1, "exec_id": 2, "data": 3}
    assert _numbers(a.Storage) == {
        "driver": 1,
        "driver_options": 2,
        "source": 3,
        "fstype": 4,
        "options": 5,
        "mount_point": 6,
        "fs_group": 7,
        "shared": 8,
    }
    oci_type = a.CreateContainerRequest.DESCRIPTOR.fields_by_name["OCI"].message_type
    assert oci_type is not None and oci_type.full_name == "grpc.Spec"
    assert _numbers(a.ReadStreamResponse) == {"data": 1}
    assert _numbers(a.WriteStreamResponse) == {"len": 1}
    assert _numbers(a.OOMEvent) == {"container_id": 1}
    assert _numbers(a.GuestDetailsResponse) == {
        "mem_block_size_bytes": 1,
        "agent_details": 2,
        "support_mem_hotplug_probe": 3,
    }
    assert agent.types_pb2.Interface.DESCRIPTOR.full_name == "types.Interface"
    assert _numbers(agent.types_pb2.Interface)["hwAddr"] == 5
    status = agent.health_pb2.HealthCheckResponse.ServingStatus
    assert (status.UNKNOWN, status.SERVING, status.NOT_SERVING) == (0, 1, 2)


@pytest.mark.parametrize(
    "event",
    [
        containerd.events_pb2.TaskExit(container_id="c1", id="e1", pid=42, exit_status=7),
        containerd.events_pb2.TaskOOM(container_id="c1"),
        containerd.events_pb2.TaskExecStarted(container_id="c1", exec_id="e1", pid=9),
    ],
)
def test_pack_event_uses_bare_type_url_and_round_trips(event: object) -> None:
    packed = containerd.pack_event(event)  # type: ignore[arg-type]
    assert packed.type_url == event.DESCRIPTOR.full_name  # type: ignore[attr-defined]
    assert not packed.type_url.startswith("type.googleapis.com")
    assert containerd.unpack_event(packed) == event


def test_unpack_event_rejects_unknown_type() -> None:
    from google.protobuf import any_pb2

    with pytest.raises(ValueError, match="unknown event type"):
        containerd.unpack_event(any_pb2.Any(type_url="containerd.events.NoSuchEvent"))


def test_unpack_event_rejects_corrupt_bytes() -> None:
    from google.protobuf import any_pb2

    corrupt = any_pb2.Any(type_url="containerd.events.TaskExit", value=b"\xff\xff")
    with pytest.raises(ValueError, match=r"corrupt containerd\.events\.TaskExit"):
        containerd.unpack_event(corrupt)


def test_cgroups_v1_metrics_name_and_numbers() -> None:
    # `ctr task metrics` decodes Task.Stats by this exact name.
    metrics = containerd.cgroups_v1_metrics_pb2
    assert metrics.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    assert _numbers(metrics.Metrics) == {
        "hugetlb": 1,
        "pids": 2,
        "cpu": 3,
        "memory": 4,
        "blkio": 5,
        "rdma": 6,
        "network": 7,
        "cgroup_stats": 8,
        "memory_oom_control": 9,
    }
    assert _numbers(metrics.CPUUsage) == {"total": 1, "kernel": 2, "user": 3, "per_cpu": 4}
    assert _numbers(metrics.MemoryStat)["usage"] == 33
    assert _numbers(metrics.MemoryEntry) == {"limit": 1, "usage": 2, "max": 3, "failcnt": 4}
    assert _numbers(metrics.BlkIOEntry) == {"op": 1, "device": 2, "major": 3, "minor": 4, "value": 5}
    assert containerd.pack_event(metrics.Metrics()).type_url == "io.containerd.cgroups.v1.Metrics"


def test_oci_json_tag_maps_go_field_names_to_runtime_spec_keys() -> None:
    from kata_proto.agent import oci_json_tag

    assert oci_json_tag("Version") == "ociVersion"
    assert oci_json_tag("UIDMappings") == "uidMappings"
    assert oci_json_tag("OOMScoreAdj") == "oomScoreAdj"
    assert oci_json_tag("Pagesize") == "pageSize"
    assert oci_json_tag("CgroupsPath") == "cgroupsPath"


def test_sandbox_api_rpcs_and_numbers() -> None:
    # containerd 2.x's shim sandbox controller (plugins/sandbox/controller.go) calls these.
    assert [m.name for m in containerd.SANDBOX_SERVICE.methods] == [
        "CreateSandbox",
        "StartSandbox",
        "Platform",
        "StopSandbox",
        "WaitSandbox",
        "SandboxStatus",
        "PingSandbox",
        "ShutdownSandbox",
        "SandboxMetrics",
    ]
    sandbox = containerd.sandbox_pb2
    assert _numbers(sandbox.CreateSandboxRequest) == {
        "sandbox_id": 1,
        "bundle_path": 2,
        "rootfs": 3,
        "options": 4,
        "netns_path": 5,
        "annotations": 6,
    }
    assert _numbers(sandbox.StopSandboxRequest) == {"sandbox_id": 1, "timeout_secs": 2}
    assert _numbers(sandbox.SandboxStatusResponse) == {
        "sandbox_id": 1,
        "pid": 2,
        "state": 3,
        "info": 4,
        "created_at": 5,
        "exited_at": 6,
        "extra": 7,
    }
    assert _numbers(containerd.metrics_pb2.Metric) == {"timestamp": 1, "id": 2, "data": 3}


def test_cri_pod_sandbox_config_name_and_numbers() -> None:
    # Read once from k8s.io/cri-api pkg/apis/runtime/v1/api.proto (as vendored by containerd 2.x).
    assert cri.POD_SANDBOX_CONFIG_TYPE == "runtime.v1.PodSandboxConfig"
    pb = cri.cri_pb2
    assert _numbers(pb.PodSandboxConfig) == {
        "metadata": 1,
        "hostname": 2,
        "log_directory": 3,
        "dns_config": 4,
        "labels": 6,
        "annotations": 7,
        "linux": 8,
    }
    assert _numbers(pb.PodSandboxMetadata) == {"name": 1, "uid": 2, "namespace": 3, "attempt": 4}
    assert _numbers(pb.DNSConfig) == {"servers": 1, "searches": 2, "options": 3}
    assert _numbers(pb.LinuxPodSandboxConfig) == {
        "cgroup_parent": 1,
        "sysctls": 3,
        "overhead": 4,
        "resources": 5,
    }
    assert _numbers(pb.LinuxContainerResources) == {
        "cpu_period": 1,
        "cpu_quota": 2,
        "cpu_shares": 3,
        "memory_limit_in_bytes": 4,
        "oom_score_adj": 5,
        "cpuset_cpus": 6,
        "cpuset_mems": 7,
        "unified": 9,
        "memory_swap_limit_in_bytes": 10,
    }
