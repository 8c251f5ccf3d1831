"""Where the guest assets are (build/lab/guest, from lab/images/build.py) and small helpers around them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES_HINT = "run `./dev nox -s images` (or python3 lab/images/build.py)"


class LabAssetError(Exception):
    """A guest asset is missing; the message names the command that builds it."""


def in_labvm() -> bool:
    """True inside the lab VM (lab/labvm sets KATA_LABVM=1 for the command it runs)."""
    return os.environ.get("KATA_LABVM") == "1"


def venv_bin() -> Path:
    """The bin directory of the running interpreter's venv (where the packages' commands are installed:
    kata-vmm, containerd-shim-kata-v2), whatever PATH says."""
    return Path(sys.prefix) / "bin"


@dataclass(frozen=True)
class GuestAssets:
    """The files lab/images/build.py produces."""

    root: Path = REPO / "build" / "lab" / "guest"

    @property
    def kernel(self) -> Path:
        return self._need("vmlinuz")

    @property
    def initrd_test(self) -> Path:
        return self._need("initrd-test.img")

    @property
    def initrd_sandbox(self) -> Path:
        return self._need("initrd-sandbox.img")

    @property
    def rootfs_sandbox(self) -> Path:
        """The sandbox root as ext4 (initrd-sandbox.img's default, lab.rootfstype=ext4)."""
        return self._need("rootfs-sandbox.ext4")

    @property
    def rootfs_sandbox_erofs(self) -> Path:
        """The same tree as erofs (boot it with lab.rootfstype=erofs)."""
        return self._need("rootfs-sandbox.erofs")

    @property
    def upcall_module(self) -> Path:
        """The guest's dbs-upcall server, kata_upcall_srv.ko (initrd-sandbox.img loads it)."""
        return self._need("kata_upcall_srv.ko")

    @property
    def kernel_release(self) -> str:
        return self._need("kernel-version").read_text().strip()

    def _need(self, name: str) -> Path:
        path = self.root / name
        if not path.exists():
            raise LabAssetError(f"{path} missing: {IMAGES_HINT}")
        return path


def initrd_with_files(base: Path, files: dict[str, bytes | str], dest: Path) -> Path:
    """Write ``base`` followed by a cpio of ``files`` (path inside the guest -> content) to ``dest``.

    The kernel unpacks concatenated cpio archives in order, so this is how a test hands initrd-test.img a
    script to run: ``initrd_with_files(assets.initrd_test, {"/lab/run.sh": "..."}, tmp / "initrd")`` and
    ``lab.run=/lab/run.sh`` on the command line. Files are created mode 0755.
    """
    if shutil.which("cpio") is None:
        raise LabAssetError("cpio not installed (./dev installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for name, content in files.items():
            path = stage / name.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
            path.chmod(0o755)
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
        extra = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            input="\n".join(names).encode(),
            cwd=stage,
            capture_output=True,
            check=True,
        ).stdout
    dest.write_bytes(base.read_bytes() + extra)
    return dest
