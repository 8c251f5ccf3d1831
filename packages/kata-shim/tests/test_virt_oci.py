"""The guest's OCI spec (pure): rewriting, JSON -> oci.proto -> JSON through the agent's converter, and the
client's stats -> containerd metrics."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kata_agent._oci import message_to_json
from kata_agent_client._convert import stats_from_pb
from kata_proto.agent import OciJsonError, agent_pb2, oci_from_json, oci_pb2
from kata_shim.runtime import InvalidArgument
from kata_shim.virt_container import guest_spec, metrics_from_stats

FULL: dict[str, Any] = {
    "ociVersion": "1.1.0",
    "process": {
        "terminal": True,
        "consoleSize": {"height": 40, "width": 100},
        "user": {"uid": 1000, "gid": 100, "additionalGids": [10, 20]},
        "args": ["sh", "-c", "echo hi"],
        "env": ["PATH=/bin"],
        "cwd": "/work",
        "capabilities": {
            "bounding": ["CAP_KILL"],
            "effective": ["CAP_KILL"],
            "inheritable": [],
            "permitted": ["CAP_KILL"],
            "ambient": [],
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1024}],
        "noNewPrivileges": True,
        "apparmorProfile": "cri-default",
        "oomScoreAdj": -998,
        "selinuxLabel": "",
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "web",
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]}],
    "annotations": {"io.kubernetes.cri.container-type": "container"},
    "linux": {
        "uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
        "sysctl": {"net.ipv4.ip_forward": "1"},
        "resources": {
            "devices": [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 1, "minor": 3},
            ],
            "memory": {"limit": 1 << 30, "swap": 1 << 30, "disableOOMKiller": False},
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1"},
            "pids": {"limit": 100},
            "blockIO": {"weight": 10, "throttleReadIOPSDevice": [{"major": 8, "minor": 0, "rate": 100}]},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
        },
        "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:abc",
        "namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "mount"},
        ],
        "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438, "uid": 0}],
        "seccomp": {
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
                {
                    "names": ["personality"],
                    "action": "SCMP_ACT_ALLOW",
                    "errnoRet": 1,
                    "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
                }
            ],
        },
        "maskedPaths": ["/proc/kcore"],
        "readonlyPaths": ["/proc/sys"],
        "rootfsPropagation": "rslave",
    },
    "hooks": {"createRuntime": [{"path": "/usr/bin/nvidia-hook"}]},
}


def test_guest_spec_rewrites_root_mounts_cgroups_and_drops_host_parts() -> None:
    original = copy.deepcopy(FULL)
    guest_mounts = [{"destination": "/data", "type": "bind", "source": "/g/v/x", "options": ["rbind"]}]
    out = guest_spec(FULL, "c1", "/run/kata-containers/shared/containers/c1/rootfs", guest_mounts)
    assert original == FULL  # input untouched
    assert out["root"] == {"path": "/run/kata-containers/shared/containers/c1/rootfs", "readonly": True}
    assert out["mounts"] == guest_mounts
    assert "hooks" not in out
    assert out["linux"]["namespaces"] == [{"type": "pid"}, {"type": "mount"}]
    assert out["linux"]["cgroupsPath"] == "/kata_agent/c1"
    assert out["process"] == FULL["process"]


def test_guest_spec_requires_process_args() -> None:
    with pytest.raises(InvalidArgument):
        guest_spec({"process": {"args": []}}, "c1", "/r", [])


def _set_fields(value: Any) -> Any:
    """What proto3 can carry: zero, false, empty values vanish (the agent fills its own defaults)."""
    if isinstance(value, dict):
        out = {k: _set_fields(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (0, False, "", [], {}, None)}
    if isinstance(value, list):
        return [_set_fields(v) for v in value]
    return value


def test_spec_survives_the_trip_to_the_agent_and_back() -> None:
    spec = guest_spec(FULL, "c1", "/guest/rootfs", FULL["mounts"])
    back = message_to_json(oci_from_json(spec, oci_pb2.Spec()))  # the agent's protobuf -> config.json
    assert back.pop("ociVersion") == spec.pop("ociVersion")
    assert back == _set_fields(spec)
    assert back["linux"]["seccomp"]["syscalls"][0]["errnoRet"] == 1
    assert back["linux"]["resources"]["hugepageLimits"] == [{"pageSize": "2MB"}]


def test_wrong_types_name_the_json_path() -> None:
    with pytest.raises(OciJsonError, match=r"process\.user\.uid"):
        oci_from_json({"args": ["x"], "user": {"uid": "root"}}, oci_pb2.Process(), "process")
    with pytest.raises(OciJsonError, match=r"resources\.pids\.limit"):
        oci_from_json({"pids": {"limit": "many"}}, oci_pb2.LinuxResources(), "resources")


def test_stats_become_cgroups_v1_metrics() -> None:
    resp = agent_pb2.StatsContainerResponse()
    c = resp.cgroup_stats
    c.cpu_stats.cpu_usage.total_usage = 1000
    c.cpu_stats.cpu_usage.percpu_usage.extend([600, 400])
    c.cpu_stats.cpu_usage.usage_in_kernelmode = 300
    c.cpu_stats.cpu_usage.usage_in_usermode = 700
    c.cpu_stats.throttling_data.throttled_periods = 3
    c.memory_stats.cache = 4096
    c.memory_stats.usage.usage = 1 << 20
    c.memory_stats.usage.max_usage = 2 << 20
    c.memory_stats.usage.limit = 16 << 20
    c.memory_stats.usage.failcnt = 7
    stats = {"rss": 123, "pgfault": 9, "total_pgmajfault": 2, "hierarchical_memsw_limit": 5}
    c.memory_stats.stats.update(stats)
    c.pids_stats.current = 3
    c.pids_stats.limit = 64
    c.blkio_stats.io_service_bytes_recursive.add(major=8, minor=0, op="Read", value=512)
    c.hugetlb_stats["2MB"].usage = 0
    c.hugetlb_stats["2MB"].failcnt = 1
    resp.network_stats.add(name="eth0", rx_bytes=10, tx_bytes=20)
    m = metrics_from_stats(stats_from_pb(resp))  # the agent's answer as the client hands it over
    assert (m.cpu.usage.total, m.cpu.usage.kernel, m.cpu.usage.user) == (1000, 300, 700)
    assert list(m.cpu.usage.per_cpu) == [600, 400] and m.cpu.throttling.throttled_periods == 3
    assert (m.memory.usage.usage, m.memory.usage.max, m.memory.usage.limit, m.memory.usage.failcnt) == (
        1 << 20,
        2 << 20,
        16 << 20,
        7,
    )
    assert (m.memory.cache, m.memory.rss, m.memory.pg_fault, m.memory.total_pg_maj_fault) == (4096, 123, 9, 2)
    assert m.memory.hierarchical_swap_limit == 5
    assert (m.pids.current, m.pids.limit) == (3, 64)
    (entry,) = m.blkio.io_service_bytes_recursive
    assert (entry.major, entry.minor, entry.op, entry.value) == (8, 0, "Read", 512)
    (huge,) = m.hugetlb
    assert (huge.pagesize, huge.failcnt) == ("2MB", 1)
    (net,) = m.network
    assert (net.name, net.rx_bytes, net.tx_bytes) == ("eth0", 10, 20)
