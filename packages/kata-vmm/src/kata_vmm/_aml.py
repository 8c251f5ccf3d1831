"""A small ACPI Machine Language encoder: the few terms a static DSDT needs (ACPI 6.4 §20)."""

from __future__ import annotations

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82
ROOT_CHAR = 0x5C


def pkg_length(body_len: int) -> bytes:
    """PkgLength encoding for a body of ``body_len`` bytes (the length counts its own bytes, §20.2.4)."""
    for extra in range(4):
        total = body_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < (1 << (4 + 8 * extra)):
            lead = (extra << 6) | (total & 0x0F)
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([lead]) + rest
    raise ValueError(f"AML package too long: {body_len}")


def name_seg(name: str) -> bytes:
    """A 4-character NameSeg, padded with underscores."""
    if not 1 <= len(name) <= 4 or not (name[0].isupper() or name[0] == "_"):
        raise ValueError(f"bad AML name segment {name!r}")
    return name.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: an optional root prefix and one segment (``\\_SB_``) or a bare segment."""
    if path.startswith("\\"):
        return bytes([ROOT_CHAR]) + name_seg(path[1:])
    return name_seg(path)


def integer(value: int) -> bytes:
    """The shortest integer encoding of ``value``."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < (1 << (8 * size)):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"AML integer too large: {value}")


def string(value: str) -> bytes:
    """A null-terminated ASCII string constant."""
    return bytes([STRING_PREFIX]) + value.encode("ascii") + b"\x00"


def eisa_id(value: str) -> bytes:
    """A compressed EISA id such as ``PNP0501`` (a DWord integer)."""
    if len(value) != 7:
        raise ValueError(f"bad EISA id {value!r}")
    vendor = ((ord(value[0]) - 0x40) << 10) | ((ord(value[1]) - 0x40) << 5) | (ord(value[2]) - 0x40)
    product = int(value[3:], 16)
    raw = vendor.to_bytes(2, "big") + product.to_bytes(2, "big")
    return bytes([DWORD_PREFIX]) + raw


def name(path: str, data: bytes) -> bytes:
    """``Name(path, data)``."""
    return bytes([NAME_OP]) + name_string(path) + data


def scope(path: str, *terms: bytes) -> bytes:
    """``Scope(path) { terms }``."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """``Device(path) { terms }``."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def package(*elements: bytes) -> bytes:
    """``Package() { elements }``."""
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """``Buffer() { data }``."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


# --- resource descriptors (§6.4) -------------------------------------------------------------------
def io_port(base: int, length: int) -> bytes:
    """``IO(Decode16, base, base, 1, length)`` small descriptor."""
    return bytes([0x47, 0x01]) + base.to_bytes(2, "little") * 2 + bytes([0x01, length])


def irq_no_flags(irq: int) -> bytes:
    """``IRQNoFlags() {irq}`` (edge, active high, exclusive)."""
    return bytes([0x22]) + (1 << irq).to_bytes(2, "little")


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """``Memory32Fixed(ReadWrite, base, length)`` large descriptor."""
    return (
        bytes([0x86, 9, 0, 1 if writable else 0]) + base.to_bytes(4, "little") + length.to_bytes(4, "little")
    )


def extended_interrupt(gsi: int, *, edge: bool = True, active_low: bool = False) -> bytes:
    """``Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsi}`` large descriptor."""
    flags = 0x01 | (0x02 if edge else 0) | (0x04 if active_low else 0)
    return bytes([0x89, 6, 0, flags, 1]) + gsi.to_bytes(4, "little")


def resource_template(*descriptors: bytes) -> bytes:
    """``ResourceTemplate() { descriptors }``: a buffer closed by an end tag with a zero checksum."""
    return buffer(b"".join(descriptors) + bytes([0x79, 0x00]))
