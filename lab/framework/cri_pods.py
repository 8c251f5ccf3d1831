"""Pods through containerd's CRI plugin in the lab: the set-up test_cri_lab and lab/bench/cri_bench share.

    with open_cri_lab(tmp) as lab:                  # private containerd 1.6, CRI on, CNI bridge kata-cri0
        netns, shims = netns_names(), lab.ctrd.shim_pids(SHIM_BINARY)
        pod_id = lab.client.run_pod_sandbox(pod_sandbox_config("web"), runtime_handler=KATA_HANDLER)
        netns = netns_names() - netns
        ...
        lab.client.stop_pod_sandbox(pod_id); lab.client.remove_pod_sandbox(pod_id)
        assert eventually(lambda: not any(leftovers(lab, [pod_id], netns, shims, SHIM_BINARY).values()))

`open_cri_lab` writes the CNI conflist (Debian's bridge + host-local plugins: bridge `BRIDGE`, `SUBNET`),
builds the lab's busybox and the pause image, starts a private containerd with the CRI plugin
(framework.cri.CriConfig: `runc` and `kata` handlers, plus any ``extra_kata_handlers``), imports both images
into the CRI namespace and hands out a `CriLab` with a CriClient on it. Afterwards every pod left is stopped
and removed (`remove_all_pods`, as the kubelet's garbage collector would), and whatever a killed containerd
could not tear down (its pods' network namespaces, the bridge) is deleted. Lab VM only: the guest assets are
installed where the shim's shipped configuration looks.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from framework.containerd import (
    CONTAINERD_1_6,
    KATA_STATE_ROOT,
    SHIM_BINARY,
    PrivateContainerd,
    install_guest_assets,
    mounts_below,
    private_containerd,
)
from framework.cri import (
    CRI_NAMESPACE,
    KATA_HANDLER,
    RUNC_HANDLER,
    SANDBOXER_SHIM,
    CriClient,
    CriConfig,
    CriError,
    bridge_conflist,
    build_pause_image,
    netns_names,
)

BRIDGE = "kata-cri0"
SUBNET = "10.90.0.0/24"
# the shim binary that serves each handler's pods
SHIMS = {KATA_HANDLER: SHIM_BINARY, RUNC_HANDLER: "containerd-shim-runc-v2"}
# eventually-waits (a VM boot, an httpd starting in a guest under nested TCG): generous, never a timed assert
EVENTUALLY = 240


def sh(*argv: str, check: bool = False) -> str:
    """``argv``'s stdout (its failure ignored unless ``check``)."""
    return subprocess.run(list(argv), check=check, capture_output=True, text=True).stdout


def eventually(what: Callable[[], bool], timeout: float = EVENTUALLY) -> bool:
    """Poll ``what`` each second until it is true (True) or ``timeout`` seconds passed (False)."""
    end = time.monotonic() + timeout
    while not what():
        if time.monotonic() > end:
            return False
        time.sleep(1)
    return True


@dataclass
class CriLab:
    """A CRI-enabled private containerd, a client on it, and where the caller writes."""

    ctrd: PrivateContainerd
    client: CriClient
    tmp: Path


def bridge_ports() -> list[str]:
    """The links enslaved to the pods' CNI bridge (a pod's veth while it has a network)."""
    out = sh("ip", "-j", "link", "show", "master", BRIDGE).strip()
    return [link["ifname"] for link in json.loads(out)] if out else []


def remove_all_pods(client: CriClient) -> None:
    """Best effort, after a failure: stop and remove every pod (as the kubelet's garbage collector would)."""
    try:
        pods = client.list_pod_sandbox()
    except CriError:
        return
    for pod in pods:
        for call in (client.stop_pod_sandbox, client.remove_pod_sandbox):
            with contextlib.suppress(CriError):
                call(pod.id)


def leftovers(
    lab: CriLab, pod_ids: Iterable[str], netns: set[str], shims_before: list[int], shim: str
) -> dict[str, object]:
    """What removed pods (``pod_ids``, their network namespaces ``netns``) must not leave behind: a ``shim``
    process not in ``shims_before``, a mount below the private containerd or naming a pod, a netns, a port
    on the bridge, a tap, /run/kata state. Every value is empty (falsy) when nothing is left."""
    ids = list(pod_ids)
    mounts = Path("/proc/self/mounts").read_text()
    return {
        "shims": [p for p in lab.ctrd.shim_pids(shim) if p not in shims_before],
        "mounts below containerd": mounts_below(lab.ctrd.base),
        "mounts naming a pod": [line for line in mounts.splitlines() if any(i in line for i in ids)],
        "netns": sorted(netns & netns_names()),
        "bridge ports": bridge_ports(),
        "taps": [line for line in sh("ip", "-o", "link", "show").splitlines() if "_kata" in line],
        "kata state": [i for i in ids if (KATA_STATE_ROOT / i).exists()],
    }


def diagnostics(lab: CriLab, pod_id: str = "") -> str:
    """containerd's log tail and the log lines naming the pod (the shim's lines come through containerd)."""
    # containerd's debug lines can be whole OCI specs: each cut to 400 characters
    log = [line[:400] for line in lab.ctrd.log().splitlines()]
    mine = [line for line in log if pod_id and pod_id[:12] in line][-40:]
    tail = "\n".join(log[-80:])
    return (
        f"\n--- log lines of pod {pod_id[:12]} ---\n"
        + "\n".join(mine)
        + f"\n--- containerd log tail ---\n{tail}"
    )


@contextlib.contextmanager
def open_cri_lab(
    tmp: Path,
    *,
    version: str = CONTAINERD_1_6,
    sandboxer: str = SANDBOXER_SHIM,
    extra_kata_handlers: Mapping[str, Path] | None = None,
    debug: bool = True,
) -> Iterator[CriLab]:
    """A private containerd of ``version`` with its CRI plugin on (2.x: the kata handlers' ``sandboxer``),
    CNI's bridge, the busybox and pause images imported, a CriClient; files under ``tmp``. Every pod is
    removed afterwards, and the netns and bridge a killed containerd left."""
    from images import busybox_oci  # lab/images, on the path beside framework

    install_guest_assets()
    net_d = tmp / "net.d"
    net_d.mkdir()
    conflist = bridge_conflist("kata-cri", BRIDGE, SUBNET, tmp / "ipam")
    (net_d / "10-kata-cri.conflist").write_text(json.dumps(conflist, indent=2))
    busybox = busybox_oci.build(tmp / "busybox.tar")
    pause = build_pause_image(tmp / "pause.tar")
    netns_before = netns_names()
    try:
        config = CriConfig(
            cni_conf_dir=net_d,
            version=version,
            kata_sandboxer=sandboxer,
            extra_kata_handlers=dict(extra_kata_handlers or {}),
        )
        with private_containerd(cri=config, debug=debug) as ctrd:
            ctrd.import_image(busybox, namespace=CRI_NAMESPACE)
            ctrd.import_image(pause, namespace=CRI_NAMESPACE)
            with CriClient(ctrd.address) as client:
                try:
                    yield CriLab(ctrd, client, tmp)
                finally:
                    remove_all_pods(client)
    finally:
        # what a killed containerd could not tear down: its pods' netns and the bridge CNI made
        for name in netns_names() - netns_before:
            sh("ip", "netns", "delete", name)
        sh("ip", "link", "delete", BRIDGE)


def shim_id(argv: str) -> str:
    """The ``-id`` a shim process was started with (``argv`` joined by spaces, as /proc gives it), "" when
    none: a CRI pod's shim carries its pod sandbox id (containerd 1.6 names the pause container after the
    pod, and both runc's and our shim serve a pod's later containers from the shim of its first)."""
    words = argv.split()
    for i, word in enumerate(words[:-1]):
        if word == "-id":
            return words[i + 1]
    return ""


__all__ = [
    "BRIDGE",
    "EVENTUALLY",
    "SHIMS",
    "SUBNET",
    "CriLab",
    "bridge_ports",
    "diagnostics",
    "eventually",
    "leftovers",
    "open_cri_lab",
    "remove_all_pods",
    "sh",
    "shim_id",
]
