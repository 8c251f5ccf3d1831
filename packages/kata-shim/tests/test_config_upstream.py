"""An unmodified upstream runtime-rs configuration loads and means the same; drop-ins; unused keys."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from kata_shim.config import ConfigError, drop_ins, load_config, load_config_file

UPSTREAM = Path(__file__).parent / "fixtures" / "configuration-dragonball-4.0.0.toml"
UPSTREAM_KERNEL = "/usr/share/kata-containers/vmlinux-dragonball-experimental.container"
UPSTREAM_IMAGE = "/usr/share/kata-containers/kata-containers.img"


def upstream_config(tmp_path: Path) -> Path:
    """The upstream file with only its asset paths pointed at files that exist."""
    (tmp_path / "vmlinux").write_bytes(b"\0")
    (tmp_path / "kata-containers.img").write_bytes(b"\0")
    text = UPSTREAM.read_text()
    assert UPSTREAM_KERNEL in text and UPSTREAM_IMAGE in text
    text = text.replace(UPSTREAM_KERNEL, str(tmp_path / "vmlinux"))
    text = text.replace(UPSTREAM_IMAGE, str(tmp_path / "kata-containers.img"))
    path = tmp_path / "configuration.toml"
    path.write_text(text)
    return path


def test_upstream_dragonball_configuration_loads_unchanged(tmp_path: Path) -> None:
    config = load_config_file(upstream_config(tmp_path))
    assert config.runtime.name == "virt_container"
    assert config.runtime.hypervisor_name == "dragonball"
    assert config.hypervisor.kernel == tmp_path / "vmlinux"
    assert config.hypervisor.image == tmp_path / "kata-containers.img"
    assert config.hypervisor.default_memory == 2048
    assert config.runtime.use_passfd_io and config.runtime.passfd_listener_port == 1027


def test_upstream_agent_timeouts_mean_what_upstream_means(tmp_path: Path) -> None:
    agent = load_config_file(upstream_config(tmp_path)).agent
    # dial_timeout_ms = 10 is the pause between attempts, not the budget (it was read as a 10 ms budget)
    assert agent.dial_timeout_ms == 10 and agent.dial_interval_s == 0.01
    # reconnect_timeout_ms = 3000 is the budget, raised to upstream's 10 s floor
    assert agent.reconnect_timeout_ms == 3000 and agent.connect_budget_s == 10
    # create_container_timeout = 30 (seconds) is upstream's name for request_timeout_ms
    assert agent.request_timeout_ms == 30_000


def test_reconnect_timeout_above_the_floor_is_the_budget(tmp_path: Path) -> None:
    path = upstream_config(tmp_path)
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "slow.toml").write_text("[agent.kata]\nreconnect_timeout_ms = 90000\n")
    assert load_config_file(path).agent.connect_budget_s == 90


def test_virtio_blk_pci_maps_to_virtio_mmio_for_dragonball_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kata_shim.config"):
        config = load_config_file(upstream_config(tmp_path))
    assert config.hypervisor.block_device_driver == "virtio-mmio"
    lines = [r.getMessage() for r in caplog.records if "block_device_driver" in r.getMessage()]
    assert len(lines) == 1 and "'virtio-blk-pci'" in lines[0] and "using virtio-mmio" in lines[0], lines


def test_unused_keys_warn_once_naming_the_file_and_each_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = upstream_config(tmp_path)
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "10-x.toml").write_text("[runtime]\nno_such_key = 1\n")
    with caplog.at_level(logging.WARNING, logger="kata_shim.config"):
        config = load_config_file(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per file
    base = next(w for w in warnings if str(path) in w)
    for key in ("hypervisor.dragonball.ctlpath", "agent.kata.mem_agent", "runtime.dan_conf"):
        assert key in base
    assert "no_such_key" not in base
    drop = next(w for w in warnings if "10-x.toml" in w)
    assert drop.endswith("ignored: runtime.no_such_key")
    assert "runtime.no_such_key" in config.unused_keys
    assert "hypervisor.dragonball.kernel" not in config.unused_keys


def test_drop_ins_merge_in_name_order_over_the_base(tmp_path: Path) -> None:
    path = upstream_config(tmp_path)
    d = tmp_path / "config.d"
    d.mkdir()
    (d / "20-b.toml").write_text("[hypervisor.dragonball]\ndefault_vcpus = 3\n")
    (d / "10-a.toml").write_text("[hypervisor.dragonball]\ndefault_vcpus = 2\ndefault_memory = 1024\n")
    (d / "30-ignored.conf").write_text("not toml at all [")
    assert drop_ins(path) == [d / "10-a.toml", d / "20-b.toml"]
    config = load_config_file(path)
    assert config.hypervisor.default_vcpus == 3  # the later file wins
    assert config.hypervisor.default_memory == 1024  # tables merge key by key
    assert config.hypervisor.kernel == tmp_path / "vmlinux"  # the base's other keys stay
    assert config.sources == [path, d / "10-a.toml", d / "20-b.toml"]
    assert config.origins["hypervisor.dragonball.default_vcpus"] == d / "20-b.toml"
    assert config.origins["hypervisor.dragonball.default_memory"] == d / "10-a.toml"
    assert config.origins["hypervisor.dragonball.kernel"] == path


def test_drop_ins_apply_to_a_file_found_by_lookup(tmp_path: Path) -> None:
    path = upstream_config(tmp_path)
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "mem.toml").write_text("[hypervisor.dragonball]\ndefault_memory = 768\n")
    assert load_config("", {}, [tmp_path / "missing.toml", path]).hypervisor.default_memory == 768
    assert load_config("", {"KATA_CONF_FILE": str(path)}).hypervisor.default_memory == 768


def test_bad_value_in_a_drop_in_names_the_drop_in(tmp_path: Path) -> None:
    path = upstream_config(tmp_path)
    (tmp_path / "config.d").mkdir()
    bad = tmp_path / "config.d" / "bad.toml"
    bad.write_text('[hypervisor.dragonball]\ndefault_vcpus = "two"\n')
    with pytest.raises(
        ConfigError, match=rf"^{bad}: hypervisor.dragonball.default_vcpus: must be an integer"
    ):
        load_config_file(path)
    bad.write_text("[hypervisor.dragonball\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid TOML"):
        load_config_file(path)


def test_annotations_enabled_upstream_apply_and_others_are_refused(tmp_path: Path) -> None:
    from kata_shim.config import apply_annotations

    config = load_config_file(upstream_config(tmp_path))
    # upstream's default enable_annotations: enable_iommu, kernel_params, kernel_verity_params,
    # default_vcpus, default_memory
    assert "default_memory" in config.enable_annotations
    assert "hypervisor.dragonball.enable_annotations" not in config.unused_keys
    pod = {
        "io.katacontainers.config.hypervisor.default_memory": "1024",
        "io.katacontainers.config.hypervisor.kernel_params": "quiet",
        "io.kubernetes.cri.sandbox-id": "x",  # not ours: ignored
    }
    applied = apply_annotations(config, pod)
    assert applied.hypervisor.default_memory == 1024 and applied.hypervisor.kernel_params == "quiet"
    assert config.hypervisor.default_memory == 2048  # the loaded configuration is not changed
    assert applied.annotated == ["default_memory", "kernel_params"] and config.annotated == []  # no template
    refused = {
        "io.katacontainers.config.hypervisor.default_maxvcpus": "not enabled",
        "io.katacontainers.config.hypervisor.enable_iommu": "not supported by this shim",
        "io.katacontainers.config.agent.enable_tracing": "not supported by this shim",
    }
    for name, problem in refused.items():
        with pytest.raises(ConfigError, match=rf"^annotation {re.escape(name)}: {problem}"):
            apply_annotations(config, {name: "true"})
    with pytest.raises(ConfigError, match=r"default_vcpus: 'many' is not a positive integer"):
        apply_annotations(config, {"io.katacontainers.config.hypervisor.default_vcpus": "many"})


def test_without_enable_annotations_every_kata_annotation_is_refused(tmp_path: Path) -> None:
    from kata_shim.config import apply_annotations, shipped_config

    text = shipped_config().read_text().replace("/usr/share/kata-containers/", f"{tmp_path}/")
    for name in ("vmlinuz", "kata-containers-initrd.img", "kata-containers.img"):
        (tmp_path / name).write_bytes(b"\0")
    (tmp_path / "c.toml").write_text(text)
    config = load_config_file(tmp_path / "c.toml")
    with pytest.raises(
        ConfigError, match=r"not enabled \(hypervisor.dragonball.enable_annotations allows nothing\)"
    ):
        apply_annotations(config, {"io.katacontainers.config.hypervisor.default_memory": "1024"})
    assert apply_annotations(config, {"other.annotation": "1"}) is config
