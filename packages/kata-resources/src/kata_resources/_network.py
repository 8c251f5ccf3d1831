"""The pod's network: veth endpoints found in its netns, each tied to a tap the VM uses.

What containerd or CNI built is a network namespace with one veth end per pod interface (usually
``eth0``), holding the pod's addresses, routes and static neighbours. As runtime-rs's resource manager
does with its default ``tcfilter`` internetworking model, for endpoint N we create tap ``tap<N>_kata`` in
that namespace and join tap and veth with an ingress qdisc on each plus a u32 match-all filter whose
action is ``mirred egress redirect`` to the other (every frame arriving on one leaves through the other).
The VMM opens the tap *inside the namespace* (`to_thread_in_netns(netns, open_tap, tap)`) and gives the
guest NIC the veth's MAC; the agent then gets the veth's addresses, routes and neighbours (`InterfaceSpec`,
`RouteSpec`, `NeighborSpec`: kata_proto.network's plain types, which the agent client sends as they are).
Model ``none`` scans but connects nothing (the guest has no network).

The veth itself is left as CNI made it. Teardown deletes the taps (their qdiscs and filters go with them)
and the ingress qdisc on each veth (its filter goes with it): nothing of ours is left. `Network.to_dict` /
`Network.from_dict` let a restarted shim tear down what a crashed one set up. The netlink work itself
(pyroute2, a quarter of a second of imports on the host) is in `_netlink`, imported when a pod has a network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import trio

from kata_proto.network import ARPNeighbor, Interface, IPAddress, Route
from kata_resources._errors import ResourceError
from kata_resources._netns import run_in_netns, to_thread_in_netns


class NetworkError(ResourceError):
    """Raised when the pod's network namespace cannot be scanned, connected or torn down."""


class NetworkModel(StrEnum):
    """How guest frames reach the pod's veth (runtime-rs ``internetworking_model``)."""

    TCFILTER = "tcfilter"
    ROUTE = "route"
    NONE = "none"


def tap_name(index: int) -> str:
    """The tap of endpoint ``index``: ``tap<N>_kata`` as runtime-rs names it."""
    return f"tap{index}_kata"


# The guest's view of the pod network is the agent's own plain types (one home, kata_proto.network, below
# both this package and kata-agent-client): the shim hands them to the client unchanged. Old names kept.
IPAddressSpec = IPAddress
InterfaceSpec = Interface
RouteSpec = Route
NeighborSpec = ARPNeighbor


@dataclass(frozen=True)
class Endpoint:
    """One veth of the pod and the tap that carries its frames to the VM (empty ``tap`` with model none)."""

    index: int
    veth: str
    hw_addr: str
    mtu: int
    tap: str = ""


@dataclass
class Network:
    """What `setup_network` made in the pod's netns and what the guest must be told."""

    netns: str
    model: NetworkModel
    endpoints: list[Endpoint] = field(default_factory=list)
    interfaces: list[InterfaceSpec] = field(default_factory=list)
    routes: list[RouteSpec] = field(default_factory=list)
    neighbors: list[NeighborSpec] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """What teardown needs after a crash (JSON-able): the netns, the model and the endpoints."""
        return {
            "netns": self.netns,
            "model": self.model.value,
            "endpoints": [
                {"index": e.index, "veth": e.veth, "hw_addr": e.hw_addr, "mtu": e.mtu, "tap": e.tap}
                for e in self.endpoints
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        """The network `to_dict` described (without guest specs: only teardown is meaningful)."""
        try:
            endpoints = [
                Endpoint(int(e["index"]), str(e["veth"]), str(e["hw_addr"]), int(e["mtu"]), str(e["tap"]))
                for e in data["endpoints"]
            ]
            return cls(str(data["netns"]), NetworkModel(data["model"]), endpoints)
        except (KeyError, TypeError, ValueError) as err:
            raise NetworkError(f"bad network record {data!r}: {err}") from err


def setup_network_sync(netns: str | Path, model: NetworkModel | str = NetworkModel.TCFILTER) -> Network:
    """Scan the netns at ``netns`` and connect a tap to each veth (model tcfilter); blocks the caller.

    On failure whatever was created is removed and `NetworkError` is raised.
    """
    model = NetworkModel(model)
    from kata_resources import _netlink

    return run_in_netns(netns, _netlink.setup, str(netns), model)


async def setup_network(netns: str | Path, model: NetworkModel | str = NetworkModel.TCFILTER) -> Network:
    """`setup_network_sync` from trio, on a thread of its own inside the namespace."""
    model = NetworkModel(model)
    from kata_resources import _netlink

    return await to_thread_in_netns(netns, _netlink.setup, str(netns), model)


def rescan_network_sync(network: Network) -> list[Endpoint]:
    """Scan ``network``'s netns again (as upstream does on Start): veths that appeared since are
    connected like the first ones and returned; interfaces, routes and neighbours are refreshed."""
    from kata_resources import _netlink

    return run_in_netns(network.netns, _netlink.rescan, network)


async def rescan_network(network: Network) -> list[Endpoint]:
    """`rescan_network_sync` from trio."""
    from kata_resources import _netlink

    return await to_thread_in_netns(network.netns, _netlink.rescan, network)


def teardown_network_sync(network: Network) -> None:
    """Remove the taps, qdiscs and filters of ``network``; what is already gone is skipped.

    A netns that no longer exists took everything with it, so there is nothing to do.
    """
    if not Path(network.netns).exists():
        return
    from kata_resources import _netlink

    run_in_netns(network.netns, _netlink.teardown, network)


async def teardown_network(network: Network) -> None:
    """`teardown_network_sync` from trio."""
    if not await trio.Path(network.netns).exists():
        return
    from kata_resources import _netlink

    await to_thread_in_netns(network.netns, _netlink.teardown, network)
