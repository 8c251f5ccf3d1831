"""lab/labvm and lab/images/build.py on the host, without booting anything (not marked ``lab``)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import lzma
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest

LAB = Path(__file__).resolve().parents[1]
LABVM = LAB / "labvm"


def _load(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


labvm = _load("labvm_under_test", LABVM)
images = _load("images_build_under_test", LAB / "images" / "build.py")


def _run_labvm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "KATA_LABVM"} | (env or {})
    return subprocess.run(
        [sys.executable, str(LABVM), *args], capture_output=True, text=True, env=full_env, check=False
    )


def test_missing_kernel_names_the_command_that_builds_it(tmp_path: Path) -> None:
    done = _run_labvm("exec", "--", "true", env={"KATA_LAB_GUEST": str(tmp_path)})
    assert done.returncode == labvm.LABVM_FAILED
    assert done.stderr.count("\n") == 1, done.stderr
    assert "vmlinuz missing" in done.stderr
    assert "./dev nox -s images" in done.stderr


def test_exec_without_command_is_a_usage_error() -> None:
    done = _run_labvm("exec", "--")
    assert done.returncode == 2
    assert "exec needs a command" in done.stderr


def test_exec_inside_lab_vm_runs_the_command_directly() -> None:
    done = _run_labvm("exec", "--", "sh", "-c", "echo out; echo err >&2; exit 3", env={"KATA_LABVM": "1"})
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_request_script_keeps_arguments_cwd_and_only_the_given_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAB_PASSED", "from host")
    monkeypatch.setenv("LAB_NOT_PASSED", "secret")
    env = labvm.guest_env(["LAB_PASSED", "LAB_SET=a b'c"])
    argv = ["sh", "-c", 'printf "%s|" "$@" "$PWD" "$LAB_PASSED" "$LAB_SET" "${LAB_NOT_PASSED-unset}"', "x"]
    argv += ["two words", "it's", "$HOME", ""]
    script = labvm.request_script(argv, str(tmp_path), env, interactive=False)
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    expected = ["two words", "it's", "$HOME", "", str(tmp_path), "from host", "a b'c", "unset"]
    assert done.stdout.split("|")[:-1] == expected


def test_lab_cpu_is_max_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAB_CPU", raising=False)
    assert labvm.lab_cpu() == "max"
    monkeypatch.setenv("LAB_CPU", "max,-xsave")  # the candidate fix for the nested-boot stall (lab/README.md)
    assert labvm.lab_cpu() == "max,-xsave"


def test_wheel_download_gets_a_pip_when_the_interpreter_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nox's uv-made venvs and Debian's python3 have no pip; `./dev demo` died with "No module named pip"
    has_pip = images._has_pip
    monkeypatch.setattr(images, "_has_pip", lambda python: python != sys.executable and has_pip(python))
    pip = images.pip_command(tmp_path / "pip-venv")
    assert pip[0] == str(tmp_path / "pip-venv" / "bin" / "python")
    assert subprocess.run([*pip, "--version"], capture_output=True, check=False).returncode == 0
    assert images.pip_command(tmp_path / "pip-venv") == pip  # made once


def test_memory_sizes_parse_to_mib() -> None:
    assert [labvm.parse_size_mib(s) for s in ("4G", "2048M", "512", "1.5G", "4GiB")] == [
        4096, 2048, 512, 1536, 4096
    ]  # fmt: skip


def test_cpio_archive_holds_files_symlinks_and_device_nodes(tmp_path: Path) -> None:
    cpio = images.Cpio()
    cpio.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.chardev("dev/console", 5, 1)
    archive = tmp_path / "a.cpio"
    archive.write_bytes(cpio.finish())
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet", "-F", str(archive)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    names = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in listing}
    assert names["bin/hello"].startswith("-rwxr-xr-x")
    assert names["bin/sh"].startswith("l") and names["bin/sh"].endswith("-> busybox")
    assert names["dev/console"].startswith("crw-------")
    assert len(archive.read_bytes()) % 512 == 0


class _HungVm:
    """What run_in_vm sees of a lab VM whose command started and then never ended (a locked-up kernel)."""

    interactive = False
    boot_timeout = 60.0
    console = None

    def __init__(self) -> None:
        import socket

        self.peers = {}
        self.conns = {}
        for name in ("ctl", "stdout", "stderr"):
            ours, theirs = socket.socketpair()
            self.conns[name], self.peers[name] = ours, theirs
        self.peers["ctl"].sendall(b"started\n")

        class _Qemu:
            def poll(self) -> None:
                return None

        self.qemu = _Qemu()

    def start(self) -> dict[str, object]:
        return self.conns

    def cpu_state(self) -> str:
        return "CPU#0\nRIP=ffffffff81000000 RFL=00000046"


def test_a_command_past_its_timeout_ends_the_run_with_a_clear_error() -> None:
    vm = _HungVm()
    with pytest.raises(labvm.LabError, match=r"did not finish within 1 s"):
        labvm.run_in_vm(vm, "sleep 600", timeout=1)
    for sock in (*vm.conns.values(), *vm.peers.values()):
        sock.close()


def test_a_command_silent_past_its_idle_timeout_ends_the_run() -> None:
    vm = _HungVm()
    with pytest.raises(labvm.LabError, match=r"printed nothing for 1 s"):
        labvm.run_in_vm(vm, "sleep 600", timeout=600, idle_timeout=1)
    for sock in (*vm.conns.values(), *vm.peers.values()):
        sock.close()


def test_a_lab_vm_whose_heartbeat_stops_is_frozen_and_says_where_its_cpus_were() -> None:
    vm = _HungVm()
    with pytest.raises(labvm.LabError, match=r"no heartbeat for 1 s") as err:
        labvm.run_in_vm(vm, "sleep 600", timeout=600, idle_timeout=600, heartbeat_timeout=1)
    assert err.value.cpus.startswith("CPU#0\nRIP=")
    for sock in (*vm.conns.values(), *vm.peers.values()):
        sock.close()


def test_heartbeats_keep_a_silent_command_running_until_its_idle_timeout() -> None:
    vm = _HungVm()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.2):
            vm.peers["ctl"].sendall(b"alive\n")

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        with pytest.raises(labvm.LabError, match=r"printed nothing for 3 s"):
            labvm.run_in_vm(vm, "sleep 600", timeout=600, idle_timeout=3, heartbeat_timeout=1)
    finally:
        stop.set()
        beater.join()
    for sock in (*vm.conns.values(), *vm.peers.values()):
        sock.close()


def test_resume_plugin_runs_again_only_what_had_not_passed_when_the_lab_vm_died(tmp_path: Path) -> None:
    """lab/plugins/kata_lab_resume.py: the first run records each passed test as it passes; the run in the
    second lab VM (KATA_LAB_RESUME=1) deselects those and runs the failed, skipped and never-reached ones."""
    suite = tmp_path / "test_suite.py"
    suite.write_text(
        "import os, pytest\n"
        "def test_a(): pass\n"
        "def test_b(): assert os.environ.get('SECOND') == '1'\n"
        "def test_c(): pytest.skip('not here')\n"
        "@pytest.fixture\n"
        "def broken():\n    yield\n    raise RuntimeError('teardown')\n"
        "def test_d(broken): pass\n"
        "def test_e(): pass\n"
    )
    passed = tmp_path / "passed.txt"

    def run(resume: str, second: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(LAB / "plugins"), "KATA_LAB_PASSED": str(passed),
               "KATA_LAB_RESUME": resume, "SECOND": second}  # fmt: skip
        argv = [sys.executable, "-m", "pytest", "-p", "kata_lab_resume", "-p", "no:cacheprovider", "-q"]
        done = subprocess.run(
            [*argv, suite.name], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        return done.stdout

    first = run("0", "0")
    assert "1 failed, 3 passed, 1 skipped, 1 error" in first, first
    assert passed.read_text().splitlines() == ["test_suite.py::test_a", "test_suite.py::test_e"]
    second = run("1", "1")
    assert "2 tests passed in the lab VM that died; not run again" in second, second
    assert "2 passed, 1 skipped, 2 deselected, 1 error" in second, second


# the last lines of a kata-vmm guest's console as the shim reported them (CI, 2026-12-07, test_cni_lab's
# second pod): a timer interrupt from user mode, then a page fault on `mov %gs:0x1fb80,%rax` in kernel mode
WRONG_GS_OOPS = """\
ctr: failed to create shim task: the VM of sandbox cni-b stopped before its agent answered: reset
guest console (last lines):
[   14.582403]  asm_exc_page_fault+0x22/0x30
[   14.582410] RIP: 0010:irqentry_enter+0x9/0x50
[   14.582418] Code: 00 e9 70 03 00 00 f6 87 88 00 00 00 03 75 24 <65> 48 8b 04 25 80 fb 01 00 f6 40 2c 02
[   14.582421] RSP: 0000:fffffe0000002f08 EFLAGS: 00000046
[   25.256818] Kernel panic - not syncing: Fatal exception in interrupt
"""
# a guest kernel's own bug: a NULL dereference (`mov (%rdi),%rax`), not a GS-relative load
OWN_OOPS = """\
[    3.100000] BUG: kernel NULL pointer dereference, address: 0000000000000000
[    3.100010] RIP: 0010:virtnet_poll+0x1c/0x2a0 [virtio_net]
[    3.100020] Code: 41 54 55 53 48 89 fb <48> 8b 07 65 48 8b 04 25 80 fb 01 00
[    3.100030] Kernel panic - not syncing: Fatal exception in interrupt
"""


def test_wrong_gs_base_oops_is_told_from_a_guest_kernels_own_bug() -> None:
    plugin = _load("kata_lab_resume", LAB / "plugins" / "kata_lab_resume.py")
    assert plugin.wrong_gs_base_oops(WRONG_GS_OOPS) == "irqentry_enter+0x9/0x50"
    assert plugin.wrong_gs_base_oops(OWN_OOPS) is None
    assert plugin.wrong_gs_base_oops("RIP: 0010:irqentry_enter+0x9/0x50\n(no Code line)") is None
    # a pytest report prefixes every line ("E   "): still found
    prefixed = "\n".join(f"E                 {line}" for line in WRONG_GS_OOPS.splitlines())
    assert plugin.wrong_gs_base_oops(prefixed) == "irqentry_enter+0x9/0x50"


def test_a_run_whose_only_failures_are_the_emulators_oops_exits_as_a_failed_lab_vm(tmp_path: Path) -> None:
    """With every failure showing a nested guest's wrong-GS-base oops the run exits 125, so `nox -s lab` runs
    the file's unpassed tests in a new lab VM; one other failure in the same run keeps pytest's exit 1."""
    (tmp_path / "oops.txt").write_text(WRONG_GS_OOPS)
    (tmp_path / "own.txt").write_text(OWN_OOPS)
    suite = tmp_path / "test_suite.py"
    suite.write_text(
        "import os, pathlib\n"
        "def test_a(): pass\n"
        "def test_b(): assert False, pathlib.Path('oops.txt').read_text()\n"
        "def test_c(): assert os.environ.get('OWN') != '1', pathlib.Path('own.txt').read_text()\n"
    )

    def run(own: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(LAB / "plugins"), "KATA_LAB_PASSED": str(tmp_path / "passed"),
               "KATA_LAB_RESUME": "0", "OWN": own}  # fmt: skip
        argv = [sys.executable, "-m", "pytest", "-p", "kata_lab_resume", "-p", "no:cacheprovider", "-q"]
        argv += [suite.name]
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)

    emulator_only = run("0")
    assert emulator_only.returncode == 125, emulator_only.stdout
    assert "EMULATOR FAILURE, not a test failure" in emulator_only.stdout, emulator_only.stdout
    assert "test_suite.py::test_b" in emulator_only.stdout
    mixed = run("1")
    assert mixed.returncode == 1, mixed.stdout
    assert "EMULATOR FAILURE" not in mixed.stdout, mixed.stdout


def _fake_containerd_deb(tmp_path: Path) -> tuple[Path, str]:
    """A .deb with the three binaries the lab uses of containerd 2.x (each a script printing its name), in a
    file:// mirror's pool; its path and SHA256."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: containerd\nVersion: 2.9.9\nArchitecture: amd64\nMaintainer: lab\nDescription: fake\n"
    )
    for name in images.CONTAINERD2_BINARIES:
        binary = root / "usr" / "bin" / name
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text(f"#!/bin/sh\necho {name}\n")
        binary.chmod(0o755)
    deb = tmp_path / "mirror" / "pool" / "containerd_2.9.9_amd64.deb"
    deb.parent.mkdir(parents=True)
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True, capture_output=True
    )
    return deb, images.sha256_of(deb)


@pytest.fixture
def containerd2_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """build.py's containerd 2.x pin pointed at a fake package in a file:// mirror, its cache in tmp_path."""
    deb, sha256 = _fake_containerd_deb(tmp_path)
    monkeypatch.setattr(images, "DEBIAN_MIRROR", f"file://{tmp_path / 'mirror'}")
    pin = images.DebianPackage("2.9.9", "pool/containerd_2.9.9_amd64.deb", sha256)
    monkeypatch.setattr(images, "CONTAINERD2_PIN", pin)
    monkeypatch.setattr(images, "CACHE", tmp_path / "cache")
    return deb, sha256


def test_containerd2_is_downloaded_checked_unpacked_and_not_fetched_again(
    tmp_path: Path, containerd2_pin: tuple[Path, str]
) -> None:
    deb, sha256 = containerd2_pin
    out = tmp_path / "containerd-2.x"
    bin_dir = images.fetch_containerd2(out)
    assert bin_dir == out / "usr" / "bin"
    for name in images.CONTAINERD2_BINARIES:
        done = subprocess.run([bin_dir / name], capture_output=True, text=True, check=True)
        assert done.stdout == f"{name}\n"
    assert (out / ".sha256").read_text().strip() == sha256
    assert (tmp_path / "cache" / deb.name).read_bytes() == deb.read_bytes()
    # present and stamped: neither the mirror nor the cache is needed again
    deb.unlink()
    (tmp_path / "cache" / deb.name).unlink()
    assert images.fetch_containerd2(out) == bin_dir
    # a damaged tree (a binary gone) is unpacked again; without the .deb anywhere that fails, naming the pin
    (bin_dir / "ctr").unlink()
    with pytest.raises(images.BuildError, match=r"Packages\.xz"):
        images.fetch_containerd2(out)


def test_containerd2_with_another_sha256_is_refused_and_leaves_nothing(
    tmp_path: Path, containerd2_pin: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pin = images.CONTAINERD2_PIN
    monkeypatch.setattr(images, "CONTAINERD2_PIN", pin._replace(sha256="0" * 64))
    out = tmp_path / "containerd-2.x"
    with pytest.raises(images.BuildError, match="pinned 0000"):
        images.fetch_containerd2(out)
    assert not out.exists()
    assert list((tmp_path / "cache").iterdir()) == []
    # a cached .deb that does not match the pin is fetched again, not trusted
    monkeypatch.setattr(images, "CONTAINERD2_PIN", pin)
    (tmp_path / "cache" / containerd2_pin[0].name).write_bytes(b"not the package")
    assert images.fetch_containerd2(out) == out / "usr" / "bin"


def test_containerd2_whose_pin_left_the_archive_is_testings_2x_checked_by_its_index(
    tmp_path: Path, containerd2_pin: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """sid's pool drops a version soon after the next upload: the lab then takes the containerd 2.x that
    testing's index lists (its SHA256 checked), instead of failing the 2.x tests until someone moves the pin;
    an index whose SHA256 does not match the file is refused."""
    deb, sha256 = containerd2_pin
    monkeypatch.setattr(
        images, "CONTAINERD2_PIN", images.DebianPackage("2.1.0", "pool/gone_2.1.0.deb", "1" * 64)
    )
    index = tmp_path / "mirror" / "dists" / "forky" / "main" / "binary-amd64" / "Packages.xz"
    index.parent.mkdir(parents=True)

    def listing(sha: str) -> None:
        stanzas = [
            "Package: containerd-tools\nVersion: 2.9.9\nFilename: pool/x.deb\nSHA256: " + "2" * 64,
            f"Package: containerd\nVersion: 2.9.9\nFilename: pool/{deb.name}\nSHA256: {sha}\nTag: a\n b",
        ]
        index.write_bytes(lzma.compress("\n\n".join(stanzas).encode()))

    listing("3" * 64)
    out = tmp_path / "containerd-2.x"
    with pytest.raises(images.BuildError, match="pinned 3333"):
        images.fetch_containerd2(out)
    assert not out.exists()
    listing(sha256)
    bin_dir = images.fetch_containerd2(out)
    assert (out / ".sha256").read_text().strip() == sha256
    assert subprocess.run([bin_dir / "containerd"], capture_output=True, text=True, check=True).stdout
    # no index at all (sid's neither): the error says where to pin from
    index.unlink()
    (bin_dir / "ctr").unlink()
    with pytest.raises(images.BuildError, match=r"no successor either .*Packages\.xz"):
        images.fetch_containerd2(out)
