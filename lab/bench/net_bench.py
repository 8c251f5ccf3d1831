"""Network bench: our tap+tc path against QEMU's virtio-net-pci with vhost-net, same workload, one lab VM.

Run inside the lab VM (`nox -s bench` does):
    lab/labvm exec -- .nox/tests/bin/python lab/bench/net_bench.py [--mib 32] [--rounds 2000] [--repeat 3]
        [--json build/bench/net.json] [--markdown build/bench/net.md]

Both guests sit on one CNI bridge (lab/framework/cni.py: Debian's bridge + host-local plugins) and run the
same busybox servers, so the only difference is the path a packet takes:

- ours: `ctr run` of a busybox container in io.containerd.kata.v2 on a CNI netns: bridge -> veth -> tc
  ingress mirred -> tap -> the shim's in-process virtio-net -> guest -> container;
- QEMU: the test guest (build/lab/guest initrd-test.img, same kernel) with a tap enslaved to the same bridge,
  `-netdev tap,vhost=on -device virtio-net-pci` (vhost=off, and said so in the report, when the lab VM has no
  /dev/vhost-net).

Servers in each guest (busybox `nc -ll -e`, one process per connection): 5001 echo (`cat`), 5002 source
(`cat /dev/zero`), 5003 sink (`dd of=/dev/null`). The client is this script in the lab VM's root netns:

- guest->host throughput: read ``--mib`` MiB from the source; host->guest: write them to the sink, shut down
  the write side and wait for the guest to close (so every byte reached the guest's dd); each ``--repeat``
  times, median reported;
- request latency: ``--rounds`` 64-byte request/response round trips on one TCP_NODELAY connection to the
  echo server (after 50 unmeasured ones), p50/p90/p99/mean of the round-trip times.

Ours runs first, then QEMU (each with a CNI pod of its own, so either makes the bridge); one guest at a time
(the lab VM has 2 vCPUs); `--peers qemu` measures one alone.
Writes JSON and a markdown table (ours/QEMU ratios); no pass/fail threshold: the lab VM is TCG-emulated, so
absolute numbers mean little, the ratio in one run is the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LAB = Path(__file__).resolve().parents[1]
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))

from framework import GuestAssets, GuestConfig, MicroVMFactory, QemuBackend, in_labvm  # noqa: E402
from framework.assets import initrd_with_files  # noqa: E402
from framework.cni import CniNetwork  # noqa: E402
from framework.containerd import (  # noqa: E402
    BUSYBOX_IMAGE,
    KATA_RUNTIME,
    PrivateContainerd,
    install_guest_assets,
    private_containerd,
)
from images import busybox_oci  # noqa: E402

ECHO, SOURCE, SINK = 5001, 5002, 5003
SERVERS = (
    f"nc -ll -p {ECHO} -e cat & nc -ll -p {SOURCE} -e cat /dev/zero & "
    f"nc -ll -p {SINK} -e dd of=/dev/null bs=65536 &"
)
BRIDGE, SUBNET = "kata-bench0", "10.90.0.0/24"
QEMU_IP, QEMU_TAP, QEMU_MAC = "10.90.0.200", "kbench-tap0", "52:54:00:90:00:c8"
READY_TIMEOUT = 600  # a guest booting under nested TCG; never part of a result
IO_TIMEOUT = 300  # one socket operation, generous
MESSAGE = 64


def log(msg: str) -> None:
    print(f"[net-bench] {msg}", file=sys.stderr, flush=True)


def connect(address: str, port: int) -> socket.socket:
    """A connection to a guest server, retried until it listens (a guest still booting refuses)."""
    end = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            sock = socket.create_connection((address, port), timeout=10)
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(1)
            continue
        sock.settimeout(IO_TIMEOUT)
        return sock


def wait_echo(address: str) -> None:
    """Until the echo server answers one message (listening is not enough: nc may not have exec'd yet)."""
    end = time.monotonic() + READY_TIMEOUT
    while True:
        with contextlib.suppress(OSError), connect(address, ECHO) as sock:
            sock.settimeout(30)
            sock.sendall(b"x" * MESSAGE)
            if recv_exactly(sock, MESSAGE):
                return
        if time.monotonic() > end:
            raise TimeoutError(f"no echo from {address}:{ECHO}")
        time.sleep(1)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError(f"EOF with {left} of {size} bytes left")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def guest_to_host(address: str, size: int) -> float:
    """MB/s reading ``size`` bytes from the guest's source."""
    with connect(address, SOURCE) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        buf = bytearray(1 << 16)
        got = 0
        start = time.perf_counter()
        while got < size:
            n = sock.recv_into(buf)
            if not n:
                raise ConnectionError(f"source closed after {got} bytes")
            got += n
        elapsed = time.perf_counter() - start
    return got / elapsed / 1e6


def host_to_guest(address: str, size: int) -> float:
    """MB/s writing ``size`` bytes to the guest's sink, until the guest closed (it read them all)."""
    block = b"\0" * (1 << 16)
    with connect(address, SINK) as sock:
        start = time.perf_counter()
        sent = 0
        while sent < size:
            sock.sendall(block)
            sent += len(block)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):  # dd's closing statistics, then EOF
            pass
        elapsed = time.perf_counter() - start
    return sent / elapsed / 1e6


def round_trips(address: str, rounds: int) -> list[float]:
    """Microseconds of each 64-byte request/response on one connection to the echo server."""
    message = b"r" * MESSAGE
    with connect(address, ECHO) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(50):  # warm-up: caches, the guest's nc/cat paged in
            sock.sendall(message)
            recv_exactly(sock, MESSAGE)
        times = []
        for _ in range(rounds):
            start = time.perf_counter_ns()
            sock.sendall(message)
            recv_exactly(sock, MESSAGE)
            times.append((time.perf_counter_ns() - start) / 1e3)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def latency_summary(times: list[float]) -> dict[str, float]:
    return {
        "p50_us": percentile(times, 50),
        "p90_us": percentile(times, 90),
        "p99_us": percentile(times, 99),
        "mean_us": statistics.fmean(times),
        "max_us": max(times),
    }


@contextlib.contextmanager
def ours(ctrd: PrivateContainerd, cni: CniNetwork) -> Iterator[str]:
    """A busybox container in our runtime on a CNI netns, running the servers; yields its address."""
    with cni.pod("kata-bench") as pod:
        script = f"{SERVERS} exec sleep 100000"
        ctrd.ctr(
            "run", "-d", "--runtime", KATA_RUNTIME, "--with-ns", f"network:{pod.netns_path}",
            BUSYBOX_IMAGE, "bench", "sh", "-c", script, timeout=READY_TIMEOUT,
        )  # fmt: skip
        try:
            wait_echo(str(pod.ip.ip))
            yield str(pod.ip.ip)
        finally:
            ctrd.ctr("task", "kill", "-s", "SIGKILL", "bench", check=False)
            end = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < end and ctrd.ctr("task", "delete", "bench", check=False).returncode:
                time.sleep(1)
            ctrd.ctr("container", "delete", "bench", check=False)


@contextlib.contextmanager
def qemu(workdir: Path, cni: CniNetwork, vhost: bool) -> Iterator[str]:
    """The test guest under QEMU, its tap on the bridge, running the servers; yields its address."""
    assets = GuestAssets()
    workdir.mkdir(parents=True, exist_ok=True)
    with cni.pod("kata-bench-qemu") as pod:  # only for the bridge (and its address): ours may not have run
        yield from _qemu(workdir, assets, str(pod.gateway), vhost)


def _qemu(workdir: Path, assets: GuestAssets, gateway: str, vhost: bool) -> Iterator[str]:
    run = f"""
dev=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
ip link set lo up
ip link set "$dev" up
ip addr add {QEMU_IP}/24 dev "$dev"
ip route add default via {gateway}
{SERVERS}
echo KATA-NET-BENCH-READY
exec sleep 100000
"""
    vhost_opt = "on" if vhost else "off"
    initrd = initrd_with_files(assets.initrd_test, {"/lab/run.sh": run}, workdir / "initrd")
    subprocess.run(["ip", "tuntap", "add", QEMU_TAP, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "link", "set", QEMU_TAP, "master", BRIDGE, "up"], check=True)
        config = GuestConfig(
            kernel=assets.kernel,
            initrd=initrd,
            cmdline="console=ttyS0 quiet panic=-1 lab.run=/lab/run.sh",
            vcpus=1,
            memory_mib=512,
            extra_args={
                "qemu": [
                    "-netdev", f"tap,id=n0,ifname={QEMU_TAP},script=no,downscript=no,vhost={vhost_opt}",
                    "-device", f"virtio-net-pci,netdev=n0,mac={QEMU_MAC}",
                ]
            },
        )  # fmt: skip
        factory = MicroVMFactory(workdir, QemuBackend(), assets)
        try:
            vm = factory.build(config, name="qemu-net").spawn()
            vm.wait_for_console("KATA-NET-BENCH-READY", timeout=READY_TIMEOUT)
            wait_echo(QEMU_IP)
            yield QEMU_IP
        finally:
            factory.kill_all()
    finally:
        subprocess.run(["ip", "link", "delete", QEMU_TAP], check=False)


def measure(name: str, address: str, size: int, rounds: int, repeat: int) -> dict[str, Any]:
    log(f"{name}: {repeat} x {size >> 20} MiB each way, {rounds} round trips at {address}")
    rx = [guest_to_host(address, size) for _ in range(repeat)]
    tx = [host_to_guest(address, size) for _ in range(repeat)]
    times = round_trips(address, rounds)
    result = measure_result(rx, tx, times)
    log(
        f"{name}: rx {statistics.median(rx):.2f} MB/s tx {statistics.median(tx):.2f} MB/s {result['latency']}"
    )
    return result


def report_header(mib: int, rounds: int, vhost: bool) -> dict[str, Any]:
    """The JSON report before any guest's record (``ours``, ``qemu``) is added."""
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "mib": mib,
        "rounds": rounds,
        "qemu_net": "vhost=on" if vhost else "vhost=off (no /dev/vhost-net in the lab VM)",
    }


def measure_result(rx: list[float], tx: list[float], times: list[float]) -> dict[str, Any]:
    """One guest's record: every throughput run (MB/s) each way, latency summary, every round trip (us)."""
    return {
        "guest_to_host_MBps": rx,
        "host_to_guest_MBps": tx,
        "latency": latency_summary(times),
        "latency_samples_us": times,
    }


def markdown(report: dict[str, Any]) -> str:
    if "ours" not in report or "qemu" not in report:
        return json.dumps({k: v for k, v in report.items() if k not in ("ours", "qemu")}) + "\n"
    o, q = report["ours"], report["qemu"]
    rows: list[tuple[str, float, float, str]] = []
    for key, label in (
        ("guest_to_host_MBps", "guest->host MB/s"),
        ("host_to_guest_MBps", "host->guest MB/s"),
    ):
        rows.append(
            (f"{label} (median of {len(o[key])})", statistics.median(o[key]), statistics.median(q[key]), "")
        )
    for key in ("p50_us", "p90_us", "p99_us", "mean_us", "max_us"):
        rows.append((f"round trip {key[:-3]} (us)", o["latency"][key], q["latency"][key], ""))
    lines = [
        f"# Network bench ({report['when']})",
        "",
        f"ours: tap+tc (tcfilter) + in-process virtio-net; QEMU: virtio-net-pci, {report['qemu_net']}.",
        f"{report['mib']} MiB each way, {report['rounds']} x {MESSAGE}-byte round trips;"
        " nested KVM in a TCG lab VM.",
        "",
        "| metric | ours | QEMU | ours/QEMU |",
        "|---|---:|---:|---:|",
    ]
    for label, ov, qv, _ in rows:
        lines.append(f"| {label} | {ov:.1f} | {qv:.1f} | {ov / qv:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=32, help="MiB per throughput run (default 32)")
    parser.add_argument("--rounds", type=int, default=2000, help="measured round trips (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs each way (default 3)")
    parser.add_argument("--peers", default="ours,qemu", help="which guests to measure (default ours,qemu)")
    parser.add_argument("--json", type=Path, help="write the full report (with every latency sample)")
    parser.add_argument("--markdown", type=Path, help="write the summary table")
    args = parser.parse_args(argv)
    if not in_labvm():
        print("run inside the lab VM: lab/labvm exec -- PYTHON lab/bench/net_bench.py", file=sys.stderr)
        return 2
    subprocess.run(["modprobe", "vhost_net"], check=False, capture_output=True)
    vhost = os.path.exists("/dev/vhost-net")
    size = args.mib << 20
    install_guest_assets()
    report = report_header(args.mib, args.rounds, vhost)
    with tempfile.TemporaryDirectory(prefix="net-bench-") as tmp:
        work = Path(tmp)
        cni = CniNetwork("kata-bench", BRIDGE, SUBNET, work / "cni")
        try:
            tar = busybox_oci.build(work / "busybox.tar")
            with private_containerd(debug=False) as ctrd:
                ctrd.import_image(tar)
                runs: list[tuple[str, Callable[[], contextlib.AbstractContextManager[str]]]] = [
                    ("ours", lambda: ours(ctrd, cni)),
                    ("qemu", lambda: qemu(work / "qemu", cni, vhost)),
                ]
                runs = [(name, guest) for name, guest in runs if name in args.peers.split(",")]
                for name, guest in runs:
                    with guest() as address:
                        report[name] = measure(name, address, size, args.rounds, args.repeat)
        finally:
            cni.remove()
    table = markdown(report)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
