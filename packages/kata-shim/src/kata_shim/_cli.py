"""`containerd-shim-kata-v2`: the entry point containerd runs (start, delete, or no action: run)."""

from __future__ import annotations

import sys

from kata_shim.__about__ import __version__
from kata_shim.shim._flags import UsageError, parse_flags

NAME = "containerd-shim-kata-v2"


def main(argv: list[str] | None = None) -> int:
    """Parse containerd's command line and run the action; errors go to stderr with status 1."""
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(args)
    except UsageError as err:
        print(f"{NAME}: {err}", file=sys.stderr)
        return 2
    if flags.version:
        print(f"{NAME}:\n  Version: {__version__}\n  Runtime: kata-shim (Python {sys.version.split()[0]})")
        return 0
    if flags.action == "start":
        from kata_shim.shim._start import StartError, start

        try:
            address = start(flags)
        except (StartError, OSError) as err:
            print(f"{NAME}: start: {err}", file=sys.stderr)
            return 1
        sys.stdout.write(address)
        sys.stdout.flush()
        return 0
    if flags.action == "delete":
        from kata_shim.shim._delete import delete

        try:
            data = delete(flags)
        except OSError as err:
            print(f"{NAME}: delete: {err}", file=sys.stderr)
            return 1
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    if not flags.namespace:
        print(f"{NAME}: shim namespace cannot be empty", file=sys.stderr)
        return 1
    from kata_shim.shim._run import run

    return run(flags)
