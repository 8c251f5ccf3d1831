"""Plain data of the agent's network calls (agent.proto's types.Interface, Route, ARPNeighbor), no protobuf.

One home below both users: kata-resources scans the pod's netns into these and kata-agent-client turns them
into protobuf for UpdateInterface/UpdateRoutes/AddARPNeighbors, so the shim hands one to the other unchanged.

iface = Interface("eth0", "02:00:00:00:00:01", 1500, [IPAddress("10.0.0.2", 24)])
route = Route(gateway="10.0.0.1", device="eth0")          # empty dest: the default route
neighbor = ARPNeighbor("10.0.0.9", "02:00:00:00:00:09", "eth0")
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["NUD_PERMANENT", "ARPNeighbor", "IPAddress", "Interface", "Route"]

#: <linux/neighbour.h> NUD_PERMANENT: the state of a static neighbour (the only kind copied to the guest).
NUD_PERMANENT = 0x80


@dataclass
class IPAddress:
    """An address with its prefix length; family 4 or 6."""

    address: str
    prefix: int
    family: int = 4


@dataclass
class Interface:
    """A guest NIC: found by `hw_addr` (or `device`), renamed to `name`."""

    name: str
    hw_addr: str = ""
    mtu: int = 0
    addresses: list[IPAddress] = field(default_factory=list)
    device: str = ""
    type: str = ""
    raw_flags: int = 0


@dataclass
class Route:
    """A route in the guest's main table; empty `dest` is the default route."""

    dest: str = ""
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0
    family: int = 4


@dataclass
class ARPNeighbor:
    """A static neighbour entry."""

    address: str
    lladdr: str
    device: str
    state: int = NUD_PERMANENT
