"""mountinfo parsing: the kernel's octal escapes round-trip any path (bytes), including non-ASCII names."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kata_sys_util import escape, mountinfo, mounts_below, parse_line, unescape

LINE = (
    b"36 35 98:0 /mnt1 /tmp/donn\xc3\xa9es\\0401 rw,noatime master:1 shared:7 - ext3 /dev/root "
    b"rw,errors=continue"
)
_paths = st.binary(min_size=1, max_size=64).filter(lambda b: b"\0" not in b)


def test_parse_line_keeps_utf8_and_undoes_octal_escapes() -> None:
    m = parse_line(LINE)
    assert (m.mount_id, m.parent_id, m.dev) == (36, 35, "98:0")
    assert m.mount_point == "/tmp/données 1".encode()
    assert m.path == "/tmp/données 1"
    assert m.optional == ("master:1", "shared:7")
    assert (m.fstype, m.source, m.super_options) == ("ext3", b"/dev/root", "rw,errors=continue")


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        (b"a b", b"a\\040b"),
        (b"a\tb", b"a\\011b"),
        (b"a\nb", b"a\\012b"),
        (b"a\\b", b"a\\134b"),
        ("données".encode(), "données".encode()),
        (b"\xff\xfe", b"\xff\xfe"),
    ],
)
def test_escape_matches_the_kernel(raw: bytes, escaped: bytes) -> None:
    assert escape(raw) == escaped
    assert unescape(escaped) == raw


@given(_paths)
def test_escape_round_trips_any_path(raw: bytes) -> None:
    assert unescape(escape(raw)) == raw
    assert b" " not in escape(raw) and b"\n" not in escape(raw)


@given(st.lists(_paths.map(lambda b: b"/" + b.replace(b"/", b"_")), min_size=1, max_size=5))
def test_lines_with_hostile_mount_points_parse_back(points: list[bytes]) -> None:
    for i, point in enumerate(points):
        line = b"%d 1 0:1 / %s rw - tmpfs tmpfs rw" % (i + 2, escape(point))
        assert parse_line(line).mount_point == point


def test_parse_line_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_line(b"not a mountinfo line")


@pytest.mark.root
def test_kernel_mountinfo_round_trips_non_ascii_space_and_newline_names() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mount(2))")
    base = Path(tempfile.mkdtemp(prefix="ksu-"))
    names = ["données 1", "tab\there", "new\nline", "back\\slash"]
    try:
        for name in names:
            (base / name).mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "none", str(base / name)], check=True)
        found = mounts_below(base)
        assert sorted(found) == sorted(str(base / n) for n in names)
        assert {m.path for m in mountinfo() if m.path.startswith(str(base))} == set(found)
    finally:
        for name in names:
            subprocess.run(["umount", "-l", str(base / name)], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", str(base)], check=False)
