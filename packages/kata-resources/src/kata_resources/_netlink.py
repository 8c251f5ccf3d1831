"""The netlink side of the pod's network (`_network`): scan a netns, connect its veths to taps (tcfilter or
route model), tear them down. pyroute2 is imported here only, so a shim whose pod has no network never
loads it (its package imports every netlink family it knows: ~0.25 s on the host, seconds under emulation).
Each function runs on a thread inside the pod's netns (`_netns`).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kata_proto.network import NUD_PERMANENT
from kata_resources._network import (
    Endpoint,
    InterfaceSpec,
    IPAddressSpec,
    NeighborSpec,
    Network,
    NetworkError,
    NetworkModel,
    RouteSpec,
    tap_name,
)

#: <linux/if_ether.h> ETH_P_ALL: the filters match every protocol.
ETH_P_ALL = 0x0003
#: Flow id of the redirect filters (1:1), as upstream's tcfilter model sets it.
_FILTER_CLASSID = 0x10001
#: "ffff:", the ingress qdisc's handle.
_INGRESS_HANDLE = 0xFFFF0000
_RT_TABLE_MAIN = 254
_RT_TABLE_LOCAL = 255
#: Route model: the routing table of endpoint N is 10 + N (upstream uses table 10 for its one endpoint).
_ROUTE_TABLE_BASE = 10
#: Route model: the local table's rule moves from preference 0 to 10, below the per-veth rules at 5.
_LOCAL_RULE_PREF = 10
_VETH_RULE_PREF = 5


# -- scanning -------------------------------------------------------------------------------------------


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    value = msg.get_attr(name)
    return default if value is None else value


def _link_kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return "" if info is None else str(info.get_attr("IFLA_INFO_KIND") or "")


def _family(af: int) -> int:
    return 6 if af == socket.AF_INET6 else 4


def _is_link_local_v6(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return ip.version == 6 and (ip.is_link_local or ip.is_multicast)


def _scan(ipr: IPRoute) -> tuple[list[Any], list[InterfaceSpec], list[RouteSpec], list[NeighborSpec]]:
    """The veths of the namespace (sorted by ifindex) with their addresses, routes and neighbours."""
    veths = sorted((link for link in ipr.get_links() if _link_kind(link) == "veth"), key=lambda x: x["index"])
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in veths}
    interfaces = []
    for link in veths:
        addrs = []
        for msg in ipr.get_addr(index=link["index"]):
            addr = _attr(msg, "IFA_LOCAL", "") or _attr(msg, "IFA_ADDRESS", "")  # LOCAL: ours on p2p links
            if addr and not _is_link_local_v6(addr):
                addrs.append(IPAddressSpec(addr, msg["prefixlen"], _family(msg["family"])))
        interfaces.append(
            InterfaceSpec(
                names[link["index"]],
                str(link.get_attr("IFLA_ADDRESS")),
                int(link.get_attr("IFLA_MTU")),
                addrs,
            )
        )
    routes = []
    for af in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=af):
            oif = msg.get_attr("RTA_OIF")
            if oif not in names or _attr(msg, "RTA_TABLE", msg["table"]) != _RT_TABLE_MAIN:
                continue
            dst = _attr(msg, "RTA_DST", "")
            if dst and _is_link_local_v6(dst):
                continue  # the guest kernel makes its own link-local and multicast routes
            routes.append(
                RouteSpec(
                    dest=f"{dst}/{msg['dst_len']}" if dst else "",
                    gateway=_attr(msg, "RTA_GATEWAY", ""),
                    device=names[oif],
                    source=_attr(msg, "RTA_PREFSRC", ""),
                    scope=msg["scope"],
                    family=_family(af),
                )
            )
    neighbors = []
    for msg in ipr.get_neighbours():
        if msg["ifindex"] in names and msg["state"] & NUD_PERMANENT and msg.get_attr("NDA_LLADDR"):
            neighbors.append(
                NeighborSpec(msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR"), names[msg["ifindex"]])
            )
    return veths, interfaces, routes, neighbors


# -- connecting and tearing down -------------------------------------------------------------------------


def _ignore(err: NetlinkError, *codes: int) -> None:
    if err.code not in codes:
        raise err


def _redirect(ipr: IPRoute, src: int, dst: int) -> None:
    """Every frame entering ``src`` leaves through ``dst``: ingress qdisc + u32 match-all + mirred."""
    ipr.tc("add", "ingress", src, _INGRESS_HANDLE)
    ipr.tc(
        "add-filter",
        "u32",
        src,
        parent=_INGRESS_HANDLE,
        protocol=ETH_P_ALL,
        target=_FILTER_CLASSID,
        keys=["0x0/0x0+0"],
        action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": dst},
    )


def _sysctl(dev: str, name: str, value: int) -> None:
    # /proc/sys/net shows the network namespace of the thread that opens it: ours is in the pod's.
    path = f"/proc/sys/net/ipv4/conf/{dev}/{name}"
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except FileNotFoundError:
        pass  # the device is gone
    except OSError as err:
        raise NetworkError(f"cannot write {value} to {path}: {err.strerror}") from err


def _rules(ipr: IPRoute, priority: int, table: int) -> list[Any]:
    return [
        r
        for r in ipr.get_rules(family=socket.AF_INET)
        if r.get_attr("FRA_PRIORITY", 0) == priority and _attr(r, "FRA_TABLE", r["table"]) == table
    ]


def _route_connect(ipr: IPRoute, tap: int, endpoint: Endpoint, address: str) -> None:
    """The route model: what enters the veth is routed to the tap (a table of its own, chosen by a
    rule ahead of the local table), the guest's address answers on the tap with the veth's MAC."""
    if not _rules(ipr, _LOCAL_RULE_PREF, _RT_TABLE_LOCAL):
        ipr.rule("add", priority=_LOCAL_RULE_PREF, table=_RT_TABLE_LOCAL)
    if _rules(ipr, 0, _RT_TABLE_LOCAL):
        ipr.rule("del", priority=0, table=_RT_TABLE_LOCAL)
    table = _ROUTE_TABLE_BASE + endpoint.index
    ipr.rule("add", priority=_VETH_RULE_PREF, iifname=endpoint.veth, table=table)
    ipr.route("replace", dst="0.0.0.0/0", oif=tap, table=table)
    ipr.neigh("replace", dst=address, lladdr=endpoint.hw_addr, ifindex=tap, state=NUD_PERMANENT)
    _sysctl(endpoint.tap, "accept_local", 1)
    _sysctl(endpoint.veth, "proxy_arp", 1)
    for dev in (endpoint.veth, endpoint.tap):
        _sysctl(dev, "forwarding", 1)


def _route_teardown(ipr: IPRoute, endpoint: Endpoint) -> None:
    table = _ROUTE_TABLE_BASE + endpoint.index
    for _ in _rules(ipr, _VETH_RULE_PREF, table):
        try:
            ipr.rule("del", priority=_VETH_RULE_PREF, iifname=endpoint.veth, table=table)
        except NetlinkError as err:
            _ignore(err, errno.ENOENT)
    for name in ("proxy_arp", "forwarding"):
        _sysctl(endpoint.veth, name, 0)


def _restore_local_rule(ipr: IPRoute) -> None:
    """Put the local table's rule back at preference 0 (route model, after the last endpoint)."""
    if _rules(ipr, _LOCAL_RULE_PREF, _RT_TABLE_LOCAL):
        if not _rules(ipr, 0, _RT_TABLE_LOCAL):
            ipr.rule("add", priority=0, table=_RT_TABLE_LOCAL)
        ipr.rule("del", priority=_LOCAL_RULE_PREF, table=_RT_TABLE_LOCAL)


def _teardown_endpoint(ipr: IPRoute, endpoint: Endpoint, model: NetworkModel) -> None:
    if model is NetworkModel.ROUTE:
        _route_teardown(ipr, endpoint)
    if endpoint.tap:  # its routes, neighbours, qdisc and filter go with it
        for index in ipr.link_lookup(ifname=endpoint.tap):
            try:
                ipr.link("del", index=index)
            except NetlinkError as err:
                _ignore(err, errno.ENODEV)
    if model is NetworkModel.TCFILTER:
        for index in ipr.link_lookup(ifname=endpoint.veth):
            try:
                ipr.tc("del", "ingress", index, _INGRESS_HANDLE)
            except NetlinkError as err:  # no ingress qdisc (never added, or already gone)
                _ignore(err, errno.ENOENT, errno.EINVAL)


def _connect(
    ipr: IPRoute,
    link: Any,
    spec: InterfaceSpec,
    *,
    endpoint: Endpoint,
    model: NetworkModel,
    created: list[Endpoint],
) -> None:
    """Create the tap (appended to ``created`` once it exists) and tie it to the veth as ``model`` says."""
    if ipr.link_lookup(ifname=endpoint.tap):
        raise NetworkError(f"{endpoint.tap} already exists")  # not ours: never touched, never deleted
    address = next((a.address for a in spec.addresses if a.family == 4), "")
    if model is NetworkModel.ROUTE and not address:
        raise NetworkError(f"{endpoint.veth} has no IPv4 address (the route model needs one)")
    ipr.link("add", ifname=endpoint.tap, kind="tuntap", mode="tap", ifr={"no_pi": 1, "vnet_hdr": 1})
    created.append(endpoint)
    (tap,) = ipr.link_lookup(ifname=endpoint.tap)
    ipr.link("set", index=tap, mtu=endpoint.mtu, state="up")
    ipr.link("set", index=link["index"], state="up")
    if model is NetworkModel.TCFILTER:
        _redirect(ipr, link["index"], tap)
        _redirect(ipr, tap, link["index"])
    else:
        _route_connect(ipr, tap, endpoint, address)


def _connect_new(ipr: IPRoute, network: Network) -> list[Endpoint]:
    """Scan, refresh the guest specs, and connect every veth not yet an endpoint; returns the new ones.
    On failure what this call created is removed and `NetworkError` raised."""
    try:
        veths, interfaces, routes, neighbors = _scan(ipr)
    except NetlinkError as err:
        raise NetworkError(f"cannot scan the network namespace {network.netns}: {err}") from err
    network.interfaces, network.routes, network.neighbors = interfaces, routes, neighbors
    known = {e.veth for e in network.endpoints}
    index = max((e.index for e in network.endpoints), default=-1) + 1
    model = network.model
    new: list[Endpoint] = []
    created: list[Endpoint] = []
    for link, spec in zip(veths, interfaces, strict=True):
        if spec.name in known:
            continue
        tap = "" if model is NetworkModel.NONE else tap_name(index)
        endpoint = Endpoint(index, spec.name, spec.hw_addr, spec.mtu, tap)
        index += 1
        if model is not NetworkModel.NONE:
            try:
                _connect(ipr, link, spec, endpoint=endpoint, model=model, created=created)
            except (NetlinkError, OSError, ValueError, NetworkError) as err:
                for done in reversed(created):
                    _teardown_endpoint(ipr, done, model)
                if model is NetworkModel.ROUTE and not network.endpoints:
                    _restore_local_rule(ipr)
                raise NetworkError(f"cannot connect {spec.name} to {tap} in {network.netns}: {err}") from err
        new.append(endpoint)
    network.endpoints.extend(new)
    return new


def setup(netns: str, model: NetworkModel) -> Network:
    """Scan the netns (run inside it) and connect each veth as ``model`` says."""
    with IPRoute() as ipr:
        network = Network(netns, model)
        _connect_new(ipr, network)
        return network


def rescan(network: Network) -> list[Endpoint]:
    """Connect the veths that appeared in ``network``'s netns since (run inside it)."""
    with IPRoute() as ipr:
        return _connect_new(ipr, network)


def teardown(network: Network) -> None:
    """Remove what `setup` and `rescan` made in ``network``'s netns (run inside it); `NetworkError`."""
    try:
        with IPRoute() as ipr:
            for endpoint in reversed(network.endpoints):
                _teardown_endpoint(ipr, endpoint, network.model)
            if network.model is NetworkModel.ROUTE:
                _restore_local_rule(ipr)
    except NetlinkError as err:
        raise NetworkError(f"cannot tear down the network in {network.netns}: {err}") from err
