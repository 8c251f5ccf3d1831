#!/usr/bin/env python3
"""Build the guest assets of the lab into build/lab/guest/ (stdlib only; `nox -s images` runs this).

Outputs, rebuilt only when a hash of their inputs changes (this file's source, the pinned kernel, the module
lists, the busybox binary, the sandbox package versions):

    vmlinuz, kernel-version, modules/lib/modules/<ver>/   the pinned Debian bookworm cloud kernel (depmod'ed)
    initrd-lab.img       boots the lab VM itself: virtio-fs host root, overlay, chroot (see lab/labvm)
    initrd-test.img      busybox initramfs for test guests: loads the virtio drivers, runs `lab.run=PATH`
                         if given on the kernel command line, else prints KATA-LAB-GUEST-OK and powers off
    rootfs-sandbox.ext4  read-only root of the sandbox guest: Debian's python3 (stdlib byte-compiled), crun,
                         busybox, and the agent in /opt/kata-agent: kata_agent, kata_proto, kata_sys_util
                         from packages/*/src and the pinned AGENT_WHEELS, byte-compiled, in lib/; the `start`
                         script that mounts the guest's filesystems and runs the agent
    rootfs-sandbox.erofs the same tree as erofs (boot it with lab.rootfstype=erofs; ext4 measured faster)
    initrd-sandbox.img   mounts /dev/vda (that image) under a tmpfs overlay and runs /opt/kata-agent/start,
                         (unless lab.noagent=1 is on the command line), else prints KATA-SANDBOX-READY
                         and powers off; loads kata_upcall_srv.ko first (failing soft)
    kata_upcall_srv.ko   the guest's dbs-upcall server (packages/kata-upcall/guest), built with kbuild against
                         /usr/src/linux-headers-<KERNEL_RELEASE> (apt-get installs the pinned headers and
                         make when missing); `python3 lab/images/build.py --upcall-module DIR` (nox -s
                         upcall-module) builds only it

Beside them, not part of that cache: build/lab/containerd-2.x/, Debian sid's containerd 2.x package
(CONTAINERD2_VERSION, pinned by its SHA256) unpacked for the lab's CRI tests on containerd 2.x
(usr/bin/containerd, ctr, containerd-shim-runc-v2); fetched once, kept while its stamp names the pin.
`python3 lab/images/build.py --containerd2` fetches only it.

Run `python3 lab/images/build.py --force` to rebuild regardless of the cache.

Booting the sandbox guest (what lab/tests/test_agent_lab.py and the shim's dragonball back-end boot):

    kernel     build/lab/guest/vmlinuz (Debian bookworm cloud 6.1, bzImage)
    initrd     build/lab/guest/initrd-sandbox.img
    cmdline    "console=ttyS0 reboot=k panic=1 quiet"  (nothing else is required; `quiet` matters: every
               console byte is a VM exit. Optional: lab.rootfstype=erofs with the .erofs image,
               kata.agent_log=console to copy the agent's own stderr log to the serial console)
    devices    the FIRST virtio-blk device is the image, read-only: build/lab/guest/rootfs-sandbox.ext4
               (the initrd mounts /dev/vda; it is the first block device the guest probes, so any other
               block device must come after it in slot order). Hybrid vsock (guest CID 3): the agent's
               ttrpc on port 1024 and JSON log lines on port 1025 (it listens; the host connects). virtio-fs:
               any tag; the agent mounts it when CreateSandbox passes a virtio-fs Storage with that source.
               virtio-rng and virtio-net (tap) are optional. Slot order otherwise does not matter; both
               `kata-vmm run --block IMG,ro --vsock UDS --fs TAG=DIR --net TAP` (slots: vsock, block, net,
               fs, rng; what lab/framework/sandbox.py boots) and the shim's dragonball order (block, vsock,
               rng, fs..., net...) both give /dev/vda = the image.
    memory     512 MiB and 1 vCPU (what the lab test and bench boot; containers need room beyond the agent's
               ~30 MiB RSS).
    PVH        the same kernel as ELF vmlinux (`kata-vmm extract-vmlinux vmlinuz OUT`) boots too, with no
               measured gain: VM start to SERVING median of 5 was 33.9 s against 30.5 s for the bzImage in
               the same lab VM session (boots range 26-38 s on the shared machine: noise dominates).

The guest's init is the initrd's busybox sh: it loads the virtio/vsock/virtio-fs/overlay modules and the
upcall server (one line on the console if that fails; the agent starts anyway), mounts
/dev/vda read-only under a tmpfs overlay as /, moves /dev /proc /sys into it and switch_roots to
/opt/kata-agent/start, which mounts cgroup2, /dev/pts, /dev/shm and /tmp (/, hence /run, is the tmpfs
overlay), brings lo up and runs the agent (python3 -S, crun as the runtime) as a child subreaper under that
shell; if the agent exits, the shell prints the tail of its log on the console and powers the guest off.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "build" / "lab" / "guest"
CACHE = REPO / "build" / "lab" / "cache"

# The pinned kernel: Debian bookworm's cloud flavour. To move the pin, take the ABI and version that
# `apt-cache policy linux-image-cloud-amd64` / `apt-cache depends linux-image-cloud-amd64` show.
KERNEL_ABI = "6.1.0-56"
KERNEL_DEB_VERSION = "6.1.192-2"
KERNEL_RELEASE = f"{KERNEL_ABI}-cloud-amd64"
KERNEL_PACKAGE = f"linux-image-{KERNEL_RELEASE}"

# Modules each initramfs loads (dependencies are added from modules.dep, in load order).
LAB_MODULES = ["virtio_pci", "virtio_console", "virtio-rng", "virtiofs", "overlay"]
TEST_MODULES = [
    "virtio_mmio", "virtio_pci", "vmw_vsock_virtio_transport", "virtio_blk", "virtio_net", "virtiofs",
    "overlay", "virtio-rng", "virtio_mem", "virtio_balloon",
]  # fmt: skip
SANDBOX_MODULES = [*TEST_MODULES, "erofs", "virtio_console"]

# Debian packages unpacked into the sandbox root (python3 with its stdlib, crun, busybox and their shared
# libraries; no dpkg, perl or docs). Versions are whatever the configured archive holds; they are part of
# the cache key, so an archive update rebuilds the image.
SANDBOX_PACKAGES = [
    "busybox-static", "crun", "python3", "python3-minimal", "python3.11", "python3.11-minimal",
    "libpython3-stdlib", "libpython3.11-minimal", "libpython3.11-stdlib", "media-types",
    "libc6", "libgcc-s1", "gcc-12-base", "libcap2", "libseccomp2", "libsystemd0", "libyajl2", "liblz4-1",
    "liblzma5", "libzstd1", "libgcrypt20", "libgpg-error0", "libexpat1", "zlib1g", "libssl3", "libffi8",
    "libbz2-1.0", "libcrypt1", "libdb5.3", "libncursesw6", "libtinfo6", "libnsl2", "libtirpc3",
    "libtirpc-common", "libreadline8", "readline-common", "libsqlite3-0", "libuuid1", "libgssapi-krb5-2",
    "libk5crypto3", "libkeyutils1", "libkrb5-3", "libkrb5support0", "libcom-err2",
]  # fmt: skip
SANDBOX_PRUNE = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/locale"]

SANDBOX_PYTHON = "python3.11"

BUSYBOX = Path("/bin/busybox")

# The agent's Python dependencies in the sandbox image: exact pins of cp311 manylinux wheels (pure Python
# except protobuf's abi3 upb extension), fetched once with `pip download` into build/lab/cache/wheels
# (with a pip of its own in build/lab/cache/pip-venv when the interpreter has none).
AGENT_WHEELS = [
    "trio==0.35.0", "attrs==26.1.0", "idna==3.20", "outcome==1.3.0.post0", "sniffio==1.3.1",
    "sortedcontainers==2.4.0", "protobuf==7.36.2", "pyroute2==0.9.7",
]  # fmt: skip
AGENT_SOURCES = [REPO / "packages" / "kata-agent" / "src" / "kata_agent",
                 REPO / "packages" / "kata-proto" / "src" / "kata_proto",
                 REPO / "packages" / "kata-sys-util" / "src" / "kata_sys_util"]  # fmt: skip
AGENT_DIR = "opt/kata-agent"

# The guest's dbs-upcall server, a kbuild module built against the pinned kernel's own headers.
UPCALL_SOURCE = REPO / "packages" / "kata-upcall" / "guest"
UPCALL_MODULE = "kata_upcall_srv.ko"
KERNEL_HEADERS = Path(f"/usr/src/linux-headers-{KERNEL_RELEASE}")
HEADERS_PACKAGE = f"linux-headers-{KERNEL_RELEASE}"


class BuildError(Exception):
    """A step of the image build failed; the message says what to do."""


def log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise BuildError(f"{cmd[0]} is not installed (./dev installs the lab's Debian packages)") from err
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise BuildError(f"{' '.join(cmd)} failed ({done.returncode}): {last[0].strip()[-400:]}")
    return done.stdout


# --- cpio (newc) --------------------------------------------------------------------------------------------
class Cpio:
    """A newc cpio archive written in memory; entries keep the order they are added in."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_b = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._buf.write(header + name_b)
        self._buf.write(b"\0" * (-(len(header) + len(name_b)) % 4))
        self._buf.write(data)
        self._buf.write(b"\0" * (-len(data) % 4))

    def mkdir(self, path: str) -> None:
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in self._dirs:
                self._dirs.add(sub)
                self._entry(sub, stat.S_IFDIR | 0o755)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self.mkdir(os.path.dirname(path))
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self._buf.write(b"\0" * (-self._buf.tell() % 512))
        return self._buf.getvalue()


# --- kernel ---------------------------------------------------------------------------------------
def fetch_deb(package: str, version: str) -> Path:
    """The .deb of package=version in the download cache, fetched with `apt-get download` if absent."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
    if found:
        return found[0]
    done = subprocess.run(
        ["apt-get", "download", f"{package}={version}"],
        cwd=CACHE,
        capture_output=True,
        text=True,
        check=False,
    )
    found = sorted(CACHE.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
    if done.returncode != 0 or not found:
        raise BuildError(
            f"apt-get download {package}={version} failed: {done.stderr.strip().splitlines()[-1:]}"
        )
    return found[0]


def candidate_version(package: str) -> str | None:
    out = run("apt-cache", "policy", package)
    for line in out.splitlines():
        if line.strip().startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            return None if value == "(none)" else value
    return None


def build_kernel(stage: Path) -> Path:
    """Unpack the pinned kernel into stage (vmlinuz, kernel-version, modules/); returns the modules dir."""
    try:
        deb = fetch_deb(KERNEL_PACKAGE, KERNEL_DEB_VERSION)
    except BuildError as err:
        meta = candidate_version("linux-image-cloud-amd64")
        raise BuildError(
            f"pinned kernel {KERNEL_PACKAGE}={KERNEL_DEB_VERSION} is not in the archive any more "
            f"(linux-image-cloud-amd64 is now {meta}; `apt-cache depends linux-image-cloud-amd64` names"
            f" its ABI): change KERNEL_ABI / KERNEL_DEB_VERSION in {Path(__file__).relative_to(REPO)}"
        ) from err
    unpacked = stage / "kernel-deb"
    run("dpkg-deb", "-x", str(deb), str(unpacked))
    shutil.copyfile(unpacked / "boot" / f"vmlinuz-{KERNEL_RELEASE}", stage / "vmlinuz")
    (stage / "kernel-version").write_text(KERNEL_RELEASE + "\n")
    modules = stage / "modules"
    (modules / "lib" / "modules").mkdir(parents=True)
    src = unpacked / "lib" / "modules" / KERNEL_RELEASE
    if not src.is_dir():  # merged-/usr packaging
        src = unpacked / "usr" / "lib" / "modules" / KERNEL_RELEASE
    shutil.move(str(src), modules / "lib" / "modules" / KERNEL_RELEASE)
    shutil.copyfile(unpacked / "boot" / f"config-{KERNEL_RELEASE}", stage / "config")
    run("depmod", "-b", str(modules), KERNEL_RELEASE)
    shutil.rmtree(unpacked)
    return modules / "lib" / "modules" / KERNEL_RELEASE


def module_closure(moddir: Path, names: list[str]) -> list[str]:
    """Relative paths of the named modules and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[os.path.basename(path).removesuffix(".ko").replace("-", "_")] = path
    builtin = {
        os.path.basename(p).removesuffix(".ko").replace("-", "_")
        for p in (moddir / "modules.builtin").read_text().split()
    }
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists a module's dependencies in the order that loading them in reverse works
        for dep in reversed(deps[path]):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise BuildError(f"kernel module {name} not found in {KERNEL_RELEASE}")
        visit(by_name[key])
    return order


def ensure_kernel_headers() -> Path:
    """KERNEL_HEADERS, installed by apt-get (HEADERS_PACKAGE at KERNEL_DEB_VERSION, and make) if missing."""
    if (KERNEL_HEADERS / "Module.symvers").exists() and shutil.which("make"):
        return KERNEL_HEADERS
    log(f"  apt-get install {HEADERS_PACKAGE}={KERNEL_DEB_VERSION} make")
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends",
         f"{HEADERS_PACKAGE}={KERNEL_DEB_VERSION}", "make"],
        capture_output=True, text=True, check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )  # fmt: skip
    if done.returncode != 0 or not (KERNEL_HEADERS / "Module.symvers").exists():
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise BuildError(
            f"cannot install {HEADERS_PACKAGE}={KERNEL_DEB_VERSION} (run as root, after apt-get update):"
            f" {last[0]}"
        )
    return KERNEL_HEADERS


def build_upcall_module(dest: Path, kcflags: str = "") -> Path:
    """UPCALL_SOURCE built against the pinned kernel's headers (W=1, warnings are errors), debug info
    stripped, written to dest/UPCALL_MODULE; the sources are built in a scratch copy, never in the tree.
    ``kcflags`` is for tests only (lab/tests/test_upcall_lab.py's loopback build)."""
    kdir = ensure_kernel_headers()
    with tempfile.TemporaryDirectory(prefix="kata-upcall-") as tmp:
        src = Path(tmp) / "guest"
        shutil.copytree(UPCALL_SOURCE, src, ignore=shutil.ignore_patterns("*.ko", "*.o", ".*.cmd", "*.mod*"))
        done = subprocess.run(
            ["make", "-C", str(src), f"KDIR={kdir}", f"KCFLAGS={kcflags}"],
            capture_output=True,
            text=True,
            check=False,
        )
        out = done.stdout + done.stderr
        if done.returncode != 0 or "warning:" in out.lower():
            raise BuildError(f"{UPCALL_MODULE} failed to build cleanly (W=1 -Werror): {out[-1500:]}")
        ko = src / UPCALL_MODULE
        vermagic = run("modinfo", "-F", "vermagic", str(ko)).split()
        if vermagic[:1] != [KERNEL_RELEASE]:
            raise BuildError(f"{UPCALL_MODULE} has vermagic {vermagic}, want {KERNEL_RELEASE}")
        run("strip", "--strip-debug", str(ko))
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ko, dest / UPCALL_MODULE)
    return dest / UPCALL_MODULE


def upcall_sources_digest() -> bytes:
    h = hashlib.sha256()
    for path in sorted(UPCALL_SOURCE.glob("*")):
        if path.is_file() and (path.name == "Makefile" or path.suffix in (".c", ".h")):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.digest()


def base_initramfs(moddir: Path, modules: list[str]) -> tuple[Cpio, str]:
    """A cpio with busybox, /dev/console and the modules; returns it and the shell lines that load them."""
    cpio = Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "newroot", "run"):
        cpio.mkdir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    loads = []
    for rel in module_closure(moddir, modules):
        cpio.file(f"lib/modules/{rel.rsplit('/', 1)[-1]}", (moddir / rel).read_bytes())
        loads.append(f"insmod /lib/modules/{rel.rsplit('/', 1)[-1]} || echo 'lab-init: insmod {rel} failed'")
    return cpio, "\n".join(loads)


INIT_PRELUDE = """#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
cmdline_arg() {  # value of NAME=... on the kernel command line
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1="*) echo "${word#*=}"; return 0;; esac
    done
    return 1
}
"""

TEST_INIT = (
    INIT_PRELUDE
    + """{loads}
# lab.virtiofs=TAG[,TAG...]: mount each virtio-fs tag at /mnt/TAG (a way to hand the guest a lab.run script)
for tag in $(cmdline_arg lab.virtiofs | tr , ' '); do
    mkdir -p "/mnt/$tag" && mount -t virtiofs "$tag" "/mnt/$tag"
done
run=$(cmdline_arg lab.run)
if [ -n "$run" ]; then
    sh "$run"
    echo "lab-init: $run exited $?"
else
    echo KATA-LAB-GUEST-OK
fi
sync
poweroff -f
"""
)

SANDBOX_INIT = (
    INIT_PRELUDE
    + """read -r t_init _ < /proc/uptime
{loads}
{upcall}
read -r t_modules _ < /proc/uptime
root=$(cmdline_arg lab.root || echo /dev/vda)
selfcheck=$(cmdline_arg lab.selfcheck > /dev/null && echo yes)
noagent=$(cmdline_arg lab.noagent > /dev/null && echo yes)
fstype=$(cmdline_arg lab.rootfstype || echo ext4)
mkdir -p /run/lower /run/rw
mount -t "$fstype" -o ro "$root" /run/lower || { echo "lab-init: cannot mount $root"; poweroff -f; }
mount -t tmpfs -o mode=0755 tmpfs /run/rw
mkdir -p /run/rw/upper /run/rw/work
mount -t overlay -o lowerdir=/run/lower,upperdir=/run/rw/upper,workdir=/run/rw/work overlay /newroot
read -r t_root _ < /proc/uptime
mkdir -p /newroot/run/lower
mount --move /run/lower /newroot/run/lower
for fs in dev proc sys; do mount --move "/$fs" "/newroot/$fs"; done
if [ -n "$selfcheck" ]; then
    # proves the image's userspace runs: python3 with its stdlib and crun, from the mounted root
    chroot /newroot /usr/bin/python3 -c \
        'import sys, ssl, json, sqlite3, asyncio; print("KATA-SANDBOX-PYTHON", sys.version.split()[0])'
    chroot /newroot /usr/bin/crun --version | head -n 1
fi
if [ -x /newroot/opt/kata-agent/start ] && [ -z "$noagent" ]; then
    # guest uptime at each boot step (lab/bench/agent_boot.py --trace reads them)
    printf 'initrd-init %s\\nmodules-loaded %s\\nroot-mounted %s\\n' "$t_init" "$t_modules" "$t_root" \\
        > /newroot/run/kata-boot.log
    exec switch_root /newroot /opt/kata-agent/start
fi
echo KATA-SANDBOX-READY
sync
poweroff -f
"""
)


def lab_init_script() -> str:
    return INIT_PRELUDE + "{loads}\n" + (REPO / "lab" / "images" / "lab-init.sh").read_text()


# the sandbox init loads the upcall server after vsock and virtio_mmio, before the agent; failing soft
UPCALL_LOAD = (
    f"insmod /lib/modules/{UPCALL_MODULE} 2>/dev/null"
    f" || echo 'lab-init: insmod {UPCALL_MODULE} failed: no upcall hot-plug'"
)


def build_initrd(
    moddir: Path, modules: list[str], init: str, dest: Path, upcall_module: Path | None = None
) -> None:
    cpio, loads = base_initramfs(moddir, modules)
    upcall = ""
    if upcall_module is not None:
        cpio.file(f"lib/modules/{UPCALL_MODULE}", upcall_module.read_bytes())
        upcall = UPCALL_LOAD
    cpio.file("init", init.replace("{loads}", loads).replace("{upcall}", upcall).encode(), 0o755)
    dest.write_bytes(cpio.finish())


# --- sandbox root ---------------------------------------------------------------------------------
def sandbox_versions() -> dict[str, str]:
    """Candidate version of every sandbox package, from one `apt-cache policy` call."""
    versions: dict[str, str] = {}
    current = None
    for line in run("apt-cache", "policy", *SANDBOX_PACKAGES).splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            if value != "(none)":
                versions[current.split(":")[0]] = value
    missing = [p for p in SANDBOX_PACKAGES if p not in versions]
    if missing:
        raise BuildError(f"Debian packages without a candidate version: {missing} (run apt-get update)")
    return {p: versions[p] for p in SANDBOX_PACKAGES}


def build_sandbox_root(stage: Path, versions: dict[str, str]) -> None:
    root = stage / "sandbox-root"
    root.mkdir()
    for i, (pkg, version) in enumerate(versions.items(), 1):
        if i % 10 == 1:
            log(f"  sandbox packages {i}-{min(i + 9, len(versions))} of {len(versions)}")
        run("dpkg-deb", "-x", str(fetch_deb(pkg, version)), str(root))
    # merged /usr, as a Debian 12 system has it
    for top in ("bin", "sbin", "lib", "lib64"):
        src = root / top
        dst = root / "usr" / top
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(src)
        dst.mkdir(parents=True, exist_ok=True)
        (root / top).symlink_to(f"usr/{top}")
    for rel in SANDBOX_PRUNE:
        shutil.rmtree(root / rel, ignore_errors=True)
    byte_compile_stdlib(root)
    for d in ("dev", "proc", "sys", "run", "tmp", "etc", "var/tmp", "root", "opt/kata-agent", "mnt"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "hostname").write_text("kata-sandbox\n")
    (root / "usr" / "bin" / "sh").unlink(missing_ok=True)
    (root / "usr" / "bin" / "sh").symlink_to("busybox")
    install_agent(root / AGENT_DIR)


def byte_compile_stdlib(root: Path) -> None:
    """Compile the image's Python stdlib to .pyc, as Debian's postinst would (else every import compiles).

    unchecked-hash .pyc files do not depend on file times, so the image stays reproducible.
    """
    stdlib = root / "usr" / "lib" / SANDBOX_PYTHON
    compiler = Path("/usr/bin") / SANDBOX_PYTHON  # same major.minor as the image: same .pyc format
    if not compiler.exists():
        log(f"  {compiler} missing: the sandbox's stdlib stays uncompiled (slower imports in the guest)")
        return
    skip = "lib2to3/tests|test/|idlelib|tkinter|turtledemo"
    run(str(compiler), "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
        "-x", skip, "-s", str(root), "-p", "/", str(stdlib))  # fmt: skip


AGENT_START = """#!/bin/sh
# The sandbox's init after switch_root (pid 1): the guest's filesystems, then the agent as a child subreaper.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
read -r up _ < /proc/uptime
echo "start-script $up" >> /run/kata-boot.log
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
mount -t mqueue mqueue /dev/mqueue 2>/dev/null
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
hostname kata-sandbox
ip link set lo up
# every controller the kernel offers, for the containers' cgroups below the root
for c in $(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null); do
    echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
done
log=/run/kata-agent.log
flags=-S
case " $(cat /proc/cmdline) " in *" kata.agent_log=console "*) log=/dev/console;; esac
case " $(cat /proc/cmdline) " in *" kata.importtime "*) flags="$flags -X importtime";; esac
read -r up _ < /proc/uptime
echo "start-script-done $up" >> /run/kata-boot.log
PYTHONPATH=/opt/kata-agent/lib PYTHONDONTWRITEBYTECODE=1 \\
    /usr/bin/python3 $flags /opt/kata-agent/lib/kata_agent_start.py \\
    --runtime /usr/bin/crun --runtime-root /run/crun --run-dir /run/kata-containers 2>>"$log"
echo "kata-agent exited $?"
[ "$log" = /dev/console ] || tail -n 20 "$log"
sync
poweroff -f
"""

AGENT_ENTRY = """\"\"\"The sandbox image's agent entry point (/opt/kata-agent/start runs it).\"\"\"
import sys


def mark(what):
    # guest uptime at each start-up step, for lab/bench/agent_boot.py --trace
    try:
        with open("/proc/uptime") as up, open("/run/kata-boot.log", "a") as out:
            out.write(what + " " + up.read().split()[0] + "\\n")
    except OSError:
        pass


mark("python-main")
from kata_agent._main import main  # noqa: E402

mark("agent-imported")
sys.exit(main(sys.argv[1:]))
"""


def install_agent(dest: Path) -> None:
    """AGENT_SOURCES and the pinned wheels into dest/lib, byte-compiled; dest/start runs the agent."""
    lib = dest / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    for wheel in fetch_wheels():
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(lib)
    for src in AGENT_SOURCES:
        shutil.copytree(src, lib / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for info in list(lib.glob("*.dist-info")):
        shutil.rmtree(info)
    (lib / "kata_agent_start.py").write_text(AGENT_ENTRY)
    compiler = Path("/usr/bin") / SANDBOX_PYTHON
    run(str(compiler), "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
        "-s", str(dest.parent.parent), "-p", "/", str(lib))  # fmt: skip
    (dest / "start").write_text(AGENT_START)
    (dest / "start").chmod(0o755)


def _has_pip(python: str) -> bool:
    if not os.access(python, os.X_OK):
        return False
    probe = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, check=False)
    return probe.returncode == 0


def pip_command(venv: Path) -> list[str]:
    """A command that runs pip: this interpreter's own, else that of a venv made for it (offline, with
    ensurepip, or `uv venv --seed`). nox's uv-made venvs and a stock Debian python3 have no pip."""
    if _has_pip(sys.executable):
        return [sys.executable, "-m", "pip"]
    python = venv / "bin" / "python"
    if not _has_pip(str(python)):
        shutil.rmtree(venv, ignore_errors=True)
        uv = shutil.which("uv")
        probe = [sys.executable, "-c", "import ensurepip"]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            run(sys.executable, "-m", "venv", str(venv))
        elif uv is not None:
            run(uv, "venv", "-q", "--seed", "--python", sys.executable, str(venv))
        else:
            raise BuildError("no pip and no way to make one: install python3-venv (./dev installs it)")
    return [str(python), "-m", "pip"]


def fetch_wheels() -> list[Path]:
    """The AGENT_WHEELS files from build/lab/cache/wheels, downloaded with pip when missing."""
    cache = CACHE / "wheels"
    cache.mkdir(parents=True, exist_ok=True)

    def find(pin: str) -> Path | None:
        name, version = pin.split("==")
        hits = sorted(cache.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        return hits[0] if hits else None

    missing = [pin for pin in AGENT_WHEELS if find(pin) is None]
    if missing:
        log(f"  pip download {' '.join(missing)}")
        run(*pip_command(CACHE / "pip-venv"), "download", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "any",
            "-d", str(cache), *missing)  # fmt: skip
    found = [find(pin) for pin in AGENT_WHEELS]
    absent = [pin for pin, path in zip(AGENT_WHEELS, found, strict=True) if path is None]
    if absent:
        raise BuildError(f"wheels not downloaded: {absent} (check pip's access to PyPI)")
    return [p for p in found if p is not None]


def agent_sources_digest() -> bytes:
    h = hashlib.sha256()
    for src in AGENT_SOURCES:
        for path in sorted(src.rglob("*.py")):
            h.update(str(path.relative_to(src.parent)).encode() + b"\0" + path.read_bytes())
    return h.digest()


def make_ext4(src: Path, dest: Path) -> None:
    size_kib = sum(f.stat().st_size for f in src.rglob("*") if f.is_file() and not f.is_symlink()) // 1024
    size_kib = int(size_kib * 1.25) + 32 * 1024  # room for metadata; the guest mounts it read-only
    run("mkfs.ext4", "-q", "-F", "-L", "kata-sandbox", "-U", "clear", "-m", "0", "-E", "root_owner=0:0",
        "-O", "^has_journal", "-d", str(src), str(dest), f"{size_kib}k")  # fmt: skip


def make_erofs(src: Path, dest: Path) -> None:
    # -T0 and fixed UUID: the same inputs give the same image bytes
    run("mkfs.erofs", "-T0", "-U", "00000000-0000-0000-0000-000000000000", "--all-root", str(dest), str(src))


# --- containerd 2.x -------------------------------------------------------------------------------
# containerd 2.x for the lab's CRI tests beside bookworm's 1.6 (issue 18): Debian sid's package, pinned by
# the version, file name and SHA256 that sid's index lists (dists/sid/main/binary-amd64/Packages.xz,
# `Package: containerd`), downloaded from the archive, checked and unpacked with `dpkg-deb -x` into
# build/lab/containerd-2.x (never installed over the system's). Its Go binaries need only libc >= 2.34:
# bookworm's 2.36 runs them. To move the pin, copy Version, Filename and SHA256 from that index (sid's pool
# keeps only its current version: the old one disappears from the archive soon after an upload; until the
# pin is moved, fetch_containerd2 takes the containerd 2.x that testing's, then sid's, index lists).
CONTAINERD2_VERSION = "2.1.9+ds1-5"
CONTAINERD2_FILENAME = "pool/main/c/containerd/containerd_2.1.9+ds1-5_amd64.deb"
CONTAINERD2_SHA256 = "2dda86ce7033fd612fc50e136679d8174ccad680eb29cd4611e0d2a1b84cf591"
DEBIAN_MIRROR = os.environ.get("KATA_LAB_DEBIAN_MIRROR", "https://deb.debian.org/debian")
CONTAINERD2_DIR = REPO / "build" / "lab" / "containerd-2.x"
# what the lab uses of it: the daemon, its ctr and its runc shim (preferred to bookworm's 1.6 one)
CONTAINERD2_BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str) -> Path:
    """``url`` into ``dest`` (through ``dest``.part, renamed once its SHA256 is ``sha256``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as err:
        part.unlink(missing_ok=True)
        raise BuildError(f"cannot download {url}: {err}") from err
    got = sha256_of(part)
    if got != sha256:
        part.unlink()
        raise BuildError(f"{url} has SHA256 {got}, pinned {sha256}")
    part.rename(dest)
    return dest


class DebianPackage(NamedTuple):
    """One package as a Debian index lists it."""

    version: str
    filename: str
    sha256: str


CONTAINERD2_PIN = DebianPackage(CONTAINERD2_VERSION, CONTAINERD2_FILENAME, CONTAINERD2_SHA256)
# where a successor of a pin that left the archive is looked up, in this order (testing moves slower than sid;
# the pool keeps a file while any suite lists it)
CONTAINERD2_SUITES = ("forky", "sid")


def debian_index_package(suite: str, name: str, version_prefix: str) -> DebianPackage | None:
    """``name`` as ``suite``'s amd64 main index lists it, if its version starts with ``version_prefix``."""
    url = f"{DEBIAN_MIRROR}/dists/{suite}/main/binary-amd64/Packages.xz"
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            text = lzma.decompress(response.read()).decode()
    except (OSError, lzma.LZMAError) as err:
        raise BuildError(f"cannot read {url}: {err}") from err
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Package") == name and fields.get("Version", "").startswith(version_prefix):
            return DebianPackage(fields["Version"], fields["Filename"], fields["SHA256"])
    return None


def _containerd2_unpacked(out: Path, package: DebianPackage) -> bool:
    stamp = out / ".sha256"
    present = all((out / "usr" / "bin" / name).exists() for name in CONTAINERD2_BINARIES)
    return present and stamp.exists() and stamp.read_text().strip() == package.sha256


def _containerd2_deb(package: DebianPackage) -> Path:
    """``package``'s .deb in build/lab/cache, downloaded unless a copy with its SHA256 is there."""
    deb = CACHE / Path(package.filename).name
    if not deb.exists() or sha256_of(deb) != package.sha256:
        log(f"containerd {package.version} from {DEBIAN_MIRROR}")
        download(f"{DEBIAN_MIRROR}/{package.filename}", deb, package.sha256)
    return deb


def fetch_containerd2(out: Path = CONTAINERD2_DIR) -> Path:
    """containerd 2.x unpacked into ``out``; returns its bin directory (``out``/usr/bin).

    The pin, or when the archive no longer has it (sid's pool drops a version soon after the next upload) the
    containerd 2.x that testing's (then sid's) index lists, checked against that index's SHA256 and said in
    the log: the lab's 2.x tests keep running until the pin is moved. Idempotent: nothing is fetched or
    unpacked when ``out`` holds the package's binaries (its .sha256 stamp names the package); the .deb is kept
    in build/lab/cache and used again once its SHA256 is checked."""
    bin_dir = out / "usr" / "bin"
    package = CONTAINERD2_PIN
    if _containerd2_unpacked(out, package):
        return bin_dir
    try:
        deb = _containerd2_deb(package)
    except BuildError as gone:
        successor, looked = None, []
        for suite in CONTAINERD2_SUITES:
            try:
                successor = debian_index_package(suite, "containerd", "2.")
            except BuildError as err:
                looked.append(str(err))
                continue
            if successor is not None and successor != package:
                log(f"containerd {package.version}: {gone}")
                log(f"using containerd {successor.version} instead, as {suite}'s index lists it")
                log(f"move the pin in {Path(__file__).name} to it (Version, Filename, SHA256 of that index)")
                break
            looked.append(f"{suite}'s index has no other containerd 2.x")
            successor = None
        if successor is None:
            raise BuildError(
                f"{gone}; no successor either ({'; '.join(looked)}): pin a containerd 2.x (Version, "
                f"Filename, SHA256 from {DEBIAN_MIRROR}/dists/sid/main/binary-amd64/Packages.xz) in "
                f"{Path(__file__).name}"
            ) from gone
        package = successor
        if _containerd2_unpacked(out, package):
            return bin_dir
        deb = _containerd2_deb(package)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".containerd2-") as tmp:
        stage = Path(tmp) / "unpacked"
        run("dpkg-deb", "-x", str(deb), str(stage))
        (stage / ".sha256").write_text(package.sha256 + "\n")
        stage.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        stage.rename(out)
    log(f"containerd {package.version} unpacked into {out}")
    return bin_dir


# --- driver ---------------------------------------------------------------------------------------
def inputs_digest(versions: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update((REPO / "lab" / "images" / "lab-init.sh").read_bytes())
    h.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    h.update(json.dumps([KERNEL_PACKAGE, KERNEL_DEB_VERSION, versions, AGENT_WHEELS]).encode())
    h.update(agent_sources_digest())
    h.update(upcall_sources_digest())
    return h.hexdigest()


OUTPUTS = [
    "vmlinuz", "kernel-version", "config", "modules", "initrd-lab.img", "initrd-test.img",
    "rootfs-sandbox.ext4", "rootfs-sandbox.erofs", "initrd-sandbox.img", UPCALL_MODULE,
]  # fmt: skip


def build(force: bool) -> None:
    if not BUSYBOX.exists():
        raise BuildError(f"{BUSYBOX} missing: install busybox-static (./dev installs it)")
    try:
        fetch_containerd2()
    except BuildError as err:
        # only the containerd 2.x tests need it: they fail (lab) or skip (host) naming the command
        log(f"containerd {CONTAINERD2_VERSION} not fetched, the guest assets go on: {err}")
    versions = sandbox_versions()
    digest = inputs_digest(versions)
    stamp = OUT / ".inputs"
    up_to_date = stamp.exists() and stamp.read_text().strip() == digest
    if not force and up_to_date and all((OUT / name).exists() for name in OUTPUTS):
        log(f"guest assets up to date in {OUT.relative_to(REPO)}")
        return
    started = time.monotonic()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT.parent, prefix=".guest-") as tmp:
        stage = Path(tmp)
        log(f"kernel {KERNEL_PACKAGE}={KERNEL_DEB_VERSION}")
        moddir = build_kernel(stage)
        log("initrd-lab.img (boots the lab VM)")
        build_initrd(moddir, LAB_MODULES, lab_init_script(), stage / "initrd-lab.img")
        log("initrd-test.img")
        build_initrd(moddir, TEST_MODULES, TEST_INIT, stage / "initrd-test.img")
        log(f"sandbox root: {len(versions)} Debian packages")
        build_sandbox_root(stage, versions)
        log("rootfs-sandbox.ext4, rootfs-sandbox.erofs")
        make_ext4(stage / "sandbox-root", stage / "rootfs-sandbox.ext4")
        make_erofs(stage / "sandbox-root", stage / "rootfs-sandbox.erofs")
        shutil.rmtree(stage / "sandbox-root")
        log(f"{UPCALL_MODULE} against {KERNEL_HEADERS}")
        upcall = build_upcall_module(stage)
        log("initrd-sandbox.img")
        build_initrd(moddir, SANDBOX_MODULES, SANDBOX_INIT, stage / "initrd-sandbox.img", upcall)
        (stage / ".inputs").write_text(digest + "\n")
        stage.chmod(0o755)
        # swap the finished directory in; a failed build leaves the old assets untouched
        old = OUT.parent / ".guest-old"
        shutil.rmtree(old, ignore_errors=True)
        if OUT.exists():
            OUT.rename(old)
        stage.rename(OUT)
        stage.mkdir()  # TemporaryDirectory cleans up what it created
        shutil.rmtree(old, ignore_errors=True)
    log(f"guest assets built in {time.monotonic() - started:.0f} s into {OUT.relative_to(REPO)}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the inputs did not change")
    parser.add_argument(
        "--upcall-module", metavar="DIR", type=Path, help=f"build only {UPCALL_MODULE}, into DIR"
    )
    parser.add_argument(
        "--containerd2",
        action="store_true",
        help=f"only fetch and unpack containerd 2.x into {CONTAINERD2_DIR}",
    )
    args = parser.parse_args()
    try:
        if args.containerd2:
            log(f"containerd {CONTAINERD2_VERSION} in {fetch_containerd2()}")
            return 0
        if args.upcall_module is not None:
            log(f"{build_upcall_module(args.upcall_module)} built against {KERNEL_HEADERS}")
            return 0
        build(args.force)
    except BuildError as err:
        print(f"images: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
