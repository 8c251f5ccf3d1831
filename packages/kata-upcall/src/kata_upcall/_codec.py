"""The dbs-upcall wire format: hybrid vsock handshake lines and the device-manager service's frames.

Layouts follow the C structs both ends share (dbs-upcall ``dev_mgr_service.rs`` on the VMM side,
``dragonball_device_manager.c`` of the dragonball-experimental guest patches), x86-64, little-endian:

    frame       1024 bytes (DEV_MGR_MSG_SIZE), zero padded, VMM -> guest and guest -> VMM
    header      0x00 magic_version u32 (0x444D0100: 'DM' version 1.0), 0x04 msg_size u32 (payload bytes),
                0x08 msg_type u32, 0x0c msg_flags u32 (0)
    request     0x10 payload: MMIO {mmio_base u64, mmio_size u64, mmio_irq u32, 4 bytes tail padding} (24),
                CPU {count u8, apic_ver u8, apic_ids u8[256]} (258), PCI {busno u8, devfn u8} (2)
    reply       0x10 ret i32 (0 or a negative errno), 0x14 payload: CPU {apic_index u32} (4); msg_size counts
                the payload after ret, and is 0 when the guest failed the request or has nothing to say
    Connect     the guest's first frame on a service connection: a header with type 0, size 0, flags 0

Decoding reads untrusted bytes: anything that is not exactly such a frame raises `UpcallProtocolError`,
never another exception. Padding is not checked: the guest reuses one reply buffer, so bytes past the
payload (and a CPU index after a failure) can be stale.

Standard library only.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from kata_upcall._errors import UpcallProtocolError

#: The guest's upcall server listens on this vsock port (0xDB).
UPCALL_PORT = 219
#: Every device-manager frame, both directions, is this long.
DEV_MGR_MSG_SIZE = 0x400
#: ``'D' 'M'`` and version 1.0.
DEV_MGR_MAGIC_VERSION = 0x444D0100
#: The byte that selects the device-manager service once the vsock connection is up.
DEV_MGR_SERVICE_BYTE = b"d"
#: An ``OK <port>\n`` answer longer than this is garbage (a u32 port needs 14 bytes).
MAX_ACCEPT_LINE = 64
#: Size of the CPU request's APIC id array; ``count`` is a u8, so at most 255 of them are used.
APIC_IDS_LEN = 256

_HEADER = struct.Struct("<IIII")
_MMIO = struct.Struct("<QQI4x")  # repr(C): u64, u64, u32, then tail padding to the 8-byte alignment
_CPU_HEAD = struct.Struct("<BB")  # count, apic_ver; apic_ids[256] follows
_PCI = struct.Struct("<BB")
_RESULT = struct.Struct("<i")
_CPU_REPLY = struct.Struct("<I")

HEADER_SIZE = _HEADER.size  # 16
MMIO_PAYLOAD_SIZE = _MMIO.size  # 24
CPU_PAYLOAD_SIZE = _CPU_HEAD.size + APIC_IDS_LEN  # 258
PCI_PAYLOAD_SIZE = _PCI.size  # 2
CPU_REPLY_PAYLOAD_SIZE = _CPU_REPLY.size  # 4
_REPLY_PAYLOAD_AT = HEADER_SIZE + _RESULT.size  # 20

_U8, _U32, _U64 = 0xFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF


class MsgType(enum.IntEnum):
    """``msg_type`` of the device-manager header (``enum devmgr_msg_type``); a reply repeats its request's."""

    CONNECT = 0
    ADD_CPU = 1
    DEL_CPU = 2
    ADD_MEM = 3  # defined by upstream, never used: memory grows with virtio-mem
    DEL_MEM = 4
    ADD_MMIO = 5
    DEL_MMIO = 6
    ADD_PCI = 7
    DEL_PCI = 8


@dataclass(frozen=True)
class MsgHeader:
    """The 16-byte header that starts every frame (``struct devmgr_msg_header``)."""

    msg_type: int
    msg_size: int = 0
    magic_version: int = DEV_MGR_MAGIC_VERSION
    msg_flags: int = 0

    def encode(self) -> bytes:
        """The 16 header bytes."""
        return _HEADER.pack(self.magic_version, self.msg_size, self.msg_type, self.msg_flags)

    @classmethod
    def decode(cls, data: bytes) -> MsgHeader:
        """The header at the start of ``data``, unchecked; `UpcallProtocolError` if shorter than 16 bytes."""
        if len(data) < HEADER_SIZE:
            raise UpcallProtocolError(f"upcall header needs {HEADER_SIZE} bytes, got {len(data)}")
        magic, size, msg_type, flags = _HEADER.unpack_from(data)
        return cls(msg_type=msg_type, msg_size=size, magic_version=magic, msg_flags=flags)


def _frame(msg_type: MsgType, payload: bytes, msg_size: int) -> bytes:
    head = MsgHeader(msg_type=msg_type, msg_size=msg_size).encode()
    return (head + payload).ljust(DEV_MGR_MSG_SIZE, b"\0")


def _header_of(frame: bytes, what: str) -> tuple[MsgHeader, MsgType]:
    """Header checks every frame gets: length, magic, flags, a known type."""
    if len(frame) != DEV_MGR_MSG_SIZE:
        raise UpcallProtocolError(f"upcall {what} frame of {len(frame)} bytes, want {DEV_MGR_MSG_SIZE}")
    header = MsgHeader.decode(frame)
    if header.magic_version != DEV_MGR_MAGIC_VERSION:
        raise UpcallProtocolError(
            f"upcall {what} magic {header.magic_version:#010x}, want {DEV_MGR_MAGIC_VERSION:#010x}"
        )
    if header.msg_flags != 0:
        raise UpcallProtocolError(f"upcall {what} flags {header.msg_flags:#x}, want 0")
    try:
        msg_type = MsgType(header.msg_type)
    except ValueError:
        raise UpcallProtocolError(f"upcall {what} of unknown type {header.msg_type:#x}") from None
    return header, msg_type


def _check_range(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise ValueError(f"{name} {value} out of range 0..{top:#x}")


# -- requests (VMM -> guest) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MmioRequest:
    mmio_base: int
    mmio_size: int
    mmio_irq: int

    MSG_TYPE: ClassVar[MsgType]

    def __post_init__(self) -> None:
        _check_range("mmio_base", self.mmio_base, _U64)
        _check_range("mmio_size", self.mmio_size, _U64)
        _check_range("mmio_irq", self.mmio_irq, _U32)

    def encode(self) -> bytes:
        """The 1024-byte frame (msg_size 24)."""
        payload = _MMIO.pack(self.mmio_base, self.mmio_size, self.mmio_irq)
        return _frame(self.MSG_TYPE, payload, MMIO_PAYLOAD_SIZE)


@dataclass(frozen=True)
class AddMmio(_MmioRequest):
    """Register a virtio-mmio device: window at ``mmio_base``, ``mmio_size`` bytes, interrupt ``mmio_irq``."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ADD_MMIO


@dataclass(frozen=True)
class DelMmio(_MmioRequest):
    """Unregister the virtio-mmio device with exactly this window and interrupt."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.DEL_MMIO


@dataclass(frozen=True)
class _CpuRequest:
    apic_ids: tuple[int, ...]
    apic_ver: int = 0

    MSG_TYPE: ClassVar[MsgType]

    def __post_init__(self) -> None:
        object.__setattr__(self, "apic_ids", tuple(self.apic_ids))
        if len(self.apic_ids) > _U8:
            raise ValueError(f"{len(self.apic_ids)} APIC ids, at most {_U8} fit the u8 count")
        for apic_id in self.apic_ids:
            _check_range("APIC id", apic_id, _U8)
        _check_range("apic_ver", self.apic_ver, _U8)

    @property
    def count(self) -> int:
        """The request's ``count``: how many vCPUs (``apic_ids``) it names."""
        return len(self.apic_ids)

    def encode(self) -> bytes:
        """The 1024-byte frame (msg_size 258)."""
        payload = _CPU_HEAD.pack(self.count, self.apic_ver) + bytes(self.apic_ids).ljust(APIC_IDS_LEN, b"\0")
        return _frame(self.MSG_TYPE, payload, CPU_PAYLOAD_SIZE)


@dataclass(frozen=True)
class AddCpu(_CpuRequest):
    """Bring the vCPUs with these APIC ids online (the VMM has created them already)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ADD_CPU


@dataclass(frozen=True)
class DelCpu(_CpuRequest):
    """Take the vCPUs with these APIC ids offline (the VMM parks and destroys them afterwards)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.DEL_CPU


@dataclass(frozen=True)
class _PciRequest:
    busno: int
    devfn: int

    MSG_TYPE: ClassVar[MsgType]

    def __post_init__(self) -> None:
        _check_range("busno", self.busno, _U8)
        _check_range("devfn", self.devfn, _U8)

    def encode(self) -> bytes:
        """The 1024-byte frame (msg_size 2)."""
        return _frame(self.MSG_TYPE, _PCI.pack(self.busno, self.devfn), PCI_PAYLOAD_SIZE)


@dataclass(frozen=True)
class AddPci(_PciRequest):
    """Rescan PCI slot ``devfn`` on bus ``busno`` (upstream's PCI hot-plug; kept for completeness)."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.ADD_PCI


@dataclass(frozen=True)
class DelPci(_PciRequest):
    """Remove the PCI device at ``busno``/``devfn``."""

    MSG_TYPE: ClassVar[MsgType] = MsgType.DEL_PCI


Request: TypeAlias = AddMmio | DelMmio | AddCpu | DelCpu | AddPci | DelPci


def decode_request(frame: bytes) -> Request:
    """The request in a 1024-byte frame (what the guest's server reads); `UpcallProtocolError` otherwise."""
    header, msg_type = _header_of(frame, "request")
    want = _REQUEST_SIZES.get(msg_type)
    if want is None:
        raise UpcallProtocolError(f"upcall request of type {msg_type.name} has no payload defined")
    if header.msg_size != want:
        raise UpcallProtocolError(
            f"upcall {msg_type.name} request says msg_size {header.msg_size}, want {want}"
        )
    at = HEADER_SIZE
    if msg_type in (MsgType.ADD_MMIO, MsgType.DEL_MMIO):
        base, size, irq = _MMIO.unpack_from(frame, at)
        return (AddMmio if msg_type is MsgType.ADD_MMIO else DelMmio)(base, size, irq)
    if msg_type in (MsgType.ADD_CPU, MsgType.DEL_CPU):
        count, apic_ver = _CPU_HEAD.unpack_from(frame, at)
        ids_at = at + _CPU_HEAD.size
        apic_ids = tuple(frame[ids_at : ids_at + count])
        return (AddCpu if msg_type is MsgType.ADD_CPU else DelCpu)(apic_ids, apic_ver)
    busno, devfn = _PCI.unpack_from(frame, at)
    return (AddPci if msg_type is MsgType.ADD_PCI else DelPci)(busno, devfn)


_REQUEST_SIZES = {
    MsgType.ADD_MMIO: MMIO_PAYLOAD_SIZE,
    MsgType.DEL_MMIO: MMIO_PAYLOAD_SIZE,
    MsgType.ADD_CPU: CPU_PAYLOAD_SIZE,
    MsgType.DEL_CPU: CPU_PAYLOAD_SIZE,
    MsgType.ADD_PCI: PCI_PAYLOAD_SIZE,
    MsgType.DEL_PCI: PCI_PAYLOAD_SIZE,
}


# -- guest -> VMM ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connect:
    """The guest's first frame on a device-manager connection: the service is ready for requests."""

    def encode(self) -> bytes:
        """The 1024-byte frame (type 0, size 0)."""
        return _frame(MsgType.CONNECT, b"", 0)


def decode_connect(frame: bytes) -> Connect:
    """The guest's Connect frame; `UpcallProtocolError` for anything else (checked as upstream does:
    magic, type 0, size 0, flags 0)."""
    header, msg_type = _header_of(frame, "service")
    if msg_type is not MsgType.CONNECT or header.msg_size != 0:
        raise UpcallProtocolError(
            f"upcall service sent type {msg_type.name} size {header.msg_size} where Connect was due"
        )
    return Connect()


def _check_result(result: int) -> None:
    if not -0x8000_0000 <= result <= 0x7FFF_FFFF:
        raise ValueError(f"result {result} is not an i32")


@dataclass(frozen=True)
class MmioReply:
    """The guest's answer to `AddMmio` / `DelMmio`: ``result`` 0 or a negative errno."""

    msg_type: MsgType
    result: int

    def __post_init__(self) -> None:
        if self.msg_type not in (MsgType.ADD_MMIO, MsgType.DEL_MMIO):
            raise ValueError(f"not an MMIO reply type: {self.msg_type!r}")
        _check_result(self.result)

    def encode(self) -> bytes:
        """The 1024-byte frame (msg_size 0)."""
        return _frame(self.msg_type, _RESULT.pack(self.result), 0)


@dataclass(frozen=True)
class CpuReply:
    """The guest's answer to `AddCpu` / `DelCpu`: ``result`` 0 or a negative errno; ``apic_id_index`` the
    index in ``apic_ids`` of the first vCPU not done (``count`` when all were), None when the guest sent
    none (msg_size 0: it failed before or while acting)."""

    msg_type: MsgType
    result: int
    apic_id_index: int | None = None

    def __post_init__(self) -> None:
        if self.msg_type not in (MsgType.ADD_CPU, MsgType.DEL_CPU):
            raise ValueError(f"not a CPU reply type: {self.msg_type!r}")
        _check_result(self.result)
        if self.apic_id_index is not None:
            _check_range("apic_id_index", self.apic_id_index, _U32)

    def encode(self) -> bytes:
        """The 1024-byte frame (msg_size 4 with an index, else 0)."""
        if self.apic_id_index is None:
            return _frame(self.msg_type, _RESULT.pack(self.result), 0)
        payload = _RESULT.pack(self.result) + _CPU_REPLY.pack(self.apic_id_index)
        return _frame(self.msg_type, payload, CPU_REPLY_PAYLOAD_SIZE)


@dataclass(frozen=True)
class PciReply:
    """The guest's answer to `AddPci` / `DelPci`: ``result`` 0 or a negative errno."""

    msg_type: MsgType
    result: int

    def __post_init__(self) -> None:
        if self.msg_type not in (MsgType.ADD_PCI, MsgType.DEL_PCI):
            raise ValueError(f"not a PCI reply type: {self.msg_type!r}")
        _check_result(self.result)

    def encode(self) -> bytes:
        """The 1024-byte frame (msg_size 0)."""
        return _frame(self.msg_type, _RESULT.pack(self.result), 0)


Reply: TypeAlias = MmioReply | CpuReply | PciReply


def decode_reply(frame: bytes) -> Reply:
    """The reply in a 1024-byte frame from the guest; `UpcallProtocolError` for anything else."""
    header, msg_type = _header_of(frame, "reply")
    (result,) = _RESULT.unpack_from(frame, HEADER_SIZE)
    if msg_type in (MsgType.ADD_CPU, MsgType.DEL_CPU):
        if header.msg_size == CPU_REPLY_PAYLOAD_SIZE:
            (index,) = _CPU_REPLY.unpack_from(frame, _REPLY_PAYLOAD_AT)
            return CpuReply(msg_type, result, index)
        if header.msg_size == 0:
            return CpuReply(msg_type, result, None)
        want = f"0 or {CPU_REPLY_PAYLOAD_SIZE}"
        raise UpcallProtocolError(
            f"upcall {msg_type.name} reply says msg_size {header.msg_size}, want {want}"
        )
    if msg_type in (MsgType.ADD_MMIO, MsgType.DEL_MMIO, MsgType.ADD_PCI, MsgType.DEL_PCI):
        if header.msg_size != 0:
            raise UpcallProtocolError(f"upcall {msg_type.name} reply says msg_size {header.msg_size}, want 0")
        if msg_type in (MsgType.ADD_MMIO, MsgType.DEL_MMIO):
            return MmioReply(msg_type, result)
        return PciReply(msg_type, result)
    raise UpcallProtocolError(f"upcall reply of type {msg_type.name}: no request of that type is ever sent")


# -- hybrid vsock handshake --------------------------------------------------------------------------------


def encode_hybrid_connect(port: int = UPCALL_PORT) -> bytes:
    """``CONNECT <port>\\n``: the first line on a hybrid vsock UDS (Firecracker's protocol, as dbs-upcall)."""
    _check_range("vsock port", port, _U32)
    return f"CONNECT {port}\n".encode()


_ACCEPT = re.compile(rb"OK(?: ([0-9]{1,10}))?\n\Z")


def decode_accept_line(line: bytes) -> int | None:
    """The host port in the muxer's ``OK <port>\\n`` answer (None for a bare ``OK\\n``);
    `UpcallProtocolError` for any other line (upstream only checks the ``OK`` prefix)."""
    if len(line) > MAX_ACCEPT_LINE:
        raise UpcallProtocolError(f"hybrid vsock answer of {len(line)} bytes")
    match = _ACCEPT.match(line)
    if match is None:
        raise UpcallProtocolError(f"hybrid vsock answered {line[:MAX_ACCEPT_LINE]!r} to CONNECT")
    port = match.group(1)
    if port is None:
        return None
    value = int(port)
    if value > _U32:
        raise UpcallProtocolError(f"hybrid vsock answered a port out of range: {value}")
    return value
