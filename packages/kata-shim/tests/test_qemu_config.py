"""An unmodified upstream configuration-qemu-runtime-rs.toml (4.0.0) selects the qemu back-end and its
`[hypervisor.qemu]` keys mean what upstream means."""

from __future__ import annotations

from pathlib import Path

import trio

from kata_shim.config import load_config_file
from kata_shim.hypervisor import hypervisor_factory
from kata_shim.hypervisor._qemu import Qemu

UPSTREAM = Path(__file__).parent / "fixtures" / "configuration-qemu-runtime-rs-4.0.0.toml"
UPSTREAM_KERNEL = "/usr/share/kata-containers/vmlinux.container"
UPSTREAM_IMAGE = "/usr/share/kata-containers/kata-containers.img"
UPSTREAM_QEMU = "/usr/bin/qemu-system-x86_64"
UPSTREAM_VIRTIOFSD = "/usr/libexec/virtiofsd"
READ_KEYS = (
    "path",
    "valid_hypervisor_paths",
    "machine_type",
    "machine_accelerators",
    "cpu_features",
    "virtio_fs_daemon",
    "valid_virtio_fs_daemon_paths",
    "virtio_fs_cache",
    "virtio_fs_extra_args",
    "virtio_fs_queue_size",
    "disable_vhost_net",
    "entropy_source",
    "pcie_root_port",
)


def upstream_config(tmp_path: Path) -> Path:
    """The upstream file with only its asset paths (kernel, image, QEMU, virtiofsd) pointed at files that
    exist: every occurrence, so the valid_*_paths lists follow."""
    assets = {
        UPSTREAM_KERNEL: tmp_path / "vmlinux",
        UPSTREAM_IMAGE: tmp_path / "kata-containers.img",
        UPSTREAM_QEMU: tmp_path / "qemu-system-x86_64",
        UPSTREAM_VIRTIOFSD: tmp_path / "virtiofsd",
    }
    text = UPSTREAM.read_text()
    for upstream, local in assets.items():
        assert upstream in text
        local.write_bytes(b"\0")
        local.chmod(0o755)
        text = text.replace(upstream, str(local))
    path = tmp_path / "configuration.toml"
    path.write_text(text)
    return path


def test_upstream_qemu_configuration_loads_unchanged_into_a_hypervisor_config(tmp_path: Path) -> None:
    config = load_config_file(upstream_config(tmp_path))
    assert config.runtime.hypervisor_name == "qemu"
    assert hypervisor_factory(config.runtime.hypervisor_name) is Qemu
    hv = config.hypervisor
    assert hv.path == str(tmp_path / "qemu-system-x86_64")
    assert hv.valid_hypervisor_paths == [hv.path]
    assert hv.kernel == tmp_path / "vmlinux" and hv.image == tmp_path / "kata-containers.img"
    assert hv.machine_type == "q35" and hv.machine_accelerators == "" and hv.cpu_features == "pmu=off"
    assert hv.kernel_params == "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1"
    assert hv.default_memory == 2048 and hv.default_vcpus == 1
    assert hv.shared_fs == "virtio-fs"
    assert hv.virtio_fs_daemon == str(tmp_path / "virtiofsd")
    assert hv.valid_virtio_fs_daemon_paths == [hv.virtio_fs_daemon]
    assert hv.virtio_fs_cache == "auto" and hv.virtio_fs_queue_size == 1024
    assert hv.virtio_fs_extra_args == ["--thread-pool-size=1", "-o", "announce_submounts"]
    assert hv.disable_vhost_net is False and hv.entropy_source == "/dev/urandom"
    # upstream's virtio-scsi default: this back-end attaches block devices as virtio-blk-pci
    assert hv.block_device_driver == "virtio-blk-pci"
    for key in READ_KEYS:
        assert f"hypervisor.qemu.{key}" not in config.unused_keys
    assert config.agent.request_timeout_ms == 30_000


def test_upstream_qemu_configuration_prepares_a_vm(tmp_path: Path, root: Path) -> None:
    config = load_config_file(upstream_config(tmp_path))
    hv = Qemu(config.hypervisor, state_root=root)
    trio.run(hv.prepare_vm, "sb1", None)
    argv = hv.qemu_argv()
    assert argv[argv.index("-machine") + 1] == "q35,accel=kvm,memory-backend=mem"
    assert argv[argv.index("-cpu") + 1] == "host,pmu=off"
    assert argv[argv.index("-m") + 1] == "2048M"
    # upstream's pcie_root_port = 0 (no VFIO cold-plug ports) leaves the default hot-plug ports
    assert config.hypervisor.pcie_root_port == 0 and hv.root_ports() == 4
    assert hv.capabilities().hotplug == {"block", "net", "vcpu"}
