"""Guest networking over netlink (pyroute2, imported on first use): interfaces, routes, ARP."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from kata_proto import ttrpc
from kata_proto.agent import types_pb2
from kata_proto.network import NUD_PERMANENT

_FAMILY = {types_pb2.IPFamily.v4: socket.AF_INET, types_pb2.IPFamily.v6: socket.AF_INET6}


class Netlink:
    """Netlink operations in the agent's network namespace (or a named one, for tests)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _open(self) -> Any:
        if self.netns:
            from pyroute2 import NetNS

            return NetNS(self.netns)
        from pyroute2 import IPRoute

        return IPRoute()

    @staticmethod
    def _find(ipr: Any, iface: Any) -> int:
        if iface.hwAddr:
            for link in ipr.get_links():
                if (link.get_attr("IFLA_ADDRESS") or "").lower() == iface.hwAddr.lower():
                    return int(link["index"])
        for name in (iface.device, iface.name):
            if name:
                found = ipr.link_lookup(ifname=name)
                if found:
                    return int(found[0])
        raise ttrpc.NotFound(f"no link with hwaddr {iface.hwAddr!r} or name {iface.name!r}")

    def update_interface(self, iface: Any) -> Any:
        """Rename, set MTU, replace the addresses and bring the link up; returns the result."""
        with self._open() as ipr:
            index = self._find(ipr, iface)
            try:
                ipr.link("set", index=index, state="down")
                changes: dict[str, Any] = {}
                if iface.name:
                    changes["ifname"] = iface.name
                if iface.mtu:
                    changes["mtu"] = iface.mtu
                if changes:
                    ipr.link("set", index=index, **changes)
                for addr in ipr.get_addr(index=index):
                    if addr["family"] in (socket.AF_INET, socket.AF_INET6) and addr["scope"] == 0:
                        ipr.addr(
                            "del",
                            index=index,
                            address=addr.get_attr("IFA_ADDRESS"),
                            prefixlen=addr["prefixlen"],
                        )
                for ip in iface.IPAddresses:
                    ipr.addr("add", index=index, address=ip.address, prefixlen=int(ip.mask or 32))
                ipr.link("set", index=index, state="up")
            except ttrpc.TtrpcError:
                raise
            except Exception as err:
                raise ttrpc.InvalidArgument(f"update interface {iface.name!r}: {err}") from err
            return self._interface(ipr, ipr.get_links(index)[0])

    def _interface(self, ipr: Any, link: Any) -> Any:
        out = types_pb2.Interface()
        out.name = out.device = link.get_attr("IFLA_IFNAME") or ""
        out.mtu = int(link.get_attr("IFLA_MTU") or 0)
        out.hwAddr = link.get_attr("IFLA_ADDRESS") or ""
        out.raw_flags = int(link["flags"])
        kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        out.type = kind or ""
        for addr in ipr.get_addr(index=link["index"]):
            ip = out.IPAddresses.add()
            ip.family = types_pb2.IPFamily.v6 if addr["family"] == socket.AF_INET6 else types_pb2.IPFamily.v4
            ip.address = addr.get_attr("IFA_ADDRESS") or ""
            ip.mask = str(addr["prefixlen"])
        return out

    def list_interfaces(self) -> list[Any]:
        """Every link with its addresses."""
        with self._open() as ipr:
            return [self._interface(ipr, link) for link in ipr.get_links()]

    def list_routes(self) -> list[Any]:
        """The main table's IPv4 and IPv6 routes."""
        out = []
        with self._open() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for family in (socket.AF_INET, socket.AF_INET6):
                for r in ipr.get_routes(family=family, table=254):
                    route = types_pb2.Route()
                    dst = r.get_attr("RTA_DST")
                    route.dest = f"{dst}/{r['dst_len']}" if dst else ""
                    route.gateway = r.get_attr("RTA_GATEWAY") or ""
                    route.device = names.get(r.get_attr("RTA_OIF"), "") or ""
                    route.source = r.get_attr("RTA_PREFSRC") or ""
                    route.scope = r["scope"]
                    route.family = (
                        types_pb2.IPFamily.v6 if family == socket.AF_INET6 else types_pb2.IPFamily.v4
                    )
                    out.append(route)
        return out

    def update_routes(self, routes: list[Any]) -> list[Any]:
        """Replace the main table's routes on the named devices with `routes` (link-scope first)."""
        with self._open() as ipr:
            devices = {r.device for r in routes}
            for dev in devices:
                found = ipr.link_lookup(ifname=dev)
                if not found:
                    raise ttrpc.NotFound(f"route device {dev!r} not found")
                for family in (socket.AF_INET, socket.AF_INET6):
                    for r in ipr.get_routes(family=family, table=254, oif=found[0]):
                        if r["proto"] != 2:  # keep the kernel's own (RTPROT_KERNEL) routes
                            with contextlib.suppress(Exception):
                                ipr.route("del", **_route_key(r))
            for route in sorted(routes, key=lambda r: 0 if not r.gateway else 1):
                spec: dict[str, Any] = {"oif": ipr.link_lookup(ifname=route.device)[0], "scope": route.scope}
                spec["family"] = _FAMILY.get(route.family, socket.AF_INET)
                if route.dest and route.dest != "default":
                    spec["dst"] = route.dest
                if route.gateway:
                    spec["gateway"] = route.gateway
                if route.source:
                    spec["prefsrc"] = route.source
                try:
                    ipr.route("replace", **spec)
                except Exception as err:
                    raise ttrpc.InvalidArgument(f"route {route.dest or 'default'}: {err}") from err
        return self.list_routes()

    def add_arp_neighbors(self, neighbors: list[Any]) -> None:
        """Add permanent neighbour entries."""
        with self._open() as ipr:
            for n in neighbors:
                found = ipr.link_lookup(ifname=n.device)
                if not found:
                    raise ttrpc.NotFound(f"neighbour device {n.device!r} not found")
                try:
                    ipr.neigh(
                        "replace",
                        dst=n.toIPAddress.address,
                        lladdr=n.lladdr,
                        ifindex=found[0],
                        state=n.state or NUD_PERMANENT,  # a neighbour without a state is static
                    )
                except Exception as err:
                    raise ttrpc.InvalidArgument(f"neighbour {n.toIPAddress.address}: {err}") from err


def _route_key(r: Any) -> dict[str, Any]:
    key: dict[str, Any] = {"family": r["family"], "table": 254, "dst_len": r["dst_len"]}
    if r.get_attr("RTA_DST"):
        key["dst"] = r.get_attr("RTA_DST")
    if r.get_attr("RTA_OIF"):
        key["oif"] = r.get_attr("RTA_OIF")
    return key
