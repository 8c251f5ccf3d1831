"""Shim configurations the lab runs besides the shipped one: upstream's qemu and dragonball configurations
and the shipped one with the VM template on (tests and benchmarks build them here, one copy each)."""

from __future__ import annotations

from pathlib import Path

from framework.assets import GuestAssets

REPO = Path(__file__).resolve().parents[2]
SHIM_FIXTURES = REPO / "packages" / "kata-shim" / "tests" / "fixtures"
UPSTREAM_QEMU_CONFIG = SHIM_FIXTURES / "configuration-qemu-runtime-rs-4.0.0.toml"
UPSTREAM_DRAGONBALL_CONFIG = SHIM_FIXTURES / "configuration-dragonball-4.0.0.toml"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
"""Debian's virtiofsd (qemu-system-common)."""


def _upstream_config(
    directory: Path, source: Path, hypervisor: str, kernel: str, *, paths: dict[str, str], keys: str = ""
) -> Path:
    """Upstream's ``source`` in ``directory``: its kernel path ``kernel``, its image and ``paths`` substituted
    with the lab's, nothing else changed; the lab's needs in a config.d drop-in: the stock kernel loads its
    drivers from an initrd (plus ``keys`` of ``[hypervisor.<hypervisor>]``), and a guest under nested KVM in
    the emulated lab VM needs longer than upstream's 10 s to start its agent."""
    assets = GuestAssets()
    text = source.read_text()
    substitutions = {
        kernel: str(assets.kernel),
        "/usr/share/kata-containers/kata-containers.img": str(assets.rootfs_sandbox),
        **paths,
    }
    for old, new in substitutions.items():
        text = text.replace(old, new)
    path = directory / "configuration.toml"
    path.write_text(text)
    (directory / "config.d").mkdir()
    (directory / "config.d" / "50-lab.toml").write_text(
        f'[hypervisor.{hypervisor}]\ninitrd = "{assets.initrd_sandbox}"\n{keys}'
        "[agent.kata]\nreconnect_timeout_ms = 90000\n"
    )
    return path


QEMU_LAB_MEMORY_MIB = 1024
"""The lab qemu configuration's default_memory: smaller than upstream's 2048 (the lab VM has 6 GiB)."""


def qemu_config(directory: Path, memory_mib: int = QEMU_LAB_MEMORY_MIB) -> Path:
    """Upstream's configuration-qemu-runtime-rs.toml in ``directory`` (`_upstream_config`), Debian's
    virtiofsd, and a VM of ``memory_mib`` (a benchmark gives it the shipped configuration's size)."""
    return _upstream_config(
        directory,
        UPSTREAM_QEMU_CONFIG,
        "qemu",
        "/usr/share/kata-containers/vmlinux.container",
        paths={"/usr/libexec/virtiofsd": VIRTIOFSD},
        keys=f"default_memory = {memory_mib}\n",
    )


def shipped_memory_mib() -> int:
    """The shipped (dragonball) configuration's default_memory."""
    import tomllib

    from kata_shim.config import shipped_config

    return int(tomllib.loads(shipped_config().read_text())["hypervisor"]["dragonball"]["default_memory"])


def dragonball_config(directory: Path) -> Path:
    """Upstream's configuration-dragonball.toml in ``directory`` (`_upstream_config`)."""
    return _upstream_config(
        directory,
        UPSTREAM_DRAGONBALL_CONFIG,
        "dragonball",
        "/usr/share/kata-containers/vmlinux-dragonball-experimental.container",
        paths={},
    )


def template_config(directory: Path) -> tuple[Path, Path]:
    """The shipped configuration with the VM template on and its template under ``directory``: (the file,
    the template directory)."""
    from kata_shim.config import shipped_config

    template = directory / "template"
    text = shipped_config().read_text()
    if "enable_template = false" not in text:
        raise ValueError("the shipped configuration no longer says enable_template = false")
    text = text.replace("enable_template = false", "enable_template = true").replace(
        'template_path = "/run/vc/vm/template"', f'template_path = "{template}"'
    )
    path = directory / "configuration.toml"
    path.write_text(text)
    return path, template
