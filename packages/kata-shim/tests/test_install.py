"""kata-shim install / uninstall into a prefix, and kata-ctl check / env (no root needed)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kata_shim import _kata_ctl
from kata_shim._cli import admin_main
from kata_shim._install import (
    ASSETS,
    InstallError,
    Layout,
    containerd_config_version,
    containerd_snippet,
    install,
    uninstall,
)
from kata_shim.config import load_config_file
from kata_shim.shim._zygote import zygotes_in


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    """What `nox -s images` leaves in build/lab/guest, as far as install reads it."""
    guest = tmp_path / "guest"
    guest.mkdir()
    kernel = bytearray(0x400)
    kernel[0x202:0x206] = b"HdrS"  # a bzImage's setup header magic
    (guest / "vmlinuz").write_bytes(bytes(kernel))
    (guest / "initrd-sandbox.img").write_bytes(b"initrd")
    (guest / "rootfs-sandbox.ext4").write_bytes(b"ext4")
    return guest


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def test_install_puts_shim_assets_and_a_configuration_that_loads(assets: Path, tmp_path: Path) -> None:
    layout = Layout.for_prefix(tmp_path / "opt-kata")
    report = install(assets, layout)
    assert all(line.startswith("installed ") for line in report), report
    for name in ASSETS:
        assert (layout.assets_dir / name).is_file()
    config = load_config_file(layout.config)
    assert config.hypervisor.kernel == layout.assets_dir / "vmlinuz"
    assert config.hypervisor.initrd == layout.assets_dir / "kata-containers-initrd.img"
    assert config.hypervisor.image == layout.assets_dir / "kata-containers.img"
    shim = layout.bin_dir / "containerd-shim-kata-v2"
    done = subprocess.run([str(shim), "-v"], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0 and "containerd-shim-kata-v2" in done.stdout, done.stderr
    done = subprocess.run(
        [str(layout.bin_dir / "kata-ctl"), "env"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={"KATA_CONF_FILE": str(layout.config), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0 and f"# configuration: {layout.config}" in done.stdout, done.stderr


def test_default_layout_is_katas_and_matches_the_shipped_configuration() -> None:
    layout = Layout.for_prefix(None)
    assert layout.assets_dir == Path("/usr/share/kata-containers")
    assert layout.bin_dir == Path("/usr/local/bin")
    assert layout.config == Path("/etc/kata-containers/runtime-rs/configuration.toml")
    opt = Layout.for_prefix(Path("/opt/kata"))  # upstream's third lookup location
    assert opt.config == Path("/opt/kata/share/defaults/kata-containers/runtime-rs/configuration.toml")


def test_install_is_idempotent(assets: Path, tmp_path: Path) -> None:
    layout = Layout.for_prefix(tmp_path / "p")
    install(assets, layout)
    manifest = layout.manifest.read_text()
    assert all(line.startswith("unchanged ") for line in install(assets, layout))
    assert layout.manifest.read_text() == manifest


def test_uninstall_removes_exactly_what_install_created(assets: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "p"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "someone-elses").write_text("keep")
    before = tree(prefix)
    layout = Layout.for_prefix(prefix)
    install(assets, layout)
    assert tree(prefix) > before
    report = uninstall(layout)
    assert len([line for line in report if line.startswith("removed ")]) == len(ASSETS) + 3
    assert tree(prefix) == before
    assert uninstall(layout) == [f"nothing to remove: no {layout.manifest}"]


def test_uninstall_ends_the_shims_zygote(assets: Path, tmp_path: Path) -> None:
    layout = Layout.for_prefix(tmp_path / "p")
    install(assets, layout)
    directory = tmp_path / "z"
    directory.mkdir()
    # a process that looks like the zygote of that directory, its pid in the lock file
    zygote = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "zygote", str(directory)])
    try:
        (directory / "k.lock").write_text(f"{zygote.pid}\n")
        (directory / "k.sock").touch()
        with zygotes_in(directory):
            report = uninstall(layout)
        assert f"ended the shim's zygote (pid {zygote.pid})" in report
        assert zygote.wait(timeout=10) == -signal.SIGKILL
        assert not (directory / "k.sock").exists()
    finally:
        zygote.kill()
        zygote.wait()


def test_uninstall_keeps_a_file_changed_since_install(assets: Path, tmp_path: Path) -> None:
    layout = Layout.for_prefix(tmp_path / "p")
    install(assets, layout)
    layout.config.write_text(layout.config.read_text() + "# edited by the admin\n")
    report = uninstall(layout)
    assert f"kept {layout.config}: changed since kata-shim installed it" in report
    assert layout.config.exists() and not layout.manifest.exists()


def test_install_refuses_to_replace_a_file_it_did_not_create(assets: Path, tmp_path: Path) -> None:
    layout = Layout.for_prefix(tmp_path / "p")
    layout.config.parent.mkdir(parents=True)
    layout.config.write_text("# the admin's own\n")
    with pytest.raises(InstallError, match=r"configuration.toml exists and was not installed by kata-shim"):
        install(assets, layout)
    assert layout.config.read_text() == "# the admin's own\n" and not layout.manifest.exists()
    install(assets, layout, force=True)
    assert "[hypervisor.dragonball]" in layout.config.read_text()


def test_missing_assets_name_the_file_and_the_command_that_builds_them(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match=r"guest/vmlinuz missing .*nox -s images"):
        install(tmp_path / "guest", Layout.for_prefix(tmp_path / "p"))


def test_cli_install_prints_the_containerd_snippet(
    assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "p"
    assert admin_main(["install", "--assets", str(assets), "--prefix", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert 'runtime_type = "io.containerd.kata.v2"' in out
    assert f'ConfigPath = "{Layout.for_prefix(prefix).config}"' in out
    assert admin_main(["uninstall", "--prefix", str(prefix)]) == 0
    assert admin_main(["install", "--assets", str(tmp_path / "none"), "--prefix", str(prefix)]) == 1
    assert "kata-shim install: " in capsys.readouterr().err


def test_kata_ctl_check_fails_without_kvm_and_kernel(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = Layout.for_prefix(tmp_path / "p")
    install(assets, layout)
    monkeypatch.setenv("KATA_CONF_FILE", str(layout.config))
    monkeypatch.setattr(_kata_ctl, "DEV_KVM", tmp_path / "no-kvm")
    (layout.assets_dir / "vmlinuz").unlink()
    assert _kata_ctl.main(["check"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"FAIL kvm: cannot open {tmp_path / 'no-kvm'}")
    config_line = next(line for line in lines if " configuration: " in line)
    assert config_line.startswith("FAIL configuration: ")
    assert f"{layout.assets_dir / 'vmlinuz'} does not exist" in config_line and "./dev install" in config_line
    assert all(line.startswith(("PASS ", "FAIL ")) for line in lines)


def test_kata_ctl_check_passes_the_configured_assets(assets: Path, tmp_path: Path) -> None:
    layout = Layout.for_prefix(tmp_path / "p")
    install(assets, layout)
    checks = _kata_ctl.check_config({"KATA_CONF_FILE": str(layout.config)})
    assert [c.name for c in checks] == ["configuration", "guest kernel", "guest initrd", "guest image"]
    assert all(c.ok for c in checks), checks
    (layout.assets_dir / "vmlinuz").write_bytes(b"not a kernel")
    kernel = _kata_ctl.check_config({"KATA_CONF_FILE": str(layout.config)})[1]
    assert not kernel.ok and "neither a bzImage nor an ELF" in kernel.detail


def test_kata_ctl_check_reports_an_old_containerd() -> None:
    old = _kata_ctl.check_containerd(lambda argv: "containerd github.com/containerd/containerd 1.5.9 abc\n")
    assert not old.ok and "need 1.6" in old.detail
    ok = _kata_ctl.check_containerd(lambda argv: "containerd containerd.io 1.6.20 2806fc1\n")
    assert ok.ok and ok.detail == "version 1.6.20"


def test_kata_ctl_env_says_where_each_value_came_from(assets: Path, tmp_path: Path) -> None:
    layout = Layout.for_prefix(tmp_path / "p")
    install(assets, layout)
    drop_in = layout.config.parent / "config.d" / "10-mem.toml"
    drop_in.parent.mkdir()
    drop_in.write_text("[hypervisor.dragonball]\ndefault_memory = 768\n")
    lines = _kata_ctl.describe(load_config_file(layout.config))
    assert lines[:2] == [f"# configuration: {layout.config}", f"# drop-in: {drop_in}"]
    assert f'kernel = "{layout.assets_dir / "vmlinuz"}"  # {layout.config}' in lines
    assert f"default_memory = 768  # {drop_in}" in lines
    assert "health_check_request_timeout_ms = 90000  # " + str(layout.config) in lines
    assert json.loads(layout.manifest.read_text())["files"]


@pytest.mark.parametrize(
    ("version", "plugin", "sandboxer"),
    [(2, "io.containerd.grpc.v1.cri", None), (3, "io.containerd.cri.v1.runtime", "shim")],
)
def test_containerd_snippet_is_the_kata_handler_of_that_configuration_version(
    tmp_path: Path, version: int, plugin: str, sandboxer: str | None
) -> None:
    """The tables parse, under a file's `version` line, to the `kata` handler the README shows for that
    containerd (1.6: config version 2; 2.x: 3, the shim as sandboxer), with the installed configuration."""
    layout = Layout.for_prefix(tmp_path / "p")
    doc = tomllib.loads(f"version = {version}\n" + containerd_snippet(layout, version))
    kata = doc["plugins"][plugin]["containerd"]["runtimes"]["kata"]
    assert kata["runtime_type"] == "io.containerd.kata.v2"
    assert kata.get("sandboxer") == sandboxer
    assert kata["pod_annotations"] == ["io.katacontainers.*"]
    assert kata["options"] == {"ConfigPath": str(layout.config)}
    assert len(doc["plugins"]) == 1
    with pytest.raises(InstallError, match="2 or 3"):
        containerd_snippet(layout, 4)


@pytest.mark.parametrize(
    ("printed", "version"),
    [
        ("containerd github.com/containerd/containerd/v2 2.1.9 ", 3),
        ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1", 2),
        ("containerd containerd.io v1.7.24 88bf19b2", 2),
        ("containerd containerd.io v2.0.0 207ad711", 3),
        (None, 2),
        ("garbage", 2),
    ],
)
def test_the_snippets_version_follows_containerd_version(printed: str | None, version: int) -> None:
    assert containerd_config_version(printed) == version


def test_cli_install_prints_the_version_3_snippet_when_asked(
    assets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "p"
    argv = ["install", "--assets", str(assets), "--prefix", str(prefix), "--containerd-config-version", "3"]
    assert admin_main(argv) == 0
    out = capsys.readouterr().out
    assert '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kata]' in out
    assert 'sandboxer = "shim"' in out and "containerd 2.x" in out
    assert admin_main(["uninstall", "--prefix", str(prefix)]) == 0
