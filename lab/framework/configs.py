"""Shim configurations the lab runs besides the shipped one: upstream's qemu configuration and the shipped
one with the VM template on (tests and benchmarks build them here, one copy each)."""

from __future__ import annotations

from pathlib import Path

from framework.assets import GuestAssets

REPO = Path(__file__).resolve().parents[2]
SHIM_FIXTURES = REPO / "packages" / "kata-shim" / "tests" / "fixtures"
UPSTREAM_QEMU_CONFIG = SHIM_FIXTURES / "configuration-qemu-runtime-rs-4.0.0.toml"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
"""Debian's virtiofsd (qemu-system-common)."""


def qemu_config(directory: Path) -> Path:
    """Upstream's configuration-qemu-runtime-rs.toml in ``directory``, asset paths substituted; the lab's
    needs in a drop-in: the stock kernel loads its drivers from an initrd, a smaller VM, a longer agent
    budget."""
    assets = GuestAssets()
    text = UPSTREAM_QEMU_CONFIG.read_text()
    text = text.replace("/usr/share/kata-containers/vmlinux.container", str(assets.kernel))
    text = text.replace("/usr/share/kata-containers/kata-containers.img", str(assets.rootfs_sandbox))
    text = text.replace("/usr/libexec/virtiofsd", VIRTIOFSD)
    path = directory / "configuration.toml"
    path.write_text(text)
    (directory / "config.d").mkdir()
    (directory / "config.d" / "50-lab.toml").write_text(
        f'[hypervisor.qemu]\ninitrd = "{assets.initrd_sandbox}"\ndefault_memory = 1024\n'
        "[agent.kata]\nreconnect_timeout_ms = 90000\n"
    )
    return path


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
