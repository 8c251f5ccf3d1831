"""A pod's network as a CRI makes it: a named netns, then CNI plugins ADD in it, DEL before the netns goes.

    net = CniNetwork("kata-lab", bridge="kata-cni0", subnet="10.89.0.0/24", data_dir=tmp)
    with net.pod("pod-a") as pod:                    # ip netns add + loopback ADD + bridge ADD
        ctr("run", "--with-ns", f"network:{pod.netns_path}", ...)
        pod.ip, pod.gateway, pod.mac                 # from the bridge plugin's result (CNI spec 1.0 "ips")
    net.remove()                                     # the bridge the plugin made (ip link delete)

Debian's containernetworking-plugins (/usr/lib/cni) are executed as the CNI spec says (CNI_COMMAND,
CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH in the environment, the network configuration on stdin,
the result or an error as JSON on stdout): `loopback` brings lo up, `bridge` with `host-local` IPAM makes a
veth pair, eth0 in the pod's netns with an address and a default route through the bridge's address (the
bridge is the gateway, `isGateway`), the peer enslaved to the bridge on this side. DEL gets the ADD's result
as `prevResult`, like containerd's go-cni does.

Lab VM only: it changes the machine's network (on the host it would leave a bridge behind a failed run).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework.assets import in_labvm

CNI_PATH = Path(os.environ.get("KATA_TEST_CNI_PATH", "/usr/lib/cni"))
CNI_VERSION = "1.0.0"
NETNS_DIR = Path("/var/run/netns")


class CniError(Exception):
    """A CNI plugin failed (the message has the plugin's error code, message and stderr) or is missing."""


@dataclass(frozen=True)
class CniPod:
    """One pod's attachment: its netns and what the bridge plugin gave eth0."""

    netns: str
    container_id: str
    ip: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    mac: str
    result: dict[str, Any] = field(repr=False)

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class CniNetwork:
    """A bridge network (bridge + host-local IPAM, plus loopback) whose pods are netns named by the caller."""

    name: str
    bridge: str
    subnet: str
    data_dir: Path
    plugin_dir: Path = CNI_PATH

    def __post_init__(self) -> None:
        if not in_labvm():
            raise CniError(
                "refusing to run CNI plugins outside the lab VM (they change the machine's network)"
            )
        for plugin in ("bridge", "host-local", "loopback"):
            if not os.access(self.plugin_dir / plugin, os.X_OK):
                raise CniError(
                    f"{self.plugin_dir / plugin} missing: ./dev installs Debian's containernetworking-plugins"
                )

    def bridge_config(self) -> dict[str, Any]:
        """The bridge plugin's network configuration (what a conflist's one plugin entry expands to)."""
        return {
            "cniVersion": CNI_VERSION,
            "name": self.name,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(self.data_dir / "ipam"),
            },
        }

    def loopback_config(self) -> dict[str, Any]:
        return {"cniVersion": CNI_VERSION, "name": "cni-loopback", "type": "loopback"}

    def exec_plugin(
        self, command: str, config: dict[str, Any], container_id: str, netns: Path, ifname: str
    ) -> dict[str, Any]:
        """Run the plugin ``config["type"]`` once as the CNI spec says; its parsed result ({} for DEL)."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": str(netns),
            "CNI_IFNAME": ifname,
            "CNI_PATH": str(self.plugin_dir),
        }
        done = subprocess.run(
            [str(self.plugin_dir / config["type"])],
            input=json.dumps(config),
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        out = done.stdout.strip()
        if done.returncode != 0:
            raise CniError(
                f"{config['type']} {command} exited {done.returncode}: {out} {done.stderr.strip()}"
            )
        return json.loads(out) if out else {}

    def add(self, netns: str, container_id: str | None = None) -> CniPod:
        """`ip netns add`, then loopback and bridge ADD in it; the pod's address from the result."""
        container_id = container_id or netns
        path = NETNS_DIR / netns
        _ip("netns", "add", netns)
        try:
            self.exec_plugin("ADD", self.loopback_config(), container_id, path, "lo")
            result = self.exec_plugin("ADD", self.bridge_config(), container_id, path, "eth0")
        except BaseException:
            with contextlib.suppress(CniError):
                self.exec_plugin("DEL", self.bridge_config(), container_id, path, "eth0")
            _ip("netns", "delete", netns, check=False)
            raise
        return _pod_from_result(netns, container_id, result)

    def delete(self, pod: CniPod) -> None:
        """bridge and loopback DEL (bridge with the ADD's result as prevResult), then `ip netns delete`."""
        errors: list[str] = []
        bridge = {**self.bridge_config(), "prevResult": pod.result}
        for config, ifname in ((bridge, "eth0"), (self.loopback_config(), "lo")):
            try:
                self.exec_plugin("DEL", config, pod.container_id, pod.netns_path, ifname)
            except CniError as err:
                errors.append(str(err))
        done = _ip("netns", "delete", pod.netns, check=False)
        if done.returncode != 0:
            errors.append(f"ip netns delete {pod.netns}: {done.stderr.strip()}")
        if errors:
            raise CniError("; ".join(errors))

    @contextlib.contextmanager
    def pod(self, netns: str, container_id: str | None = None) -> Iterator[CniPod]:
        """A pod's network for the ``with`` block; DEL and netns delete after it, whatever happened."""
        attached = self.add(netns, container_id)
        try:
            yield attached
        finally:
            self.delete(attached)

    def bridge_ports(self) -> list[str]:
        """Names of the links enslaved to the bridge (the pods' host-side veths)."""
        done = _ip("-j", "link", "show", "master", self.bridge, check=False)
        if done.returncode != 0 or not done.stdout.strip():
            return []
        return [link["ifname"] for link in json.loads(done.stdout)]

    def remove(self) -> None:
        """Delete the bridge (CNI DEL leaves it, as it should for other pods) and the IPAM state."""
        _ip("link", "delete", self.bridge, check=False)
        subprocess.run(["rm", "-rf", str(self.data_dir / "ipam")], check=False)


def _pod_from_result(netns: str, container_id: str, result: dict[str, Any]) -> CniPod:
    """The eth0 address, gateway and MAC of a CNI 1.0 result (``ips[].interface`` indexes ``interfaces``)."""
    interfaces = result.get("interfaces", [])
    for entry in result.get("ips", []):
        address = ipaddress.ip_interface(entry["address"])
        if not isinstance(address, ipaddress.IPv4Interface):
            continue
        iface = interfaces[entry["interface"]] if "interface" in entry else {}
        if iface.get("sandbox") and iface.get("name") != "eth0":
            continue
        gateway = ipaddress.IPv4Address(entry["gateway"])
        return CniPod(netns, container_id, address, gateway, iface.get("mac", ""), result)
    raise CniError(f"no IPv4 address for eth0 in the CNI result: {json.dumps(result)}")


__all__ = ["CNI_PATH", "CNI_VERSION", "CniError", "CniNetwork", "CniPod"]
