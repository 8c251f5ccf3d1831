"""What /proc says about a process, read with the standard library only (`start` and `delete` import it)."""

from __future__ import annotations


def stat_fields(stat_path: str) -> list[bytes]:
    """The fields of a /proc/<pid>/stat file after the command name: index 0 is field 3 (state), index
    N field N + 3. OSError when it cannot be read, ValueError when it is not such a file."""
    with open(stat_path, "rb") as f:
        data = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return data[data.rindex(b")") + 2 :].split()


def start_ticks(stat_path: str) -> int:
    """Field 22 of a /proc/<pid>/stat file (starttime: clock ticks after boot); OSError when it cannot be
    read, ValueError or IndexError when it is not such a file."""
    return int(stat_fields(stat_path)[19])
