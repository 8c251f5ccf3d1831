#!/usr/bin/env python3
"""Build a busybox container image as an OCI image-layout tarball, from Debian's busybox-static (stdlib only).

    python3 lab/images/busybox_oci.py [--out TAR] [--name NAME]   # default build/lab/busybox-oci.tar
    ctr -a SOCK images import build/lab/busybox-oci.tar           # -> docker.io/library/busybox:kata

The tarball holds `oci-layout`, `index.json` and `blobs/sha256/` with one manifest, one config and one gzip
layer (/bin/busybox, a symlink per applet in /bin, and the usual empty directories). The same busybox binary
gives the same bytes (every timestamp is 0, owners root, entries sorted, gzip without name or time), so the
image digest only moves when Debian's busybox does.

containerd 1.6's `ctr images import` names an image from the index entry's `io.containerd.image.name`
annotation (taken as is), else from `org.opencontainers.image.ref.name` behind an `import-<date>` prefix
unless `--base-name` is given; both are set here, so the full name needs no ctr flag.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "build" / "lab" / "busybox-oci.tar"
DEFAULT_NAME = "docker.io/library/busybox:kata"
BUSYBOX = Path("/bin/busybox")
DIRS = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "proc": 0o555, "root": 0o700, "sys": 0o555, "tmp": 0o1777}
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class ImageError(Exception):
    """The image could not be built (busybox missing, an applet list that makes no sense)."""


@dataclass(frozen=True)
class Blob:
    """Content-addressed bytes with the descriptor that names them."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **extra}


def applets(busybox: Path) -> list[str]:
    """The applet names `busybox --list` prints (one per line)."""
    try:
        out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise ImageError(f"{busybox} --list failed ({err}): install Debian's busybox-static") from err
    names = sorted({n.strip() for n in out.splitlines() if n.strip()})
    if "sh" not in names or any("/" in n for n in names):
        raise ImageError(f"{busybox} --list gave an unexpected applet list")
    return names


def _canonical(data: object) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _tar_info(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def layer_tar(busybox_bytes: bytes, names: list[str]) -> bytes:
    """The uncompressed root filesystem layer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory, mode in sorted(DIRS.items()):
            tar.addfile(_tar_info(directory + "/", tarfile.DIRTYPE, mode))
        tar.addfile(
            _tar_info("bin/busybox", tarfile.REGTYPE, 0o755, len(busybox_bytes)), io.BytesIO(busybox_bytes)
        )
        for name in names:
            if name != "busybox":
                tar.addfile(_tar_info(f"bin/{name}", tarfile.SYMTYPE, 0o777, link="busybox"))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return out.getvalue()


def build_layout(
    busybox: Path = BUSYBOX,
    name: str = DEFAULT_NAME,
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
) -> dict[str, bytes]:
    """Every file of the OCI image layout, path -> bytes. ``entrypoint``/``cmd`` set the image config's
    Entrypoint (none by default) and Cmd (``["sh"]`` by default), e.g. for a pause image."""
    if not busybox.is_file():
        raise ImageError(f"{busybox} not found: install Debian's busybox-static")
    raw = layer_tar(busybox.read_bytes(), applets(busybox))
    layer = Blob(MEDIA_LAYER_GZIP, _gzip(raw))
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    config = Blob(
        MEDIA_CONFIG,
        _canonical(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": "1970-01-01T00:00:00Z",
                "config": {
                    "Env": [ENV_PATH],
                    "Cmd": cmd if cmd is not None else ["sh"],
                    "WorkingDir": "/",
                    **({"Entrypoint": entrypoint} if entrypoint is not None else {}),
                },
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "lab/images/busybox_oci.py"}],
            }
        ),
    )
    manifest = Blob(
        MEDIA_MANIFEST,
        _canonical(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_MANIFEST,
                "config": config.descriptor(),
                "layers": [layer.descriptor()],
            }
        ),
    )
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            manifest.descriptor(
                platform={"architecture": "amd64", "os": "linux"},
                annotations={"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
            )
        ],
    }
    files = {
        "oci-layout": _canonical({"imageLayoutVersion": "1.0.0"}),
        "index.json": _canonical(index),
    }
    for blob in (layer, config, manifest):
        files["blobs/sha256/" + blob.digest.removeprefix("sha256:")] = blob.data
    return files


def layout_tar(files: dict[str, bytes]) -> bytes:
    """The layout as one deterministic tar (directories first, then files, sorted)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs/", "blobs/sha256/"):
            tar.addfile(_tar_info(directory, tarfile.DIRTYPE, 0o755))
        for path in sorted(files):
            data = files[path]
            tar.addfile(_tar_info(path, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    return buf.getvalue()


def build(
    out: Path = DEFAULT_OUT,
    name: str = DEFAULT_NAME,
    busybox: Path = BUSYBOX,
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
) -> Path:
    """Write the image tarball to ``out`` (atomically; untouched when the bytes are the same)."""
    data = layout_tar(build_layout(busybox, name, entrypoint=entrypoint, cmd=cmd))
    if out.is_file() and out.read_bytes() == data:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"tarball to write (default {DEFAULT_OUT})"
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"image name (default {DEFAULT_NAME})")
    parser.add_argument("--busybox", type=Path, default=BUSYBOX, help="static busybox binary")
    args = parser.parse_args(argv)
    try:
        path = build(args.out, args.name, args.busybox)
    except ImageError as err:
        print(f"busybox_oci: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
