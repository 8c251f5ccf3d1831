"""A CRI client for the lab (no kubelet, no crictl): containerd's CRI plugin driven as the kubelet drives it.

    cri = CriConfig(cni_conf_dir=net_d)             # `kata` and `runc` handlers, CNI, the pause image
    with private_containerd(cri=cri) as ctrd:       # framework.containerd
        ctrd.import_image(build_pause_image(tmp / "pause.tar"), namespace=CRI_NAMESPACE)
        with CriClient(ctrd.address) as client:
            client.version()
            pod = pod_sandbox_config("web", log_directory=str(logs))
            pod_id = client.run_pod_sandbox(pod, runtime_handler=KATA_HANDLER)
            cid = client.create_container(pod_id, container_config("c", BUSYBOX_IMAGE, ["sleep", "60"]), pod)
            client.start_container(cid)
            client.exec_sync(cid, ["hostname"]).stdout
            client.stop_pod_sandbox(pod_id); client.remove_pod_sandbox(pod_id)

Messages are k8s.io/cri-api v0.25.16's `runtime.v1` (lab/protos/gencri.py generates them into
framework._gen.cri, in a private descriptor pool), which containerd 1.6 serves beside v1alpha2. Every call
has a timeout (`CriClient.timeouts`, per method; the kubelet's runtime-request-timeout is 2 minutes, VM boots
under the lab's nested TCG need more) and a failure raises a `CriError` subclass named for its gRPC status.

`CriConfig.render` writes the CRI plugin's tables for containerd 1.6 (config version 2) or 2.x (version 3,
`CriConfig(version=CONTAINERD_2)`): a `runc` default handler, a `kata` handler (`io.containerd.kata.v2`,
`pod_annotations` io.katacontainers.*, an optional ConfigPath), Debian's CNI plugins (/usr/lib/cni) with a
conf dir, a sandbox image that is imported, never pulled (the lab has no registry), and a random streaming
port. The CRI plugin's own root and state are under containerd's private root and state. On 2.x the `kata`
handler's sandboxer is `shim` by default (containerd drives the pod's VM through the shim's Sandbox service,
containerd.runtime.sandbox.v1) or `podsandbox` (the 1.6 way: a pause container through the Task service);
`runc` keeps `podsandbox`. containerd 2.x splits 1.6's one `io.containerd.grpc.v1.cri` plugin in three:
`io.containerd.cri.v1.images` (snapshotter, the sandbox image as `pinned_images.sandbox`),
`io.containerd.cri.v1.runtime` (runtimes, CNI, OOM score and SELinux settings) and `io.containerd.grpc.v1.cri`
(the CRI server itself: the streaming server); `containerd config default` of the pinned 2.x names them.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from framework._gen.cri import api_pb2, api_pb2_grpc
from framework.containerd import CONFIG_VERSION, CONTAINERD_1_6, CONTAINERD_2, check_version

CRI_NAMESPACE = "k8s.io"
KATA_HANDLER = "kata"
RUNC_HANDLER = "runc"
KATA_RUNTIME_TYPE = "io.containerd.kata.v2"
# containerd 2.x's sandboxers (a runtime's `sandboxer`): the shim's Sandbox service, or a pause container
SANDBOXER_SHIM = "shim"
SANDBOXER_PODSANDBOX = "podsandbox"
SANDBOXERS = (SANDBOXER_SHIM, SANDBOXER_PODSANDBOX)
RUNC_RUNTIME_TYPE = "io.containerd.runc.v2"
# a name no registry serves: the image is built from busybox and imported before the first pod
PAUSE_IMAGE = "registry.k8s.io/pause:kata-lab"
CNI_BIN_DIR = Path(os.environ.get("KATA_TEST_CNI_PATH", "/usr/lib/cni"))
# where containerd's CRI plugin makes each pod's network namespace (cni-<uuid>; 2.x: unless
# netns_mounts_under_state_dir)
NETNS_DIR = Path("/var/run/netns")
# what the kubelet sends as VersionRequest.version
KUBELET_API_VERSION = "0.1.0"
# containerd's default receive limit is 16 MiB; the kubelet raises its own to match
MAX_MESSAGE = 16 << 20

# per-method gRPC deadlines (seconds): the kubelet uses 2 minutes for every call; a kata pod boots a VM
# (tens of seconds under the lab's nested TCG), so the calls that may wait on a guest get more
DEFAULT_TIMEOUT = 120.0
DEFAULT_TIMEOUTS: Mapping[str, float] = {
    "RunPodSandbox": 600.0,
    "CreateContainer": 600.0,
    "StartContainer": 600.0,
    "StopContainer": 300.0,
    "StopPodSandbox": 300.0,
    "RemovePodSandbox": 300.0,
}
# ExecSync's deadline is its command timeout plus this (the exec's own start and teardown)
EXEC_MARGIN = 120.0


class CriError(Exception):
    """A CRI call failed: ``method`` (e.g. "RunPodSandbox"), gRPC ``code`` and containerd's ``details``."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class CriNotFound(CriError):
    """The pod, container or image the call names does not exist."""


class CriAlreadyExists(CriError):
    """A pod or container of that name (metadata name, namespace, attempt) exists already."""


class CriInvalidArgument(CriError):
    """containerd rejected the request's fields."""


class CriDeadlineExceeded(CriError):
    """The call's timeout passed before containerd answered."""


class CriUnavailable(CriError):
    """containerd's socket did not answer (not started, gone, or the CRI plugin is disabled)."""


class CriUnimplemented(CriError):
    """containerd does not serve this method (or not runtime.v1 at all)."""


_ERRORS: dict[grpc.StatusCode, type[CriError]] = {
    grpc.StatusCode.NOT_FOUND: CriNotFound,
    grpc.StatusCode.ALREADY_EXISTS: CriAlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: CriInvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: CriDeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: CriUnavailable,
    grpc.StatusCode.UNIMPLEMENTED: CriUnimplemented,
}


def cri_error(method: str, err: grpc.RpcError) -> CriError:
    """The typed error for a failed call (``err`` is the grpc.Call the stub raised)."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else str(err)) or ""
    return _ERRORS.get(code, CriError)(method, code, details)


@dataclass(frozen=True)
class ExecResult:
    """What ExecSync returned: the command's exit code and its output (decoded, errors replaced)."""

    exit_code: int
    stdout: str
    stderr: str


class CriClient:
    """The kubelet's side of CRI over containerd's gRPC socket (``address``: its path)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        timeouts: Mapping[str, float] | None = None,
    ) -> None:
        self.address = address
        self.timeouts: dict[str, float] = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        self.default_timeout = timeout
        self._channel = grpc.insecure_channel(
            f"unix://{address}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self._runtime = api_pb2_grpc.RuntimeServiceStub(self._channel)
        self._images = api_pb2_grpc.ImageServiceStub(self._channel)

    def close(self) -> None:
        """Close the gRPC channel (calls after it fail)."""
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def timeout_of(self, method: str) -> float:
        """The deadline ``method`` is called with."""
        return self.timeouts.get(method, self.default_timeout)

    def _call(self, stub: Any, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(stub, method)(request, timeout=timeout or self.timeout_of(method))
        except grpc.RpcError as err:
            raise cri_error(method, err) from None

    # -- the runtime service, in the order the kubelet calls it for a pod ------------------------------

    def version(self) -> api_pb2.VersionResponse:
        """Version: the runtime's name and version, and the CRI version it speaks (v1)."""
        request = api_pb2.VersionRequest(version=KUBELET_API_VERSION)
        return self._call(self._runtime, "Version", request)

    def status(self) -> dict[str, tuple[bool, str, str]]:
        """Status: each runtime condition (RuntimeReady, NetworkReady) -> (status, reason, message). The
        kubelet waits for both before it runs a pod; NetworkReady is false until CNI has a configuration."""
        conditions = self._call(self._runtime, "Status", api_pb2.StatusRequest()).status.conditions
        return {c.type: (bool(c.status), c.reason, c.message) for c in conditions}

    def run_pod_sandbox(self, config: api_pb2.PodSandboxConfig, runtime_handler: str = "") -> str:
        """RunPodSandbox with the RuntimeClass's handler; the pod sandbox id."""
        request = api_pb2.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return str(self._call(self._runtime, "RunPodSandbox", request).pod_sandbox_id)

    def pod_sandbox_status(self, pod_id: str, verbose: bool = False) -> api_pb2.PodSandboxStatusResponse:
        """PodSandboxStatus (``verbose``: containerd's info map too, e.g. the sandbox's runtime spec)."""
        request = api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self._call(self._runtime, "PodSandboxStatus", request)

    def create_container(
        self, pod_id: str, config: api_pb2.ContainerConfig, sandbox_config: api_pb2.PodSandboxConfig
    ) -> str:
        """CreateContainer in the pod (the kubelet sends the pod's config again); the container id."""
        request = api_pb2.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config
        )
        return str(self._call(self._runtime, "CreateContainer", request).container_id)

    def start_container(self, container_id: str) -> None:
        """StartContainer: the created container's process runs."""
        self._call(self._runtime, "StartContainer", api_pb2.StartContainerRequest(container_id=container_id))

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 60) -> ExecResult:
        """ExecSync ``cmd`` with a command timeout of ``timeout`` seconds (0: none, then the default
        deadline); its exit code and output."""
        request = api_pb2.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        deadline = timeout + EXEC_MARGIN if timeout > 0 else None
        response = self._call(self._runtime, "ExecSync", request, timeout=deadline)
        return ExecResult(
            int(response.exit_code),
            bytes(response.stdout).decode(errors="replace"),
            bytes(response.stderr).decode(errors="replace"),
        )

    def container_status(self, container_id: str, verbose: bool = False) -> api_pb2.ContainerStatus:
        """ContainerStatus: state (CREATED, RUNNING, EXITED), exit code, log path, mounts."""
        request = api_pb2.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self._call(self._runtime, "ContainerStatus", request).status

    def stop_container(self, container_id: str, timeout: int = 30) -> None:
        """StopContainer: SIGTERM (or the image's stop signal), SIGKILL after ``timeout`` seconds; the call's
        deadline is the grace period on top of StopContainer's own, as the kubelet's."""
        request = api_pb2.StopContainerRequest(container_id=container_id, timeout=timeout)
        deadline = self.timeout_of("StopContainer") + timeout
        self._call(self._runtime, "StopContainer", request, timeout=deadline)

    def remove_container(self, container_id: str) -> None:
        """RemoveContainer: the container (stopped, or forcibly a running one) is gone; its log file stays."""
        request = api_pb2.RemoveContainerRequest(container_id=container_id)
        self._call(self._runtime, "RemoveContainer", request)

    def stop_pod_sandbox(self, pod_id: str) -> None:
        """StopPodSandbox: every container of the pod and the sandbox stopped, its network torn down."""
        self._call(self._runtime, "StopPodSandbox", api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))

    def remove_pod_sandbox(self, pod_id: str) -> None:
        """RemovePodSandbox: the pod's containers and sandbox removed (idempotent)."""
        request = api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
        self._call(self._runtime, "RemovePodSandbox", request)

    def list_pod_sandbox(self, pod_id: str = "", labels: Mapping[str, str] | None = None) -> list[Any]:
        """ListPodSandbox (filtered by id and labels when given); the PodSandbox messages."""
        request = api_pb2.ListPodSandboxRequest()
        if pod_id or labels:
            request.filter.id = pod_id
            request.filter.label_selector.update(labels or {})
        return list(self._call(self._runtime, "ListPodSandbox", request).items)

    def list_containers(self, pod_id: str = "", labels: Mapping[str, str] | None = None) -> list[Any]:
        """ListContainers (filtered by pod and labels when given); the Container messages."""
        request = api_pb2.ListContainersRequest()
        if pod_id or labels:
            request.filter.pod_sandbox_id = pod_id
            request.filter.label_selector.update(labels or {})
        return list(self._call(self._runtime, "ListContainers", request).containers)

    # -- the image service -------------------------------------------------------------------------

    def image_status(self, image: str) -> api_pb2.Image | None:
        """ImageStatus: the image containerd's CRI plugin knows by ``image``, or None."""
        request = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image))
        response = self._call(self._images, "ImageStatus", request)
        return response.image if response.HasField("image") else None


# -- requests as the kubelet builds them ----------------------------------------------------------------


def pod_sandbox_config(
    name: str,
    *,
    namespace: str = "default",
    uid: str | None = None,
    attempt: int = 0,
    hostname: str | None = None,
    log_directory: str = "",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    cgroup_parent: str = "",
    host_network: bool = False,
) -> api_pb2.PodSandboxConfig:
    """A PodSandboxConfig like the kubelet's: network and IPC per pod, PID per container (Kubernetes'
    default, shareProcessNamespace false), the hostname the pod name. ``host_network`` (a hostNetwork pod:
    no CNI, the node's network and UTS namespaces) sends no hostname, as runc cannot set the node's."""
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(
            name=name, namespace=namespace, uid=uid or str(uuid.uuid4()), attempt=attempt
        ),
        hostname="" if host_network else (hostname if hostname is not None else name),
        log_directory=log_directory,
        labels=dict(labels or {}),
        annotations=dict(annotations or {}),
    )
    config.linux.cgroup_parent = cgroup_parent
    options = config.linux.security_context.namespace_options
    options.network = api_pb2.NODE if host_network else api_pb2.POD
    options.ipc = api_pb2.POD
    options.pid = api_pb2.CONTAINER
    return config


def container_config(
    name: str,
    image: str,
    command: Sequence[str],
    args: Sequence[str] = (),
    *,
    attempt: int = 0,
    log_path: str = "",
    envs: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> api_pb2.ContainerConfig:
    """A ContainerConfig like the kubelet's (``log_path`` relative to the pod's log directory, as the
    kubelet's `<name>/<attempt>.log`)."""
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name, attempt=attempt),
        image=api_pb2.ImageSpec(image=image),
        command=list(command),
        args=list(args),
        log_path=log_path,
        envs=[api_pb2.KeyValue(key=k, value=v) for k, v in (envs or {}).items()],
        labels=dict(labels or {}),
        annotations=dict(annotations or {}),
    )
    options = config.linux.security_context.namespace_options
    options.network = api_pb2.POD
    options.ipc = api_pb2.POD
    options.pid = api_pb2.CONTAINER
    return config


@dataclass(frozen=True)
class LogLine:
    """One line of a CRI container log: ``<RFC3339Nano time> <stdout|stderr> <F|P> <content>``."""

    time: str
    stream: str
    partial: bool
    content: str


def read_cri_log(path: Path) -> list[LogLine]:
    """The lines containerd's CRI plugin wrote to a container's log file ([] when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    lines = []
    for raw in text.splitlines():
        parts = raw.split(" ", 3)
        if len(parts) == 4:
            lines.append(LogLine(parts[0], parts[1], parts[2] == "P", parts[3]))
    return lines


# -- containerd's CRI plugin configuration ----------------------------------------------------------------


def _toml(value: object) -> str:
    """A TOML value: JSON's strings, booleans, numbers and arrays of them are valid TOML."""
    return json.dumps(value)


@dataclass(frozen=True)
class CriConfig:
    """The CRI plugin's settings for a private containerd of ``version`` (`render` writes them as TOML)."""

    # CNI network configurations (*.conflist); None: `<base>/cni/net.d`, created empty
    cni_conf_dir: Path | None = None
    cni_bin_dir: Path = CNI_BIN_DIR
    sandbox_image: str = PAUSE_IMAGE
    # the kata handler's options.ConfigPath (else the shim's own lookup: KATA_CONF_FILE, /etc, /usr/share)
    kata_config_path: Path | None = None
    # more handlers of our runtime, each with its ConfigPath: a RuntimeClass per configuration (e.g. the
    # VM template on), written like the `kata` one
    extra_kata_handlers: Mapping[str, Path] = field(default_factory=dict)
    kata_pod_annotations: tuple[str, ...] = ("io.katacontainers.*",)
    snapshotter: str = "overlayfs"
    # clamp the sandbox's oom_score_adj (-998) to containerd's own: for a containerd without CAP_SYS_RESOURCE
    # (in an unprivileged container, as on some development hosts), where runc cannot lower it
    restrict_oom_score_adj: bool = False
    extra_runtimes: Mapping[str, str] = field(default_factory=dict)
    # the containerd these tables are for (framework.containerd's CONTAINERD_1_6 or CONTAINERD_2)
    version: str = CONTAINERD_1_6
    # containerd 2.x only: the `kata` handler's sandboxer (`SANDBOXERS`); `runc` always has podsandbox
    kata_sandboxer: str = SANDBOXER_SHIM

    def __post_init__(self) -> None:
        check_version(self.version)
        if self.kata_sandboxer not in SANDBOXERS:
            raise ValueError(f"sandboxer {self.kata_sandboxer!r}: one of {SANDBOXERS}")
        taken = {RUNC_HANDLER, KATA_HANDLER, *self.extra_runtimes}
        for handler in self.extra_kata_handlers:
            if handler in taken:
                raise ValueError(f"handler {handler!r} is defined twice")

    @property
    def config_version(self) -> int:
        """The containerd configuration version the tables belong in (2 for 1.6, 3 for 2.x)."""
        return CONFIG_VERSION[self.version]

    def conf_dir(self, base: Path) -> Path:
        """The CNI conf dir for the private containerd in ``base``."""
        return self.cni_conf_dir if self.cni_conf_dir is not None else base / "cni" / "net.d"

    def render(self, base: Path) -> str:
        """The CRI plugin's tables for the private containerd in ``base``, for `version` (config version 2
        or 3); creates the CNI conf dir when it is the default one."""
        conf_dir = self.conf_dir(base)
        conf_dir.mkdir(parents=True, exist_ok=True)
        if self.version == CONTAINERD_2:
            return self._render_v3(conf_dir)
        return self._render_v2(conf_dir)

    def _runtimes(self, runtimes: str, sandboxers: bool) -> list[str]:
        """The runtime handler tables below ``runtimes``; ``sandboxers``: each names its sandboxer (2.x)."""
        lines = [
            "",
            f"[{runtimes}.{RUNC_HANDLER}]",
            f"  runtime_type = {_toml(RUNC_RUNTIME_TYPE)}",
        ]
        if sandboxers:
            lines.append(f"  sandboxer = {_toml(SANDBOXER_PODSANDBOX)}")
        kata: dict[str, Path | None] = {KATA_HANDLER: self.kata_config_path, **self.extra_kata_handlers}
        for handler, config_path in kata.items():
            lines += [
                "",
                f"[{runtimes}.{handler}]",
                f"  runtime_type = {_toml(KATA_RUNTIME_TYPE)}",
                f"  pod_annotations = {_toml(list(self.kata_pod_annotations))}",
                # host devices of a privileged pod are the host's, not the VM's (upstream's recommendation)
                "  privileged_without_host_devices = true",
            ]
            if sandboxers:
                lines.append(f"  sandboxer = {_toml(self.kata_sandboxer)}")
            if config_path is not None:
                lines += [
                    "",
                    f"[{runtimes}.{handler}.options]",
                    f"  ConfigPath = {_toml(str(config_path))}",
                ]
        for handler, runtime_type in self.extra_runtimes.items():
            lines += ["", f"[{runtimes}.{handler}]", f"  runtime_type = {_toml(runtime_type)}"]
            if sandboxers:
                lines.append(f"  sandboxer = {_toml(SANDBOXER_PODSANDBOX)}")
        return lines

    def _render_v3(self, conf_dir: Path) -> str:
        images = 'plugins."io.containerd.cri.v1.images"'
        runtime = 'plugins."io.containerd.cri.v1.runtime"'
        server = 'plugins."io.containerd.grpc.v1.cri"'
        lines = [
            "",
            f"[{images}]",
            f"  snapshotter = {_toml(self.snapshotter)}",
            "",
            f"[{images}.pinned_images]",
            f"  sandbox = {_toml(self.sandbox_image)}",
            "",
            f"[{runtime}]",
            "  enable_selinux = false",
            f"  restrict_oom_score_adj = {_toml(self.restrict_oom_score_adj)}",
            "",
            f"[{runtime}.containerd]",
            f"  default_runtime_name = {_toml(RUNC_HANDLER)}",
            *self._runtimes(f"{runtime}.containerd.runtimes", sandboxers=True),
            "",
            f"[{runtime}.cni]",
            # bin_dirs: 2.x's list (its bin_dir is deprecated)
            f"  bin_dirs = {_toml([str(self.cni_bin_dir)])}",
            f"  conf_dir = {_toml(str(conf_dir))}",
            "  max_conf_num = 1",
            "",
            f"[{server}]",
            # a random port: two CRI containerds (or a kubelet's) must not fight over 10010
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "",
        ]
        return "\n".join(lines)

    def _render_v2(self, conf_dir: Path) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        runtimes = f"{cri}.containerd.runtimes"
        lines = [
            "",
            f"[{cri}]",
            f"  sandbox_image = {_toml(self.sandbox_image)}",
            # a random port: two CRI containerds (or a kubelet's) must not fight over 10010
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  enable_selinux = false",
            f"  restrict_oom_score_adj = {_toml(self.restrict_oom_score_adj)}",
            "",
            f"[{cri}.containerd]",
            f"  snapshotter = {_toml(self.snapshotter)}",
            f"  default_runtime_name = {_toml(RUNC_HANDLER)}",
            *self._runtimes(runtimes, sandboxers=False),
        ]
        lines += [
            "",
            f"[{cri}.cni]",
            f"  bin_dir = {_toml(str(self.cni_bin_dir))}",
            f"  conf_dir = {_toml(str(conf_dir))}",
            "  max_conf_num = 1",
            "",
        ]
        return "\n".join(lines)


def bridge_conflist(
    name: str, bridge: str, subnet: str, ipam_dir: Path, cni_version: str = "1.0.0"
) -> dict[str, Any]:
    """A CNI network configuration list, one bridge plugin with host-local IPAM (lo is containerd's own: its
    go-cni runs the loopback plugin itself): what a cluster's CNI installer would drop into the conf dir."""
    return {
        "cniVersion": cni_version,
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }


def build_pause_image(out: Path, name: str = PAUSE_IMAGE) -> Path:
    """The sandbox ("pause") image: busybox whose entrypoint sleeps for good (a pause container only holds
    the pod's namespaces; StopPodSandbox kills it with SIGKILL). Written to ``out`` as an OCI tarball."""
    from images import busybox_oci  # lab/images, on the path beside framework

    return busybox_oci.build(out, name, entrypoint=["/bin/sleep"], cmd=["2147483647"])


def netns_names() -> set[str]:
    """The named network namespaces (containerd's CRI plugin makes `cni-<uuid>` ones per pod)."""
    try:
        return {entry.name for entry in NETNS_DIR.iterdir()}
    except FileNotFoundError:
        return set()


__all__ = [
    "CNI_BIN_DIR",
    "CRI_NAMESPACE",
    "KATA_HANDLER",
    "KATA_RUNTIME_TYPE",
    "PAUSE_IMAGE",
    "RUNC_HANDLER",
    "SANDBOXERS",
    "SANDBOXER_PODSANDBOX",
    "SANDBOXER_SHIM",
    "CriAlreadyExists",
    "CriClient",
    "CriConfig",
    "CriDeadlineExceeded",
    "CriError",
    "CriInvalidArgument",
    "CriNotFound",
    "CriUnavailable",
    "CriUnimplemented",
    "ExecResult",
    "LogLine",
    "bridge_conflist",
    "build_pause_image",
    "container_config",
    "cri_error",
    "netns_names",
    "pod_sandbox_config",
    "read_cri_log",
]
