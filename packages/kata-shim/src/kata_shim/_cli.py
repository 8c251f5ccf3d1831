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
        from kata_shim.shim._zygote import delete_via_zygote

        status = delete_via_zygote(args)  # in a fork of the zygote, everything imported: or here
        if status is not None:
            return status
        from kata_shim.shim._delete import delete_command

        return delete_command(flags)
    if not flags.namespace:
        print(f"{NAME}: shim namespace cannot be empty", file=sys.stderr)
        return 1
    from kata_shim.shim._run import exit_now, run

    exit_now(run(flags))


def _containerd_version() -> str | None:
    """`containerd --version` of the containerd on PATH, None without one."""
    import shutil
    import subprocess

    binary = shutil.which("containerd")
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def admin_main(argv: list[str] | None = None) -> int:
    """`kata-shim install | uninstall`: put the shim, guest assets and configuration into a host."""
    import argparse  # here: containerd's `start` path imports this module and must stay light
    from pathlib import Path

    from kata_shim._install import (
        InstallError,
        Layout,
        containerd_config_version,
        containerd_snippet,
        install,
        uninstall,
    )

    parser = argparse.ArgumentParser(prog="kata-shim", description="install the shim for a host's containerd")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser(
        "install", help="shim on PATH, guest assets, configuration; prints containerd's snippet"
    )
    add.add_argument(
        "--assets", type=Path, required=True, help="guest assets (`nox -s images`: build/lab/guest)"
    )
    add.add_argument(
        "--prefix", type=Path, help="self-contained layout under this directory (e.g. /opt/kata)"
    )
    add.add_argument("--force", action="store_true", help="replace files that kata-shim did not install")
    add.add_argument(
        "--containerd-config-version",
        type=int,
        choices=(2, 3),
        help="the containerd snippet's configuration version (default: from `containerd --version`)",
    )
    remove = sub.add_parser("uninstall", help="remove exactly what install created")
    remove.add_argument("--prefix", type=Path, help="the --prefix given to install")
    args = parser.parse_args(argv)
    layout = Layout.for_prefix(args.prefix)
    try:
        if args.command == "install":
            lines = install(args.assets, layout, force=args.force)
        else:
            lines = uninstall(layout)
    except (InstallError, OSError) as err:
        print(f"kata-shim {args.command}: {err}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    if args.command == "install":
        print(f"\n{NAME} is in {layout.bin_dir}; with that directory on containerd's PATH")
        print("(/usr/local/bin is), `ctr run --runtime io.containerd.kata.v2 IMAGE ID` runs in a VM.")
        version = args.containerd_config_version or containerd_config_version(_containerd_version())
        print(
            "For CRI (Kubernetes), add this to /etc/containerd/config.toml (a file of `version ="
            f" {version}`, containerd {'2.x' if version == 3 else '1.6/1.7'}; --containerd-config-version"
            " picks the other) and restart containerd:\n"
        )
        print(containerd_snippet(layout, version), end="")
    return 0
