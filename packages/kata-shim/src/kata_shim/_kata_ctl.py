"""`kata-ctl`: upstream's admin tool names, for this shim.

kata-ctl check    one PASS/FAIL line per requirement; exit status 1 when one fails
kata-ctl env      the resolved configuration: the files read and where each value came from
kata-ctl factory init|status|destroy
                  the VM template of `[factory] enable_template`: build (or rebuild) it now, say what it
                  was made from and whether it matches the configuration, remove it
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import typing
from collections.abc import Callable, Mapping
from pathlib import Path

from kata_shim.config import ConfigError, TomlConfig, find_config, load_config

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
BZIMAGE_MAGIC_OFFSET = 0x202  # Linux boot protocol: "HdrS" in the setup header
MIN_CONTAINERD = (1, 6)
DEV_KVM = Path("/dev/kvm")


@dataclasses.dataclass(frozen=True)
class Check:
    """One requirement's result."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def check_kvm(dev: Path) -> Check:
    """KVM usable: the device opens read-write and speaks API version 12 (nested or not)."""
    import fcntl

    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        return Check(
            "kvm", False, f"cannot open {dev}: {err.strerror} (load kvm_intel or kvm_amd, run as root)"
        )
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as err:
        return Check("kvm", False, f"{dev}: KVM_GET_API_VERSION failed: {err.strerror}")
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return Check("kvm", False, f"{dev}: API version {version}, expected {KVM_API_VERSION}")
    nested = ""
    for module in ("kvm_intel", "kvm_amd"):
        param = Path("/sys/module") / module / "parameters" / "nested"
        if param.exists():
            nested = f", {module} nested={param.read_text().strip()}"
    return Check("kvm", True, f"{dev} API version {version}{nested}")


def check_modules(sys_module: Path) -> Check:
    """The kernel modules the shim's VMs need on the host (kvm; tun and vhost for networking)."""
    needed = ["kvm"]
    missing = [m for m in needed if not (sys_module / m).exists()]
    if missing:
        return Check("kernel modules", False, f"not loaded: {', '.join(missing)} (modprobe them)")
    optional = [m for m in ("tun", "vhost_net", "vhost_vsock") if not (sys_module / m).exists()]
    extra = f"; not loaded (optional): {', '.join(optional)}" if optional else ""
    return Check("kernel modules", True, f"loaded: {', '.join(needed)}{extra}")


def check_cgroups(mounts: Path) -> Check:
    """A cgroup hierarchy is mounted (v2 unified or v1 controllers)."""
    try:
        text = mounts.read_text()
    except OSError as err:
        return Check("cgroups", False, f"cannot read {mounts}: {err.strerror}")
    kinds = sorted(
        {line.split()[2] for line in text.splitlines() if line.split()[2:3] in (["cgroup"], ["cgroup2"])}
    )
    if not kinds:
        return Check("cgroups", False, "no cgroup filesystem mounted")
    return Check("cgroups", True, f"mounted: {', '.join(kinds)}")


def check_containerd(run: Callable[[list[str]], str] | None = None) -> Check:
    """containerd is installed, version 1.6 or later."""
    try:
        out = (run or _run)(["containerd", "--version"])
    except (OSError, subprocess.SubprocessError) as err:
        return Check("containerd", False, f"containerd --version failed: {err}")
    found = re.search(r"\bv?(\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        return Check("containerd", False, f"no version in {out.strip()!r}")
    version = (int(found.group(1)), int(found.group(2)))
    if version < MIN_CONTAINERD:
        return Check("containerd", False, f"version {found.group(0)}, need 1.6 or later")
    return Check("containerd", True, f"version {found.group(0)}")


def check_config(env: Mapping[str, str] | None = None, defaults: list[Path] | None = None) -> list[Check]:
    """The configuration loads and its guest assets exist; the kernel is a bzImage or an ELF."""
    path, origin = find_config("", env, defaults)
    try:
        config = load_config("", env, defaults)
    except ConfigError as err:
        return [Check("configuration", False, f"{err} (install the guest assets: ./dev install)")]
    checks = [Check("configuration", True, f"{path} ({origin})")]
    kernel = config.hypervisor.kernel
    with open(kernel, "rb") as f:
        head = f.read(BZIMAGE_MAGIC_OFFSET + 4)
    bootable = head[:4] == b"\x7fELF" or head[BZIMAGE_MAGIC_OFFSET:] == b"HdrS"
    detail = f"{kernel} is {'a bzImage or ELF kernel' if bootable else 'neither a bzImage nor an ELF file'}"
    checks.append(Check("guest kernel", bootable, detail))
    for name in ("initrd", "image"):
        asset = getattr(config.hypervisor, name)
        if asset is not None:
            checks.append(Check(f"guest {name}", True, f"{asset} ({asset.stat().st_size} bytes)"))
    return checks


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def run_checks(
    dev_kvm: Path | None = None, env: Mapping[str, str] | None = None, defaults: list[Path] | None = None
) -> list[Check]:
    """Every requirement, in order."""
    return [
        check_kvm(dev_kvm or DEV_KVM),
        check_modules(Path("/sys/module")),
        check_cgroups(Path("/proc/self/mounts")),
        check_containerd(),
        *check_config(env, defaults),
    ]


def describe(config: TomlConfig) -> list[str]:
    """`kata-ctl env`: every resolved value and the file it came from (or `default`)."""
    lines = [f"# configuration: {config.path}"]
    lines += [f"# drop-in: {p}" for p in config.sources[1:]]
    tables: dict[str, typing.Any] = {
        "runtime": config.runtime,
        f"hypervisor.{config.runtime.hypervisor_name}": config.hypervisor,
        f"agent.{config.runtime.agent_name}": config.agent,
        "factory": config.factory,
    }
    for table, value in tables.items():
        lines.append(f"[{table}]")
        for field in dataclasses.fields(value):
            if field.name == "extra":
                continue
            key = f"{table}.{field.name}"
            item = getattr(value, field.name)
            shown = (
                f'"{item}"'
                if isinstance(item, (str, Path))
                else repr(item).lower()
                if isinstance(item, bool)
                else repr(item)
            )
            lines.append(f"{field.name} = {shown}  # {config.origins.get(key, 'default')}")
    if config.unused_keys:
        lines.append("# not used by this shim: " + ", ".join(config.unused_keys))
    return lines


def factory(action: str, config: TomlConfig) -> int:
    """`kata-ctl factory init|status|destroy`; the exit status (1 with one line on stderr on failure)."""
    from kata_shim.factory import FactoryError, Template, expected_manifest, mismatch
    from kata_shim.hypervisor import new_hypervisor

    template = Template(config.factory)
    try:
        if action == "destroy":
            found = template.destroy()
            print(f"template {template.current} {'removed' if found else 'did not exist'}")
            return 0
        if not config.factory.enable_template:
            print(f"kata-ctl: [factory] enable_template is false in {config.path}", file=sys.stderr)
            if action == "init":
                return 1
        hv = new_hypervisor(config.runtime.hypervisor_name, config.hypervisor)
        expected = expected_manifest(config, hv)
        if action == "status":
            print("\n".join(template.status(expected).lines()))
            return 0
        if not mismatch(template.read_manifest(), expected):
            print(f"template {template.current} is up to date")
            return 0
        import logging

        import trio

        # the build takes a boot's time: say what it does (and the guest console at debug level)
        logging.basicConfig(level=logging.INFO, format="kata-ctl: %(name)s: %(message)s", stream=sys.stderr)
        manifest = trio.run(template.build, config, hv)
        print(f"template built in {template.current} (agent {manifest.get('agent_version')})")
        return 0
    except FactoryError as err:
        print(f"kata-ctl: factory {action}: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """`kata-ctl check | env | factory init|status|destroy`."""
    parser = argparse.ArgumentParser(prog="kata-ctl", description="check the host, show the configuration")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="one PASS/FAIL line per requirement; non-zero exit when one fails")
    sub.add_parser("env", help="the resolved configuration and where each value came from")
    fac = sub.add_parser("factory", help="the VM template ([factory] enable_template)")
    fac.add_argument("action", choices=("init", "status", "destroy"))
    args = parser.parse_args(argv)
    if args.command == "check":
        results = run_checks()
        for result in results:
            print(result.line())
        return 0 if all(r.ok for r in results) else 1
    try:
        config = load_config()
    except ConfigError as err:
        print(f"kata-ctl: {err}", file=sys.stderr)
        return 1
    if args.command == "factory":
        return factory(args.action, config)
    print("\n".join(describe(config)))
    return 0
