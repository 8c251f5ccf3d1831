"""Snapshot files: the VM's KVM state (vCPUs, irqchip, PIT, clock) as versioned, self-describing JSON.

A snapshot is a directory::

    snapshot.json     the manifest, written last (a directory without it is not a snapshot)
    memory-0.bin      guest RAM, one sparse raw file per region (`GuestMemoryMmap.save`)
    memory-1.bin      (only when RAM is split around the MMIO gap)

``snapshot.json`` is one JSON object: ``format`` (``"kata-vmm-snapshot"``), ``version`` (`SNAPSHOT_VERSION`;
any other is refused with a `SnapshotError` naming both), ``config`` (vCPUs, MiB, kernel, command line),
``memory`` (guest address, size and file of each region), ``vm`` (PIC master, PIC slave, IOAPIC, PIT2,
kvmclock), ``vcpus`` (per vCPU: CPUID, mp_state, regs, sregs, fpu, xsave, xcrs, debug registers, LAPIC,
MSRs, vCPU events, TSC kHz), ``serial`` (the 16550's registers) and ``devices`` (per virtio-mmio slot: the
spec it was built from and the transport's `save`). Each kernel struct is stored as
``{"struct": "kvm_regs", "size": 144, "data": "<base64>"}``: its C name and size are checked on restore, so
a file from a kernel ABI with another layout is refused, never misread.

What is saved and the restore order follow Firecracker's ``vstate`` (``vcpu.rs``, ``vm.rs``): mp_state first
on save (reading it settles pending INIT/SIPI), the MSRs KVM lists in KVM_GET_MSR_INDEX_LIST without those
it cannot give back; on restore CPUID first, the TSC before the TSC deadline, the vCPU events last.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kata_virtio import VirtioDevice
from kata_vmm._bindings import kvm as k
from kata_vmm._errors import KvmError, SnapshotError
from kata_vmm._kvm import Kvm, Vcpu, Vm
from kata_vmm._specs import BalloonSpec, BlockSpec, DeviceSpec, FsSpec, NetSpec, RngSpec, VsockSpec

SNAPSHOT_FORMAT = "kata-vmm-snapshot"
SNAPSHOT_VERSION = 1
"""The one format version this kata-vmm writes and reads."""
MANIFEST_NAME = "snapshot.json"
MAX_MANIFEST_BYTES = 16 << 20

MSR_IA32_TSC = 0x10
MSR_IA32_FEATURE_CONTROL = 0x3A  # not exported by Linux: Firecracker's denylist
MSR_IA32_MCG_CTL = 0x17B  # listed by KVM, refused on write unless MCG_CTL_P: Firecracker's denylist
MSR_IA32_TSC_DEADLINE = 0x6E0  # only meaningful after the TSC it is compared with

_S = TypeVar("_S", bound=ctypes.Structure)


# --- structs as JSON -------------------------------------------------------------------------------


def struct_blob(obj: ctypes.Structure) -> dict[str, Any]:
    """A kernel struct as ``{"struct": C name, "size": bytes, "data": base64}``."""
    return {
        "struct": type(obj).__name__,
        "size": ctypes.sizeof(obj),
        "data": base64.b64encode(bytes(obj)).decode(),
    }


def struct_from_blob(blob: Any, cls: type[_S]) -> _S:
    """The struct `struct_blob` wrote; `SnapshotError` unless name, size and data fit ``cls``."""
    data = _blob_data(blob, cls.__name__, ctypes.sizeof(cls))
    return cls.from_buffer_copy(data)


def array_blob(items: list[_S], cls: type[_S]) -> dict[str, Any]:
    """A list of one struct type, concatenated (CPUID entries)."""
    return {
        "struct": cls.__name__,
        "size": ctypes.sizeof(cls),
        "count": len(items),
        "data": base64.b64encode(b"".join(bytes(i) for i in items)).decode(),
    }


def array_from_blob(blob: Any, cls: type[_S], max_count: int) -> list[_S]:
    """The list `array_blob` wrote (at most ``max_count`` entries)."""
    if not isinstance(blob, dict) or not isinstance(blob.get("count"), int):
        raise SnapshotError(f"{cls.__name__} list is not a struct array")
    count = blob["count"]
    if not 0 <= count <= max_count:
        raise SnapshotError(f"{count} {cls.__name__} entries (at most {max_count})")
    size = ctypes.sizeof(cls)
    data = _blob_data({**blob, "size": blob.get("size")}, cls.__name__, size, total=size * count)
    return [cls.from_buffer_copy(data, i * size) for i in range(count)]


def _blob_data(blob: Any, name: str, size: int, total: int | None = None) -> bytes:
    if not isinstance(blob, dict) or blob.get("struct") != name:
        raise SnapshotError(f"expected a {name}, found {_describe(blob)}")
    if blob.get("size") != size:
        raise SnapshotError(f"{name} is {blob.get('size')} bytes in the snapshot, {size} here")
    try:
        data = base64.b64decode(blob["data"], validate=True)
    except (KeyError, TypeError, ValueError) as err:
        raise SnapshotError(f"{name} data is not base64") from err
    if len(data) != (size if total is None else total):
        raise SnapshotError(f"{name} data holds {len(data)} bytes, not {size if total is None else total}")
    return data


def _describe(blob: Any) -> str:
    return repr(blob.get("struct")) if isinstance(blob, dict) else type(blob).__name__


# --- vCPU and VM state ---------------------------------------------------------------------------


def msrs_to_save(kvm: Kvm) -> list[int]:
    """The MSRs a snapshot carries: KVM_GET_MSR_INDEX_LIST less Firecracker's denylist (IA32_FEATURE_CONTROL,
    IA32_MCG_CTL); `save_vcpu` also leaves out any KVM refuses to read for this vCPU's CPUID (the PMU's
    when the CPUID hides the PMU), so what is saved can be set again on a vCPU given the same CPUID."""
    return [i for i in kvm.msr_index_list() if i not in (MSR_IA32_FEATURE_CONTROL, MSR_IA32_MCG_CTL)]


def save_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> dict[str, Any]:
    """Every piece of a paused vCPU's state KVM holds (mp_state first: reading it settles INIT/SIPI)."""
    mp_state = vcpu.get_mp_state()
    return {
        "id": vcpu.id,
        "mp_state": mp_state,
        "regs": struct_blob(vcpu.get_regs()),
        "sregs": struct_blob(vcpu.get_sregs()),
        "fpu": struct_blob(vcpu.get_fpu()),
        "xsave": struct_blob(vcpu.get_xsave()),
        "xcrs": struct_blob(vcpu.get_xcrs()),
        "debugregs": struct_blob(vcpu.get_debugregs()),
        "lapic": struct_blob(vcpu.get_lapic()),
        "tsc_khz": vcpu.get_tsc_khz(),
        "cpuid": array_blob(vcpu.get_cpuid2(), k.kvm_cpuid_entry2),
        "msrs": [[index, value] for index, value in vcpu.get_all_msrs(msr_indices).items()],
        "vcpu_events": struct_blob(vcpu.get_vcpu_events()),
    }


def restore_vcpu(vcpu: Vcpu, state: dict[str, Any]) -> None:
    """Put `save_vcpu`'s state into a fresh vCPU, in the order KVM needs it."""
    try:
        cpuid = array_from_blob(state["cpuid"], k.kvm_cpuid_entry2, 256)
        regs = struct_from_blob(state["regs"], k.kvm_regs)
        sregs = struct_from_blob(state["sregs"], k.kvm_sregs)
        fpu = struct_from_blob(state["fpu"], k.kvm_fpu)
        xsave = struct_from_blob(state["xsave"], k.kvm_xsave)
        xcrs = struct_from_blob(state["xcrs"], k.kvm_xcrs)
        debugregs = struct_from_blob(state["debugregs"], k.kvm_debugregs)
        lapic = struct_from_blob(state["lapic"], k.kvm_lapic_state)
        events = struct_from_blob(state["vcpu_events"], k.kvm_vcpu_events)
        mp_state = _uint(state["mp_state"], 32, "mp_state")
        tsc_khz = _uint(state["tsc_khz"], 32, "tsc_khz")
        msrs = {_uint(i, 32, "MSR index"): _uint(v, 64, "MSR value") for i, v in state["msrs"]}
    except (KeyError, TypeError, ValueError) as err:
        raise SnapshotError(f"vCPU state is incomplete: {err!r}") from err
    # the TSC before the deadline compared with it
    ordered = {i: v for i, v in msrs.items() if i != MSR_IA32_TSC_DEADLINE}
    if MSR_IA32_TSC_DEADLINE in msrs:
        ordered[MSR_IA32_TSC_DEADLINE] = msrs[MSR_IA32_TSC_DEADLINE]
    vcpu.set_cpuid2(cpuid)
    if tsc_khz and tsc_khz != vcpu.get_tsc_khz():
        vcpu.set_tsc_khz(tsc_khz)
    vcpu.set_mp_state(mp_state)
    vcpu.set_regs(regs)
    vcpu.set_sregs(sregs)
    vcpu.set_fpu(fpu)
    vcpu.set_xsave(xsave)
    if xcrs.nr_xcrs:  # KVM reports none on a host CPU without XSAVE, and refuses to set them there
        vcpu.set_xcrs(xcrs)
    vcpu.set_debugregs(debugregs)
    vcpu.set_lapic(lapic)
    vcpu.set_msrs(ordered)
    vcpu.set_vcpu_events(events)
    with contextlib.suppress(KvmError):  # EINVAL until the guest enabled kvmclock (and on the host's PVM)
        vcpu.kvmclock_ctrl()


IRQCHIPS = (
    ("pic_master", k.KVM_IRQCHIP_PIC_MASTER),
    ("pic_slave", k.KVM_IRQCHIP_PIC_SLAVE),
    ("ioapic", k.KVM_IRQCHIP_IOAPIC),
)


def save_vm(vm: Vm) -> dict[str, Any]:
    """The in-kernel PICs, IOAPIC, PIT and kvmclock."""
    state: dict[str, Any] = {name: struct_blob(vm.get_irqchip(chip)) for name, chip in IRQCHIPS}
    state["pit2"] = struct_blob(vm.get_pit2())
    state["clock"] = struct_blob(vm.get_clock())
    return state


def restore_vm(vm: Vm, state: dict[str, Any]) -> None:
    """Put `save_vm`'s state into a fresh VM (irqchip and PIT created). The clock goes back to the
    snapshot's value (flags 0, so KVM does not add the wall time that passed since): as if paused."""
    try:
        chips = []
        for name, chip_id in IRQCHIPS:
            chip = struct_from_blob(state[name], k.kvm_irqchip)
            if chip.chip_id != chip_id:
                raise SnapshotError(f"{name} holds irqchip {chip.chip_id}, not {chip_id}")
            chips.append(chip)
        pit = struct_from_blob(state["pit2"], k.kvm_pit_state2)
        clock = struct_from_blob(state["clock"], k.kvm_clock_data)
    except (KeyError, TypeError) as err:
        raise SnapshotError(f"VM state is incomplete: {err!r}") from err
    vm.set_pit2(pit)
    clock.flags = 0
    vm.set_clock(clock)
    for chip in chips:
        vm.set_irqchip(chip)


def _uint(value: Any, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise SnapshotError(f"{what} {value!r} is not a u{bits}")
    return value


# --- device specs ---------------------------------------------------------------------------------

_SPEC_KINDS: dict[str, Callable[[dict[str, Any]], DeviceSpec]] = {
    "vsock": lambda d: VsockSpec(Path(d["uds"]), int(d["guest_cid"])),
    "block": lambda d: BlockSpec(
        Path(d["path"]), bool(d["read_only"]), follow_symlinks=bool(d.get("follow_symlinks", True))
    ),
    "net": lambda d: NetSpec(str(d["tap"]), d["mac"]),
    "fs": lambda d: FsSpec(str(d["tag"]), Path(d["shared_dir"])),
    "rng": lambda d: RngSpec(),
    "balloon": lambda d: BalloonSpec(
        float(d["stats_interval"]), bool(d["free_page_reporting"]), bool(d["deflate_on_oom"])
    ),
}


def spec_kind(spec: DeviceSpec) -> str:
    """The name a snapshot gives a spec's device kind."""
    kinds = {VsockSpec: "vsock", BlockSpec: "block", NetSpec: "net", FsSpec: "fs", RngSpec: "rng"}
    return {**kinds, BalloonSpec: "balloon"}[type(spec)]


_KIND_OF_TYPE = {
    19: "vsock",
    2: "block",
    1: "net",
    26: "fs",
    4: "rng",
    5: "balloon",
    24: "mem",
}  # virtio 1.2 §5 device ids


def device_kind(device: VirtioDevice) -> str:
    """The kind a snapshot records for a device added without its spec (`spec_kind`'s names)."""
    return _KIND_OF_TYPE.get(device.device_type, f"virtio-{device.device_type}")


def spec_to_json(spec: DeviceSpec) -> dict[str, Any]:
    """What a snapshot records of a device spec (an open tap fd and a non-default fs policy are not
    recorded: a restore that rebuilds specs from the snapshot opens the tap by name, with the safe
    default policy)."""
    out: dict[str, Any] = {"kind": spec_kind(spec)}
    if isinstance(spec, VsockSpec):
        out.update(uds=str(spec.uds), guest_cid=spec.guest_cid)
    elif isinstance(spec, BlockSpec):
        out.update(path=str(spec.path), read_only=spec.read_only)
        if not spec.follow_symlinks:  # absent in snapshots that predate it: True
            out.update(follow_symlinks=False)
    elif isinstance(spec, NetSpec):
        out.update(tap=spec.tap, mac=spec.mac)
    elif isinstance(spec, FsSpec):
        out.update(tag=spec.tag, shared_dir=str(spec.shared_dir))
    elif isinstance(spec, BalloonSpec):
        out.update(
            stats_interval=spec.stats_interval,
            free_page_reporting=spec.free_page_reporting,
            deflate_on_oom=spec.deflate_on_oom,
        )
    return out


def spec_from_json(data: Any) -> DeviceSpec:
    """The spec `spec_to_json` recorded."""
    try:
        return _SPEC_KINDS[data["kind"]](data)
    except (KeyError, TypeError, ValueError) as err:
        raise SnapshotError(f"device spec {data!r} is not one kata-vmm records") from err


# --- the manifest ---------------------------------------------------------------------------------


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``snapshot.json`` atomically (a temporary file renamed), synced: the snapshot's last step."""
    body = json.dumps({"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, **manifest}, indent=1)
    tmp = directory / (MANIFEST_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, directory / MANIFEST_NAME)


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and check ``snapshot.json``: `SnapshotError` unless it is this format and version."""
    path = Path(directory) / MANIFEST_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise SnapshotError(f"{directory} is not a kata-vmm snapshot (no {MANIFEST_NAME})") from err
        raise SnapshotError(f"cannot open {path}: {err.strerror}") from err
    try:
        raw = os.read(fd, MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise SnapshotError(f"{path} is corrupt: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{path} is not a kata-vmm snapshot manifest")
    if manifest.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError(
            f"{path} is snapshot format version {manifest.get('version')!r}; "
            f"this kata-vmm reads version {SNAPSHOT_VERSION} only"
        )
    return manifest


def memory_file_name(index: int) -> str:
    """The file of RAM region ``index`` in a snapshot directory."""
    return f"memory-{index}.bin"
