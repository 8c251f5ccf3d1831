"""The guest's upcall server (packages/kata-upcall/guest, kata_upcall_srv.ko) in the Debian guest.

On the host under QEMU TCG (marked ``guest_assets``; seconds): the module loads, starts its thread, refuses
a guest process that reaches port 219 over vsock loopback, and unloads. In the lab VM on kata-vmm (marked
``lab``): one boot of initrd-test.img with the module and lab/tests/scripts/upcall_guest.sh: the guest
loads the module and waits; the host talks to vsock port 219 through kata-vmm's hybrid vsock socket as a
hostile client would (garbage frames, wrong sizes, bad magic, flags and types, short frames, unknown services,
random frames) and checks every answer, then that a well-formed session still works; it releases the guest
with a connection to port 1024, and the guest reports the module still loaded, no device left behind, no
oops in dmesg, and a clean rmmod. A second boot checks the sandbox initramfs loads the module before the
agent would start.

    ./dev nox -s lab -- lab/tests/test_upcall_lab.py -v
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from framework import (
    GuestAssets,
    GuestConfig,
    KataVmmBackend,
    MicroVMFactory,
    build_vsock_helper,
    initrd_with_files,
    vsock_echo,
)
from framework.inprocess import UPCALL_MODULE as MODULE
from framework.inprocess import Console, boot_with_upcall
from images import build as images

from kata_upcall import (
    DEV_MGR_MAGIC_VERSION,
    DEV_MGR_MSG_SIZE,
    AddCpu,
    AddMmio,
    AddPci,
    CpuReply,
    DelCpu,
    DelMmio,
    MmioReply,
    MsgType,
    PciReply,
    Reply,
    UpcallClient,
    decode_accept_line,
    decode_connect,
    decode_reply,
    encode_hybrid_connect,
)
from kata_vmm import (
    BlockSpec,
    MmioSlot,
    Vmm,
    hot_add_vcpus,
    hot_add_virtio,
    hot_remove_vcpus,
    hot_remove_virtio,
)

SCRIPTS = Path(__file__).resolve().parent / "scripts"
EINVAL, ENODEV, EPERM, EOPNOTSUPP = 22, 19, 1, 95
# kata-vmm's slot 0 is the vsock device (the only one this guest has): slot 5 is free
FREE_SLOT = MmioSlot.at(5)


def _read_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _connect(uds: Path) -> socket.socket:
    """A hybrid vsock connection to guest port 219 (``CONNECT 219`` answered ``OK <port>``)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(str(uds))
    s.sendall(encode_hybrid_connect())
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, f"kata-vmm closed CONNECT 219 after {line!r}: nothing listens on port 219"
        line += chunk
    decode_accept_line(line)
    return s


@contextmanager
def _session(uds: Path) -> Iterator[socket.socket]:
    """A device-manager session: service byte ``d``, then the module's Connect frame."""
    s = _connect(uds)
    try:
        s.sendall(b"d")
        decode_connect(_read_exact(s, DEV_MGR_MSG_SIZE))
        yield s
    finally:
        s.close()


def _ask(s: socket.socket, frame: bytes) -> Reply:
    s.sendall(frame)
    return decode_reply(_read_exact(s, DEV_MGR_MSG_SIZE))


def _closed(s: socket.socket) -> bool:
    """The module closed the connection (EOF, or a reset), rather than answering."""
    try:
        return s.recv(DEV_MGR_MSG_SIZE) == b""
    except ConnectionResetError:
        return True


def _with_header(frame: bytes, **fields: int) -> bytes:
    magic, size, msg_type, flags = struct.unpack_from("<IIII", frame)
    values = {"magic": magic, "size": size, "msg_type": msg_type, "flags": flags, **fields}
    head = struct.pack("<IIII", values["magic"], values["size"], values["msg_type"], values["flags"])
    return head + frame[16:]


def _hostile_client(uds: Path) -> None:
    slot = FREE_SLOT
    with _session(uds) as s:
        # error replies: the connection stays usable after each
        bad_size = _with_header(AddMmio(slot.base, slot.size, slot.gsi).encode(), size=7)
        assert _ask(s, bad_size) == MmioReply(MsgType.ADD_MMIO, -EINVAL)
        assert _ask(s, AddMmio(slot.base, 0x10, slot.gsi).encode()) == MmioReply(MsgType.ADD_MMIO, -EINVAL)
        assert _ask(s, AddMmio(slot.base + 1, slot.size, slot.gsi).encode()) == MmioReply(
            MsgType.ADD_MMIO, -EINVAL
        )
        assert _ask(s, AddMmio(2**64 - 4096, 4096, slot.gsi).encode()) == MmioReply(MsgType.ADD_MMIO, -EINVAL)
        assert _ask(s, AddMmio(slot.base, slot.size, 0).encode()) == MmioReply(MsgType.ADD_MMIO, -EINVAL)
        assert _ask(s, DelMmio(slot.base, slot.size, slot.gsi).encode()) == MmioReply(
            MsgType.DEL_MMIO, -ENODEV
        )
        # nothing answers at a free slot (reads 0xff): the device is registered, not bound, removed again
        assert _ask(s, AddMmio(slot.base, slot.size, slot.gsi).encode()) == MmioReply(
            MsgType.ADD_MMIO, -ENODEV
        )
        assert _ask(s, AddPci(0, 8).encode()) == PciReply(MsgType.ADD_PCI, -EOPNOTSUPP)
        assert _ask(s, DelCpu((0,)).encode()) == CpuReply(MsgType.DEL_CPU, -EPERM, 0)  # the boot CPU
        assert _ask(s, AddCpu((0,)).encode()) == CpuReply(MsgType.ADD_CPU, 0, 1)  # online already
        assert _ask(s, AddCpu((0xFF,)).encode()) == CpuReply(MsgType.ADD_CPU, -EINVAL, 0)  # broadcast
        assert _ask(s, _with_header(AddCpu(()).encode(), size=4)) == CpuReply(MsgType.ADD_CPU, -EINVAL, 0)
        # garbage closes the connection
        s.sendall(os.urandom(DEV_MGR_MSG_SIZE))
        assert _closed(s)
    for fields in ({"msg_type": MsgType.CONNECT}, {"msg_type": 0x77}, {"flags": 1}, {"magic": 0x444D0200}):
        with _session(uds) as s:
            s.sendall(_with_header(AddPci(0, 8).encode(), **fields))
            assert _closed(s), fields
    with _session(uds) as s:  # a short frame, then the host goes away
        s.sendall(AddPci(0, 8).encode()[:500])
    with _connect(uds) as s:  # an unknown service
        s.sendall(b"x")
        assert _closed(s)
    with _connect(uds):  # no service byte at all
        pass
    # random frames with the right magic (no CPU requests: those would start vCPUs that do not exist)
    rng = random.Random(219)
    types = [0, 3, 4, 5, 6, 7, 8, 9, 0xFFFF_FFFF]
    for _ in range(40):
        head = struct.pack("<IIII", DEV_MGR_MAGIC_VERSION, rng.choice([0, 2, 24, rng.getrandbits(32)]),
                           rng.choice(types), 0)  # fmt: skip
        frame = head + rng.randbytes(DEV_MGR_MSG_SIZE - 16)
        with _session(uds) as s:
            s.sendall(frame)
            answer = _read_exact(s, DEV_MGR_MSG_SIZE)
            if answer:  # an error reply (AddMem/DelMem have no reply type in the codec: read it raw)
                magic, _, msg_type, flags, result = struct.unpack_from("<IIIIi", answer)
                assert (magic, msg_type, flags) == (DEV_MGR_MAGIC_VERSION, frame[8], 0), frame[:40].hex()
                assert result < 0, (frame[:40].hex(), result)
    # and after all that, a well-formed session is still served
    with _session(uds) as s:
        assert _ask(s, AddCpu((0,)).encode()) == CpuReply(MsgType.ADD_CPU, 0, 1)
        assert _ask(s, DelMmio(slot.base, slot.size, slot.gsi).encode()) == MmioReply(
            MsgType.DEL_MMIO, -ENODEV
        )


def _field(console: str, name: str) -> str:
    # not anchored at the line start: a console's first line may begin with terminal escapes
    match = re.search(rf"(?<![\w-]){name} (.*)$", console, re.MULTILINE)
    assert match, f"no {name} line on the console:\n{console[-3000:]}"
    return match.group(1).strip()


@pytest.mark.lab
def test_upcall_module_survives_a_hostile_client_on_kata_vmm(
    guest_assets: GuestAssets, tmp_path: Path
) -> None:
    uds = tmp_path / "v.sock"
    initrd = initrd_with_files(
        guest_assets.initrd_test,
        {
            "/lab/run.sh": (SCRIPTS / "upcall_guest.sh").read_text(),
            f"/lab/{MODULE}": guest_assets.upcall_module.read_bytes(),
            "/lab/vsock_helper": build_vsock_helper(tmp_path / "vsock_helper"),
        },
        tmp_path / "initrd",
    )
    config = GuestConfig(
        kernel=guest_assets.kernel,
        initrd=initrd,
        cmdline="console=ttyS0 quiet panic=-1 lab.run=/lab/run.sh",
        memory_mib=512,
        extra_args={"kata-vmm": ["--timeout", "600", "--vsock", str(uds)]},
    )
    factory = MicroVMFactory(tmp_path, KataVmmBackend(), guest_assets)
    try:
        vm = factory.build(config).spawn()
        vm.wait_for_console("UPCALL-READY", timeout=300)
        _hostile_client(uds)
        vsock_echo(uds, b"done")  # releases the guest script
        vm.wait_for_console("UPCALL-SCRIPT-DONE", timeout=300)
        assert vm.wait_exit(timeout=60) == 0, vm.stderr
    finally:
        factory.kill_all()
    console = vm.console
    print(console[-4000:])
    assert _field(console, "UPCALL-INSMOD") == "0"
    assert _field(console, "UPCALL-LSMOD") == "1"
    assert _field(console, "UPCALL-THREAD") == "1"
    assert _field(console, "UPCALL-LSMOD-AFTER") == "1"
    assert _field(console, "UPCALL-MMIO-LEFT") == "0"
    assert _field(console, "UPCALL-OOPS") == "0"
    assert _field(console, "UPCALL-RMMOD") == "0"


@pytest.mark.lab
def test_sandbox_initramfs_loads_the_upcall_module_before_the_agent(
    guest_assets: GuestAssets, tmp_path: Path
) -> None:
    sandbox_root, uds = guest_assets.rootfs_sandbox, tmp_path / "v.sock"
    config = GuestConfig(
        kernel=guest_assets.kernel,
        initrd=guest_assets.initrd_sandbox,
        cmdline="console=ttyS0 reboot=k panic=1 lab.noagent=1",  # not quiet: the module's line shows
        memory_mib=512,
        extra_args={"kata-vmm": ["--timeout", "600", "--block", f"{sandbox_root},ro", "--vsock", str(uds)]},
    )
    factory = MicroVMFactory(tmp_path, KataVmmBackend(), guest_assets)
    try:
        vm = factory.build(config).spawn()
        vm.wait_for_console("KATA-SANDBOX-READY", timeout=300)
        vm.wait_exit(timeout=60)
    finally:
        factory.kill_all()
    console = vm.console
    assert "kata_upcall_srv: listening on vsock port 219" in console, console[-3000:]
    assert "insmod kata_upcall_srv.ko failed" not in console


def _hotplug_in_process(
    guest_assets: GuestAssets,
    tmp_path: Path,
    script: str,
    prefix: str,
    body: Callable[[Vmm, Console, UpcallClient], Awaitable[None]],
    *,
    max_vcpus: int = 0,
) -> str:
    """`boot_with_upcall` running scripts/``script``."""
    files = {"/lab/run.sh": (SCRIPTS / script).read_text()}
    return boot_with_upcall(guest_assets, tmp_path, files, prefix, body, max_vcpus=max_vcpus)


@pytest.mark.lab
def test_hot_added_disk_appears_in_the_guest_and_goes_away_on_removal(
    guest_assets: GuestAssets, tmp_path: Path
) -> None:
    """The guest boots with only a vsock device and the module; the host hot-adds a read-only virtio-blk
    disk through upcall, the guest sees /dev/vda with the disk's bytes, the host removes it and the guest
    sees it go."""
    disk = tmp_path / "hot.img"
    payload = os.urandom(1 << 20)
    disk.write_bytes(payload)

    async def plug_and_unplug(vmm: Vmm, console: Console, upcall: UpcallClient) -> None:
        slot = await hot_add_virtio(vmm, BlockSpec(disk, read_only=True).build(), upcall)
        assert slot.index == 1  # the vsock device holds slot 0
        await trio.to_thread.run_sync(console.wait_for, "^HOT-VDA ", vmm, 300)
        await hot_remove_virtio(vmm, slot, upcall)

    text = _hotplug_in_process(guest_assets, tmp_path, "hotplug_guest.sh", "HOT", plug_and_unplug)
    assert _field(text, "HOT-INSMOD") == "0"
    assert _field(text, "HOT-VDA") == f"{hashlib.sha256(payload[:65536]).hexdigest()} ro=1"
    assert _field(text, "HOT-GONE") == "yes"
    assert _field(text, "HOT-MMIO-LEFT") == "0"
    assert _field(text, "HOT-OOPS") == "0"


@pytest.mark.lab
def test_hot_added_vcpu_comes_online_in_the_guest_and_goes_offline_on_removal(
    guest_assets: GuestAssets, tmp_path: Path
) -> None:
    """1 vCPU and max_vcpus=2 (the MADT lists APIC id 1 Online Capable): the host creates vCPU 1 and sends
    AddCpu, the guest's online CPUs become 0-1; DelCpu takes it back to 0."""

    async def add_and_remove(vmm: Vmm, console: Console, upcall: UpcallClient) -> None:
        assert await hot_add_vcpus(vmm, 1, upcall) == (1,)
        await trio.to_thread.run_sync(console.wait_for, "^CPU-ADDED ", vmm, 300)
        assert await hot_remove_vcpus(vmm, 1, upcall) == (1,)

    text = _hotplug_in_process(
        guest_assets, tmp_path, "cpu_hotplug_guest.sh", "CPU", add_and_remove, max_vcpus=2
    )
    assert _field(text, "CPU-INSMOD") == "0"
    assert _field(text, "CPU-BEFORE") == "0 possible 0-1"
    assert _field(text, "CPU-ADDED") == "0-1 nproc 2"
    assert _field(text, "CPU-REMOVED") == "0 nproc 1"
    assert _field(text, "CPU-OOPS") == "0"


def _boot_under_tcg(tmp_path: Path, files: dict[str, bytes | str]) -> str:
    """initrd-test.img plus ``files`` (``/lab/run.sh`` runs) under QEMU TCG on the host; the console."""
    assets = GuestAssets()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 missing (./dev installs qemu-system-x86)", pytrace=False)
    initrd = initrd_with_files(assets.initrd_test, files, tmp_path / "initrd")
    command = [
        qemu, "-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "2", "-nodefaults",
        "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(assets.kernel),
        "-initrd", str(initrd), "-append", "console=ttyS0 quiet panic=-1 lab.run=/lab/run.sh",
    ]  # fmt: skip
    for _ in range(3):  # a reset before the kernel's first byte is TCG's, not the guest's (lab/README.md)
        done = subprocess.run(
            command, capture_output=True, text=True, errors="replace", timeout=280, check=False
        )
        console = done.stdout
        if "Linux version" in console or "TCG-" in console or not console.rstrip().endswith("ROM..."):
            break
    print(console[-3000:])
    return console


def _vsock_loopback() -> bytes:
    assets = GuestAssets()
    moddir = assets.root / "modules/lib/modules" / assets.kernel_release
    return (moddir / "kernel/net/vmw_vsock/vsock_loopback.ko").read_bytes()


TCG_OOPS = "$(dmesg | grep -c -E 'BUG:|Oops|WARNING:|general protection|Call Trace')"

TCG_SCRIPT = f"""#!/bin/sh
insmod /lab/kata_upcall_srv.ko
echo "TCG-INSMOD $?"
echo "TCG-THREAD $(cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^kata-upcall$')"
insmod /lab/vsock_loopback.ko
echo d | /lab/vsock_helper send 1 219 > /tmp/answer 2>/dev/null
echo "TCG-LOOPBACK-ANSWER $(wc -c < /tmp/answer)"
echo "TCG-REFUSED $(dmesg | grep -c 'connection from cid 1 refused')"
rmmod kata_upcall_srv
echo "TCG-RMMOD $?"
echo "TCG-THREAD-AFTER $(cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^kata-upcall$')"
echo "TCG-OOPS {TCG_OOPS}"
dmesg | grep kata_upcall_srv | sed 's/^/TCG-DMESG /'
"""


@pytest.mark.guest_assets
def test_upcall_module_loads_refuses_guest_peers_and_unloads_under_tcg(tmp_path: Path) -> None:
    console = _boot_under_tcg(
        tmp_path,
        {
            "/lab/run.sh": TCG_SCRIPT,
            f"/lab/{MODULE}": GuestAssets().upcall_module.read_bytes(),
            "/lab/vsock_loopback.ko": _vsock_loopback(),
            "/lab/vsock_helper": build_vsock_helper(tmp_path / "vsock_helper"),
        },
    )
    assert _field(console, "TCG-INSMOD") == "0"
    assert _field(console, "TCG-THREAD") == "1"
    assert _field(console, "TCG-LOOPBACK-ANSWER") == "0"  # closed without a Connect frame
    assert _field(console, "TCG-REFUSED") == "1"
    assert _field(console, "TCG-RMMOD") == "0"
    assert _field(console, "TCG-THREAD-AFTER") == "0"
    assert _field(console, "TCG-OOPS") == "0"


PROBE_SCRIPT = f"""#!/bin/sh
insmod /lab/vsock_loopback.ko
insmod /lab/kata_upcall_srv.ko
/lab/upcall_probe /lab/frames.bin
echo "TCG-CPUS-AFTER $(cat /sys/devices/system/cpu/online) $(cat /sys/devices/system/cpu/present)"
echo "TCG-MMIO-LEFT $(ls /sys/bus/platform/devices | grep -c '^virtio-mmio\\..*auto$')"
echo "TCG-OOPS {TCG_OOPS}"
rmmod kata_upcall_srv
echo "TCG-RMMOD $?"
dmesg | grep -E 'kata_upcall_srv|virtio-mmio|smpboot|APIC' | sed 's/^/TCG-DMESG /'
"""


@pytest.mark.guest_assets
def test_upcall_service_hot_removes_and_adds_a_vcpu_and_rejects_bad_requests_under_tcg(
    tmp_path: Path,
) -> None:
    """The device-manager service driven from inside a 2-vCPU TCG guest through vsock loopback, by a copy of
    the module built to answer CID 1 (the shipped one answers the host only): vCPU 1 goes offline and
    away, and comes back through acpi_map_cpu; every bad request gets its errno and the last, garbage,
    closes the connection; a frame cut short is closed after the module's 10 s."""
    module = images.build_upcall_module(tmp_path / "loopback", kcflags="-DKATA_UPCALL_PEER_CID=1")
    probe = tmp_path / "upcall_probe"
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(probe), str(SCRIPTS / "upcall_probe.c")],
        check=True,
        capture_output=True,
    )
    empty = (0xD000_5000, 0x1000, 10)  # nothing there: reads 0 on q35, so virtio_mmio's probe fails
    bad_size = _with_header(AddMmio(*empty).encode(), size=7)
    requests: list[tuple[bytes, str]] = [
        (AddMmio(*empty).encode(), "type=5 size=0 ret=-19"),
        (DelMmio(*empty).encode(), "type=6 size=0 ret=-19"),
        (AddMmio(0x1000, 0x1000, 10).encode(), "type=5 size=0 ret=-19"),  # RAM: the window is taken
        (bad_size, "type=5 size=0 ret=-22"),
        (DelCpu((1,)).encode(), "type=2 size=4 ret=0 index=1"),
        (AddCpu((1,)).encode(), "type=1 size=4 ret=0 index=1"),
        (AddCpu((1,)).encode(), "type=1 size=4 ret=0 index=1"),  # online already
        (AddCpu((5,)).encode(), "type=1 size=4 ret=-22 index=0"),  # past possible_cpus (2)
        (DelCpu((0,)).encode(), "type=2 size=4 ret=-1 index=0"),  # the boot CPU stays
        (AddCpu((0xFF,)).encode(), "type=1 size=4 ret=-22 index=0"),
        (AddPci(0, 8).encode(), "type=7 size=0 ret=-95"),
        (os.urandom(DEV_MGR_MSG_SIZE), "n=0"),  # garbage: closed
    ]
    console = _boot_under_tcg(
        tmp_path,
        {
            "/lab/run.sh": PROBE_SCRIPT,
            f"/lab/{MODULE}": module.read_bytes(),
            "/lab/vsock_loopback.ko": _vsock_loopback(),
            "/lab/upcall_probe": probe.read_bytes(),
            "/lab/frames.bin": b"".join(frame for frame, _ in requests),
        },
    )
    assert (
        _field(console, "PROBE-CONNECT") == f"n=1024 magic={DEV_MGR_MAGIC_VERSION:#x} size=0 type=0 flags=0"
    )
    for i, (_, want) in enumerate(requests):
        assert want in _field(console, f"PROBE-REPLY {i}"), (i, want)
    assert _field(console, "PROBE-PARTIAL") == "n=0"  # a frame cut short: closed, no reply
    assert _field(console, "TCG-CPUS-AFTER") == "0-1 0-1"
    assert _field(console, "TCG-MMIO-LEFT") == "0"
    assert _field(console, "TCG-OOPS") == "0"
    assert _field(console, "TCG-RMMOD") == "0"
