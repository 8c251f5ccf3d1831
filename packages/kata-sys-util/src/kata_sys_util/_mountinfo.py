"""/proc/<pid>/mountinfo, parsed as bytes.

The kernel writes paths as raw bytes (UTF-8 or not) with only space, tab, newline and backslash escaped as
``\\ooo`` (fs/proc_namespace.c, ``mangle``). Parsing bytes and undoing exactly those escapes round-trips any
path; decoding the line as text first and then ``unicode_escape`` mangles every non-ASCII name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_ESCAPED = b" \t\n\\"
_OCTAL = re.compile(rb"\\([0-7]{3})")


def escape(raw: bytes) -> bytes:
    """A path as mountinfo writes it (space, tab, newline and backslash as ``\\ooo``)."""
    return b"".join(b"\\%03o" % c if c in _ESCAPED else bytes([c]) for c in raw)


def unescape(field: bytes) -> bytes:
    """The raw bytes of a mountinfo field (undoes `escape`; every other byte is kept as is)."""
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field) if b"\\" in field else field


@dataclass(frozen=True)
class MountInfo:
    """One line of mountinfo (proc(5)); paths are raw bytes."""

    mount_id: int
    parent_id: int
    dev: str
    root: bytes
    mount_point: bytes
    options: str
    optional: tuple[str, ...]
    fstype: str
    source: bytes
    super_options: str

    @property
    def path(self) -> str:
        """The mount point as a str that `os.fsencode` turns back into the same bytes."""
        return os.fsdecode(self.mount_point)


def parse_line(line: bytes) -> MountInfo:
    """One mountinfo line; `ValueError` when it does not have mountinfo's shape."""
    fields = line.rstrip(b"\n").split(b" ")
    try:
        sep = fields.index(b"-", 6)
        return MountInfo(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            dev=fields[2].decode(),
            root=unescape(fields[3]),
            mount_point=unescape(fields[4]),
            options=fields[5].decode(),
            optional=tuple(f.decode() for f in fields[6:sep]),
            fstype=unescape(fields[sep + 1]).decode(errors="surrogateescape"),
            source=unescape(fields[sep + 2]),
            super_options=b" ".join(fields[sep + 3 :]).decode(errors="surrogateescape"),
        )
    except (IndexError, ValueError) as err:
        raise ValueError(f"not a mountinfo line: {line[:200]!r}") from err


def parse_mountinfo(data: bytes) -> list[MountInfo]:
    """Every line of a mountinfo file, in order (parents before children)."""
    return [parse_line(line) for line in data.split(b"\n") if line]


def mountinfo(pid: int | str = "self") -> list[MountInfo]:
    """The mounts of `pid`'s mount namespace (default: this process)."""
    with open(f"/proc/{pid}/mountinfo", "rb") as f:
        return parse_mountinfo(f.read())


def _below(point: bytes, prefix: bytes) -> bool:
    return point == prefix or point.startswith(prefix.rstrip(b"/") + b"/")


def mounts_below(directory: str | os.PathLike[str] | bytes) -> list[str]:
    """Mount points at or below `directory`, each once, deepest first."""
    prefix = os.fsencode(directory).rstrip(b"/") or b"/"
    found = {m.mount_point for m in mountinfo() if _below(m.mount_point, prefix)}
    return [os.fsdecode(p) for p in sorted(found, key=lambda p: (p.count(b"/"), len(p)), reverse=True)]


def is_mountpoint(path: str | os.PathLike[str] | bytes) -> bool:
    """True when `path` (exactly, no symlink resolution) is a mount point in this namespace."""
    raw = os.fsencode(path).rstrip(b"/") or b"/"
    return any(m.mount_point == raw for m in mountinfo())


def find_mount(mount_id: int) -> MountInfo | None:
    """The mount with this id in this namespace (the topmost line if listed twice), or None."""
    found = None
    for m in mountinfo():
        if m.mount_id == mount_id:
            found = m
    return found
