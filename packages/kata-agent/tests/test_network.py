"""UpdateInterface, UpdateRoutes, AddARPNeighbors, List* on a veth NIC in a network namespace of our own."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
import trio
from agent_harness import running_agent

from kata_agent_client import AgentNotFound, ARPNeighbor, Interface, IPAddress, Route

pytestmark = pytest.mark.root

MAC = "02:42:ac:11:00:99"


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh netns holding a veth pair (`veth-k` with a known MAC); deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"ka-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip = ["ip", "-n", name]
        subprocess.run(
            [*ip, "link", "add", "veth-k", "address", MAC, "type", "veth", "peer", "name", "peer-k"],
            check=True,
        )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_update_interface_routes_and_neighbours(netns: str) -> None:
    async def main() -> None:
        async with running_agent(netns=netns) as agent:
            c = agent.client
            # Documentation addresses (RFC 5737) in a namespace of our own: nothing leaves it.
            iface = Interface(name="eth0", hw_addr=MAC, mtu=1400, addresses=[IPAddress("192.0.2.2", 24)])
            got = await c.update_interface(iface)
            assert got.name == "eth0"
            assert got.mtu == 1400
            assert [(a.address, a.prefix) for a in got.addresses if a.family == 4] == [("192.0.2.2", 24)]
            # a second update replaces the address instead of adding one
            iface.addresses = [IPAddress("192.0.2.3", 25)]
            got = await c.update_interface(iface)
            assert [(a.address, a.prefix) for a in got.addresses if a.family == 4] == [("192.0.2.3", 25)]
            names = {i.name for i in await c.list_interfaces()}
            assert {"lo", "eth0"} <= names
            routes = await c.update_routes(
                [
                    Route(dest="198.51.100.0/24", device="eth0", scope=253),
                    Route(gateway="192.0.2.1", device="eth0"),
                ]
            )
            assert any(r.dest == "" and r.gateway == "192.0.2.1" and r.device == "eth0" for r in routes)
            assert any(r.dest == "198.51.100.0/24" for r in await c.list_routes())
            await c.add_arp_neighbors([ARPNeighbor("192.0.2.1", "02:42:ac:11:00:01", "eth0")])
            show = ["ip", "-n", netns, "neigh", "show", "dev", "eth0"]
            neigh = (await trio.run_process(show, capture_stdout=True)).stdout.decode()
            assert "192.0.2.1 lladdr 02:42:ac:11:00:01 PERMANENT" in neigh
            with pytest.raises(AgentNotFound):
                await c.update_interface(Interface(name="eth9", hw_addr="02:00:00:00:00:09"))
            with pytest.raises(AgentNotFound):
                await c.update_routes([Route(gateway="192.0.2.1", device="nope0")])

    trio.run(main)
