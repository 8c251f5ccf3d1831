"""Pods through containerd's CRI plugin as the kubelet drives it (issue 18), on containerd 1.6 and 2.x.

One private containerd with its CRI plugin enabled (framework.cri.CriConfig: a `runc` default handler and a
`kata` handler, runtime_type io.containerd.kata.v2) serves each setup: containerd 1.6 (bookworm's; the pod's
pause container makes the VM through the Task service) and containerd 2.x (Debian sid's, unpacked by
lab/images/build.py, config version 3; the `kata` handler's `sandboxer = "shim"`: containerd drives the VM
through the shim's Sandbox service, and the shim's log must show those calls in containerd's order:
`sandbox_api_order`). The sandbox image is a busybox that
sleeps, imported (the lab has no registry), the workload image the lab's busybox; the pod network is Debian's
bridge + host-local CNI plugins through the conflist framework.cri_pods writes (bridge kata-cri0,
10.90.0.0/24; its `open_cri_lab` is this module's fixture, shared with lab/bench/cri_bench.py).

The same flow runs with handler `runc` first, as the control: when it fails, the CRI/CNI set-up is wrong, not
our shim. Then with `kata`: RunPodSandbox -> PodSandboxStatus -> CreateContainer x2 -> StartContainer x2 ->
ExecSync (`hostname` is the pod's; `cat /proc/cmdline` is the guest's, not the lab VM's; the kernel's
boot_id is the same in both containers and not the lab VM's: one VM per pod) -> ContainerStatus RUNNING ->
the CRI log files hold the workload's lines -> the pod IP answers HTTP from the lab VM (busybox httpd) -> one
shim process for the pod -> StopContainer + RemoveContainer of one container -> StopPodSandbox ->
RemovePodSandbox; then no shim, no mount below the private containerd or naming the pod, no netns, no tap, no
port on the bridge, no /run/kata state of the pod.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework import in_labvm
from framework._gen.cri import api_pb2
from framework.containerd import BUSYBOX_IMAGE, CONTAINERD_1_6, CONTAINERD_2
from framework.cri import (
    KATA_HANDLER,
    PAUSE_IMAGE,
    RUNC_HANDLER,
    SANDBOXER_SHIM,
    CriError,
    CriNotFound,
    container_config,
    netns_names,
    pod_sandbox_config,
    read_cri_log,
)
from framework.cri_pods import (
    EVENTUALLY,
    SHIMS,
    CriLab,
    diagnostics,
    eventually,
    leftovers,
    open_cri_lab,
    remove_all_pods,
)

PAGE = "served-by-a-cri-pod"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
WEB = (
    "echo cri-line-stdout; echo cri-line-stderr >&2; mkdir -p /www; echo {page} > /www/index.html; "
    "httpd -p 8080 -h /www; exec sleep 3600"
)


# each module-scoped containerd: (version, the kata handler's sandboxer on 2.x)
SETUPS = [
    pytest.param((CONTAINERD_1_6, SANDBOXER_SHIM), id="containerd-1.6"),
    pytest.param((CONTAINERD_2, SANDBOXER_SHIM), id="containerd-2.x-shim-sandboxer"),
]


@pytest.fixture(scope="module", params=SETUPS)
def cri_lab(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[CriLab]:
    if not in_labvm():
        pytest.fail("the CRI lab tests run inside the lab VM", pytrace=False)
    version, sandboxer = request.param
    with open_cri_lab(tmp_path_factory.mktemp("cri"), version=version, sandboxer=sandboxer) as lab:
        yield lab


SANDBOX_CALL = re.compile(r"kata_shim\.sandbox: Sandbox\.(\w+) (\S+)")


def sandbox_calls(log: str, pod_id: str) -> list[str]:
    """The Sandbox service methods the shim logged for ``pod_id`` (one INFO line per call, as it got
    them: `kata_shim.sandbox: Sandbox.<Method> <sandbox id>`), in the log's order."""
    return [m.group(1) for m in SANDBOX_CALL.finditer(log) if m.group(2) == pod_id]


def sandbox_api_order(calls: list[str]) -> list[str]:
    """What is wrong with ``calls`` for one pod's whole life under containerd 2.x's shim sandboxer ([] when
    nothing): RunPodSandbox's CreateSandbox then StartSandbox first, the controller's WaitSandbox after
    them; PodSandboxStatus's SandboxStatus and CreateContainer's Platform while the pod runs (before
    StopSandbox, StopPodSandbox's); RemovePodSandbox's ShutdownSandbox last, once."""
    problems = []
    if calls[:2] != ["CreateSandbox", "StartSandbox"]:
        problems.append(f"starts with {calls[:2]}, not CreateSandbox, StartSandbox")
    for method in ("WaitSandbox", "SandboxStatus", "Platform", "StopSandbox", "ShutdownSandbox"):
        if method not in calls:
            problems.append(f"no {method}")
    if problems:
        return problems
    first = {method: calls.index(method) for method in set(calls)}
    for method in ("WaitSandbox", "SandboxStatus", "Platform"):
        if not first["StartSandbox"] < first[method] < first["StopSandbox"]:
            problems.append(f"{method} not between StartSandbox and StopSandbox")
    if calls[-1] != "ShutdownSandbox" or calls.count("ShutdownSandbox") != 1:
        problems.append("ShutdownSandbox is not the last call, once")
    if calls.count("CreateSandbox") != 1 or calls.count("StartSandbox") != 1:
        problems.append("CreateSandbox or StartSandbox more than once")
    return problems


def fetch(url: str) -> str:
    """GET ``url``, retried until the server answers (httpd may still be starting in the guest)."""
    end = time.monotonic() + EVENTUALLY
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(1)


@pytest.mark.lab
@pytest.mark.parametrize("handler", [RUNC_HANDLER, KATA_HANDLER])
def test_cri_pod_runs_two_containers_answers_http_and_leaves_nothing(cri_lab: CriLab, handler: str) -> None:
    pod_flow(cri_lab, handler)


def pod_flow(lab: CriLab, handler: str, cgroup_parent: str = "") -> None:
    """The kubelet's calls for one pod with ``handler``, checked at every step and after (test_cri_client
    runs it with runc on the host too, in private mount and network namespaces)."""
    client = lab.client
    version = client.version()
    assert version.runtime_api_version == "v1", version
    # the kubelet waits for RuntimeReady and NetworkReady (CNI found the conflist) before any pod
    assert eventually(lambda: all(ready for ready, _, _ in client.status().values()), 60), (
        f"not ready: {client.status()}{diagnostics(lab)}"
    )
    for image in (BUSYBOX_IMAGE, PAUSE_IMAGE):
        assert client.image_status(image) is not None, f"{image} not seen by CRI{diagnostics(lab)}"
    logs = lab.tmp / f"logs-{handler}"
    logs.mkdir()
    hostname = f"cri-{handler}-pod"
    pod = pod_sandbox_config(
        f"cri-{handler}",
        namespace="lab",
        hostname=hostname,
        log_directory=str(logs),
        cgroup_parent=cgroup_parent,
    )
    shims_before = lab.ctrd.shim_pids(SHIMS[handler])
    netns_before = netns_names()
    host_cmdline = Path("/proc/cmdline").read_text().strip()
    host_boot_id = Path(BOOT_ID).read_text().strip()
    pod_id = ""
    try:
        pod_id = client.run_pod_sandbox(pod, runtime_handler=handler)
        status = client.pod_sandbox_status(pod_id).status
        assert status.state == api_pb2.SANDBOX_READY, f"{status}{diagnostics(lab, pod_id)}"
        pod_ip = status.network.ip
        assert pod_ip.startswith("10.90.0."), f"{status}{diagnostics(lab, pod_id)}"
        pod_netns = netns_names() - netns_before
        assert len(pod_netns) == 1, pod_netns

        web_config = container_config(
            "web", BUSYBOX_IMAGE, ["sh", "-c", WEB.format(page=PAGE)], log_path="web/0.log"
        )
        idle_config = container_config(
            "idle", BUSYBOX_IMAGE, ["sh", "-c", "echo idle-started; exec sleep 3600"], log_path="idle/0.log"
        )
        web = client.create_container(pod_id, web_config, pod)
        idle = client.create_container(pod_id, idle_config, pod)
        client.start_container(web)
        client.start_container(idle)

        named = client.exec_sync(web, ["hostname"])
        assert (named.exit_code, named.stdout.strip()) == (0, hostname), f"{named}{diagnostics(lab, pod_id)}"
        cmdlines = [client.exec_sync(c, ["cat", "/proc/cmdline"]) for c in (web, idle)]
        assert all(r.exit_code == 0 for r in cmdlines), f"{cmdlines}{diagnostics(lab, pod_id)}"
        # boot_id is per running kernel: the same in both containers iff they share one (one VM per pod)
        boots = [client.exec_sync(c, ["cat", BOOT_ID]).stdout.strip() for c in (web, idle)]
        if handler == KATA_HANDLER:
            # it ran in the guest: not the lab VM's kernel command line nor its kernel
            assert cmdlines[0].stdout.strip() != host_cmdline, cmdlines[0]
            assert boots[0] != host_boot_id, (boots, host_boot_id)
        else:
            assert cmdlines[0].stdout.strip() == host_cmdline, cmdlines[0]
            assert boots[0] == host_boot_id, (boots, host_boot_id)
        assert boots[0] == boots[1] and boots[0], boots

        for cid, log_path in ((web, logs / "web" / "0.log"), (idle, logs / "idle" / "0.log")):
            state = client.container_status(cid)
            assert state.state == api_pb2.CONTAINER_RUNNING, f"{state}{diagnostics(lab, pod_id)}"
            assert state.log_path == str(log_path), state
        want = {("stdout", "cri-line-stdout"), ("stderr", "cri-line-stderr")}
        web_log = logs / "web" / "0.log"
        assert eventually(lambda: want <= {(x.stream, x.content) for x in read_cri_log(web_log)}), (
            f"{web_log}: {read_cri_log(web_log)}{diagnostics(lab, pod_id)}"
        )
        idle_log = logs / "idle" / "0.log"
        assert eventually(lambda: any(x.content == "idle-started" for x in read_cri_log(idle_log))), (
            f"{idle_log}: {read_cri_log(idle_log)}{diagnostics(lab, pod_id)}"
        )

        page = fetch(f"http://{pod_ip}:8080/")
        assert PAGE in page, page

        assert eventually(lambda: len(lab.ctrd.shim_pids(SHIMS[handler])) == len(shims_before) + 1, 30), (
            f"{SHIMS[handler]}: {lab.ctrd.shim_pids(SHIMS[handler])} (before the pod: {shims_before})"
            f"{diagnostics(lab, pod_id)}"
        )
        assert {c.id for c in client.list_containers(pod_id)} == {web, idle}
        assert [p.id for p in client.list_pod_sandbox(pod_id)] == [pod_id]

        # the kubelet stops and removes a container (grace period 5 s; sleep as pid 1 ignores SIGTERM)
        client.stop_container(idle, timeout=5)
        assert client.container_status(idle).state == api_pb2.CONTAINER_EXITED
        client.remove_container(idle)
        assert {c.id for c in client.list_containers(pod_id)} == {web}

        client.stop_pod_sandbox(pod_id)
        assert client.pod_sandbox_status(pod_id).status.state == api_pb2.SANDBOX_NOTREADY
        assert client.container_status(web).state == api_pb2.CONTAINER_EXITED
        client.remove_pod_sandbox(pod_id)
        with pytest.raises(CriNotFound):
            client.pod_sandbox_status(pod_id)
        assert client.list_pod_sandbox(pod_id) == []
    except CriError as err:
        # a failed call says only what containerd answered: add its log (the shim's lines are in it)
        detail = diagnostics(lab, pod_id)
        remove_all_pods(client)
        raise AssertionError(f"{err}{detail}") from err
    except BaseException:
        remove_all_pods(client)
        raise

    def left() -> dict[str, object]:
        return leftovers(lab, [pod_id], pod_netns, shims_before, SHIMS[handler])

    assert eventually(lambda: not any(left().values())), f"left behind: {left()}{diagnostics(lab, pod_id)}"
    cri = lab.ctrd.cri
    shim_sandboxer = cri is not None and cri.version == CONTAINERD_2 and cri.kata_sandboxer == SANDBOXER_SHIM
    calls = sandbox_calls(lab.ctrd.log(), pod_id)
    if handler == KATA_HANDLER and shim_sandboxer:
        # containerd 2.x drove the VM through the shim's Sandbox service, in its order
        assert not sandbox_api_order(calls), f"{sandbox_api_order(calls)}: {calls}{diagnostics(lab, pod_id)}"
    else:
        # 1.6, podsandbox, runc: the pause container through the Task service, no Sandbox call
        assert calls == [], calls


SHIM_LOG = """\
time="2026-12-07T07:04:07.81Z" level=info msg="connecting to shim {pod}" protocol=ttrpc version=2
2026-12-07 07:04:07,813 kata-shim[25771] INFO kata_shim.sandbox: Sandbox.CreateSandbox {pod} (bundle /b)
2026-12-07 07:04:09,001 kata-shim[25771] INFO kata_shim.sandbox: Sandbox.StartSandbox {pod}
2026-12-07 07:04:09,101 kata-shim[25771] INFO kata_shim.sandbox: Sandbox.WaitSandbox {pod}
2026-12-07 07:04:09,102 kata-shim[25771] INFO kata_shim.sandbox: Sandbox.SandboxStatus {pod}
2026-12-07 07:04:09,103 kata-shim[99] INFO kata_shim.sandbox: Sandbox.SandboxStatus other-pod
2026-12-07 07:04:09,200 kata-shim[25771] INFO kata_shim.sandbox: Sandbox.SandboxStatus {pod}
2026-12-07 07:04:09,300 kata-shim[25771] INFO kata_shim.sandbox: Sandbox.Platform {pod}
2026-12-07 07:05:00,000 kata-shim[25771] INFO kata_shim.sandbox: Sandbox.StopSandbox {pod} (timeout 0 s)
2026-12-07 07:05:01,000 kata-shim[25771] INFO kata_shim.sandbox: Sandbox.SandboxStatus {pod}
2026-12-07 07:05:02,000 kata-shim[25771] INFO kata_shim.sandbox: Sandbox.ShutdownSandbox {pod}
"""


def test_sandbox_calls_are_read_from_the_shim_log_and_checked_in_containerds_order() -> None:
    """Host-side (not a lab test): the check the containerd 2.x lab run makes, on the shim's log format."""
    pod = "0f7cdfd16dd7b0d89c0cb8e7a92d6d2a7d1f5b1f5080295acc9711d34e8fca50"
    calls = sandbox_calls(SHIM_LOG.format(pod=pod), pod)
    assert calls == [
        "CreateSandbox", "StartSandbox", "WaitSandbox", "SandboxStatus", "SandboxStatus", "Platform",
        "StopSandbox", "SandboxStatus", "ShutdownSandbox",
    ]  # fmt: skip
    assert sandbox_api_order(calls) == []
    assert sandbox_api_order(["StartSandbox", "CreateSandbox", *calls[2:]]) == [
        "starts with ['StartSandbox', 'CreateSandbox'], not CreateSandbox, StartSandbox"
    ]
    assert "no Platform" in sandbox_api_order([c for c in calls if c != "Platform"])
    stopped_early = [*calls[:2], "StopSandbox", *calls[2:6], *calls[7:]]
    assert sandbox_api_order(stopped_early) == [
        f"{m} not between StartSandbox and StopSandbox" for m in ("WaitSandbox", "SandboxStatus", "Platform")
    ]
    assert sandbox_api_order([*calls, "PingSandbox"]) == ["ShutdownSandbox is not the last call, once"]
