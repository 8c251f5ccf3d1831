"""Pods on a real CNI network (issue 14): Debian's bridge + host-local plugins, as a CRI would run them.

The test plays the CRI: `framework.cni` makes each pod's netns and runs the loopback and bridge plugins ADD in
it (veth eth0 with an address from host-local, the bridge as gateway), then `ctr run --with-ns
network:<netns>` starts a busybox container in our runtime on it. HTTP both ways: the container fetches a page
(and 8 MiB, more than its receive ring holds) from a server this test runs on the bridge's address, and this
test fetches a page from `busybox httpd` in the container by its CNI address; a second pod on the same bridge
fetches the first pod's page and pings it. After the containers are deleted nothing of ours is left in the
netns (no tap, no ingress qdisc, no filter) and no shim runs; after CNI DEL the netns and the bridge ports
are gone.
"""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from framework.cni import CniNetwork, CniPod
from framework.containerd import (
    BUSYBOX_IMAGE,
    KATA_RUNTIME,
    PrivateContainerd,
)

RUN_TIMEOUT = 600
# eventually-waits (an httpd starting in a guest under nested TCG): generous, never a timed assert
EVENTUALLY = 180
POD_PAGE = "served-by-pod-a"
HOST_PAGE = "served-by-the-host"
# host->guest bulk: more than the guest's receive ring holds (256 x 1.5 KiB), so the ring runs empty
BIG = 8 << 20


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def cni(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CniNetwork]:
    """The bridge network kata-cni0 (10.89.0.0/24); the bridge is removed after the module."""
    network = CniNetwork("kata-lab", "kata-cni0", "10.89.0.0/24", tmp_path_factory.mktemp("cni"))
    try:
        yield network
    finally:
        network.remove()


@pytest.fixture
def host_http(tmp_path: Path, cni: CniNetwork) -> Iterator[Callable[[str], int]]:
    """An HTTP server on the bridge's (gateway's) address; needs the bridge, so a pod must exist first."""
    (tmp_path / "page").write_text(HOST_PAGE + "\n")
    (tmp_path / "big").write_bytes(bytes(BIG))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(address: str) -> int:
        server = http.server.ThreadingHTTPServer((address, 0), handler)
        threading.Thread(target=server.serve_forever, name="host-http", daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def netns_leftovers(ctrd: PrivateContainerd, pod: CniPod) -> dict[str, object]:
    """What the runtime could leave in the pod's netns: shims, taps, ingress qdiscs or filters on eth0."""
    ns = pod.netns
    qdiscs = sh("tc", "-n", ns, "qdisc", "show", "dev", "eth0").splitlines()
    return {
        "shims": ctrd.shim_pids(),
        "taps": [line for line in sh("ip", "-n", ns, "-o", "link", "show").splitlines() if "_kata" in line],
        "qdiscs": [q for q in qdiscs if "ingress" in q],
        "filters": sh("tc", "-n", ns, "filter", "show", "dev", "eth0", "ingress", check=False).strip(),
    }


def wait_clean(ctrd: PrivateContainerd, *pods: CniPod) -> None:
    end = time.monotonic() + EVENTUALLY
    while True:
        left = {pod.netns: netns_leftovers(ctrd, pod) for pod in pods}
        if not any(any(v.values()) for v in left.values()) or time.monotonic() > end:
            break
        time.sleep(0.5)
    assert not any(any(v.values()) for v in left.values()), f"left behind {left}\n{ctrd.log_tail()}"


def fetch(url: str) -> str:
    """GET ``url``, retried until the server answers (it may still be starting in the guest)."""
    end = time.monotonic() + EVENTUALLY
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(1)


@pytest.mark.lab
def test_two_pods_on_a_cni_bridge_talk_http_both_ways_and_leave_nothing(
    ctrd: PrivateContainerd, cni: CniNetwork, host_http: Callable[[str], int]
) -> None:
    with cni.pod("kata-cni-a") as pod_a, cni.pod("kata-cni-b") as pod_b:
        port = host_http(str(pod_a.gateway))
        serve = (
            f"mkdir -p /www && echo {POD_PAGE} > /www/index.html && httpd -p 8080 -h /www && exec sleep 3600"
        )
        done = ctrd.ctr(
            "run", "-d", "--runtime", KATA_RUNTIME, "--with-ns", f"network:{pod_a.netns_path}",
            BUSYBOX_IMAGE, "cni-a", "sh", "-c", serve,
            timeout=RUN_TIMEOUT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{ctrd.log_tail(100)}"
        try:
            # inside pod A: eth0 has the CNI address and MAC, and the host's server answers (bulk too)
            url = f"http://{pod_a.gateway}:{port}"
            probe = "ip -o addr show eth0; ip -o link show eth0; "
            probe += f"wget -q -O - {url}/page; wget -q -O - {url}/big | wc -c"
            inside = ctrd.ctr(
                "task",
                "exec",
                "--exec-id",
                "probe",
                "cni-a",
                "sh",
                "-c",
                probe,
                timeout=RUN_TIMEOUT,
                check=False,
            )
            assert inside.returncode == 0, f"{inside.stdout}\n{inside.stderr}\n{ctrd.log_tail(100)}"
            assert f"inet {pod_a.ip.with_prefixlen}" in inside.stdout, (pod_a, inside.stdout)
            assert pod_a.mac in inside.stdout, (pod_a, inside.stdout)
            assert HOST_PAGE in inside.stdout, inside.stdout
            assert inside.stdout.split()[-1] == str(BIG), inside.stdout  # all of it: no stalled receive ring
            # the host side of the bridge reaches the pod's httpd by its CNI address
            assert POD_PAGE in fetch(f"http://{pod_a.ip.ip}:8080/"), pod_a
            # a second pod on the bridge reaches the first
            a_ip = pod_a.ip.ip
            script = f"ip -o addr show eth0; wget -q -O - http://{a_ip}:8080/; ping -c 2 -W 20 {a_ip}"
            other = ctrd.ctr(
                "run", "--rm", "--runtime", KATA_RUNTIME, "--with-ns", f"network:{pod_b.netns_path}",
                BUSYBOX_IMAGE, "cni-b", "sh", "-c", script,
                timeout=RUN_TIMEOUT, check=False,
            )  # fmt: skip
            assert other.returncode == 0, f"{other.stdout}\n{other.stderr}\n{ctrd.log_tail(100)}"
            assert f"inet {pod_b.ip.with_prefixlen}" in other.stdout, (pod_b, other.stdout)
            assert POD_PAGE in other.stdout, other.stdout
            assert " 0% packet loss" in other.stdout, other.stdout
        finally:
            ctrd.remove("cni-a", timeout=EVENTUALLY)
        # the containers are gone: nothing of ours in either netns, no shim
        wait_clean(ctrd, pod_a, pod_b)
        ports = cni.bridge_ports()
        assert len(ports) == 2, ports  # the two veths CNI made, nothing we added
    # after CNI DEL: netns gone, no port left on the bridge
    assert not Path(pod_a.netns_path).exists() and not Path(pod_b.netns_path).exists()
    assert pod_a.netns not in sh("ip", "netns", "list") and pod_b.netns not in sh("ip", "netns", "list")
    assert cni.bridge_ports() == []
