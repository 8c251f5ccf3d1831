"""`kata-shim install` / `uninstall`: put the shim into a host's containerd the way Kata's packages do.

    kata-shim install --assets build/lab/guest [--prefix DIR] [--force]
    kata-shim uninstall [--prefix DIR]

Without `--prefix` (Kata's distribution layout, which the shipped configuration points at):

| what | where |
|---|---|
| guest kernel, initrd, root image | /usr/share/kata-containers/{vmlinuz,kata-containers-{initrd.img,img}} |
| `containerd-shim-kata-v2`, `kata-ctl` | /usr/local/bin (wrappers into this Python environment) |
| configuration | /etc/kata-containers/runtime-rs/configuration.toml (the shipped one, asset paths set) |
| manifest | /var/lib/kata-shim/install.json (every file and directory the install created) |

With `--prefix DIR` (e.g. /opt/kata, as Kata's own tarball): DIR/share/kata-containers/...,
DIR/bin/containerd-shim-kata-v2, DIR/share/defaults/kata-containers/runtime-rs/configuration.toml,
DIR/var/lib/kata-shim/install.json. Install is idempotent; it refuses to replace a file it did not
create unless `--force`. Uninstall removes exactly what the manifest lists (a file changed since is kept
and named) and the directories the install created, when empty.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import typing
from pathlib import Path

from kata_shim.config import shipped_config
from kata_shim.shim._zygote import end_zygotes, zygote_dir

ASSETS = {
    # installed name: the file of `nox -s images` (build/lab/guest) it is copied from
    "vmlinuz": "vmlinuz",
    "kata-containers-initrd.img": "initrd-sandbox.img",
    "kata-containers.img": "rootfs-sandbox.ext4",
}
SHIM = "containerd-shim-kata-v2"
KATA_CTL_MAIN = "import sys; from kata_shim._kata_ctl import main; sys.exit(main())"
ASSETS_HINT = "build them with `./dev nox -s images` (or use `./dev install`)"


class InstallError(Exception):
    """Install or uninstall cannot proceed; the message says what and what to do."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where an install puts each thing."""

    assets_dir: Path
    bin_dir: Path
    config: Path
    manifest: Path

    @classmethod
    def for_prefix(cls, prefix: Path | None) -> Layout:
        """Kata's distribution layout (no prefix) or its self-contained one under `prefix`."""
        if prefix is None:
            return cls(
                assets_dir=Path("/usr/share/kata-containers"),
                bin_dir=Path("/usr/local/bin"),
                config=Path("/etc/kata-containers/runtime-rs/configuration.toml"),
                manifest=Path("/var/lib/kata-shim/install.json"),
            )
        prefix = prefix.absolute()
        return cls(
            assets_dir=prefix / "share" / "kata-containers",
            bin_dir=prefix / "bin",
            config=prefix / "share" / "defaults" / "kata-containers" / "runtime-rs" / "configuration.toml",
            manifest=prefix / "var" / "lib" / "kata-shim" / "install.json",
        )


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shim_command() -> list[str]:
    """How the wrapper runs this environment's shim."""
    script = Path(sys.executable).parent / SHIM
    return [str(script)] if script.exists() else [sys.executable, "-m", "kata_shim"]


def configuration_text(layout: Layout) -> str:
    """The shipped configuration with its asset paths pointed at `layout.assets_dir`."""
    text = shipped_config().read_text()
    return text.replace("/usr/share/kata-containers/", f"{layout.assets_dir}/")


#: containerd's CRI plugin that holds the runtime tables, by containerd configuration version (2: 1.6/1.7,
#: 3: 2.x, where the runtimes moved to io.containerd.cri.v1.runtime)
CRI_RUNTIME_PLUGIN = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}


def containerd_config_version(version_output: str | None) -> int:
    """The configuration version of the containerd whose ``containerd --version`` printed
    ``version_output`` (e.g. "containerd github.com/containerd/containerd/v2 2.1.9 ..."): 3 from 2.0 on,
    else 2 (also when unknown: 1.6 and 1.7 read version 2, and 2.x still reads it)."""
    for word in (version_output or "").split():
        major = word.lstrip("v").split(".")[0]
        if "." in word and major.isdigit():
            return 3 if int(major) >= 2 else 2
    return 2


def containerd_snippet(layout: Layout, config_version: int = 2) -> str:
    """What to add to containerd's config.toml (CRI) for runtime io.containerd.kata.v2 as the ``kata``
    handler, in a file of configuration version 2 (containerd 1.6/1.7) or 3 (2.x, with the shim as the
    pod's sandboxer). The tables only: the file has its own ``version`` line."""
    plugin = CRI_RUNTIME_PLUGIN.get(config_version)
    if plugin is None:
        raise InstallError(f"containerd configuration version {config_version}: 2 or 3")
    table = f'plugins."{plugin}".containerd.runtimes.kata'
    sandboxer = '  sandboxer = "shim"\n' if config_version == 3 else ""
    return (
        f"[{table}]\n"
        '  runtime_type = "io.containerd.kata.v2"\n'
        f"{sandboxer}"
        '  pod_annotations = ["io.katacontainers.*"]\n'
        "  privileged_without_host_devices = true\n"
        f"  [{table}.options]\n"
        f'    ConfigPath = "{layout.config}"\n'
    )


class Manifest(typing.TypedDict):
    """install.json: the files install wrote (path, sha256) and the directories it created."""

    files: list[dict[str, str]]
    dirs: list[str]


def _load_manifest(layout: Layout) -> Manifest:
    try:
        data = json.loads(layout.manifest.read_text())
    except FileNotFoundError:
        return {"files": [], "dirs": []}
    except (OSError, ValueError) as err:
        raise InstallError(f"{layout.manifest}: unreadable manifest ({err}); remove it by hand") from err
    return {"files": list(data.get("files", [])), "dirs": list(data.get("dirs", []))}


def _write_atomic(path: Path, data: bytes | Path, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, Path):
                with open(data, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            else:
                out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install(assets: Path, layout: Layout, force: bool = False) -> list[str]:
    """Install (idempotent); returns one line per file saying what happened."""
    for name, source in ASSETS.items():
        if not (assets / source).is_file():
            raise InstallError(f"{assets / source} missing (for {name}): {ASSETS_HINT}")
    manifest = _load_manifest(layout)
    owned = {entry["path"]: entry for entry in manifest["files"]}
    wrapper = "#!/bin/sh\n# installed by kata-shim install\nexec " + " ".join(shim_command()) + ' "$@"\n'
    kata_ctl = (
        f'#!/bin/sh\n# installed by kata-shim install\nexec {sys.executable} -c {KATA_CTL_MAIN!r} "$@"\n'
    )
    plan: list[tuple[Path, bytes | Path, int]] = [
        *[(layout.assets_dir / name, assets / source, 0o644) for name, source in ASSETS.items()],
        (layout.bin_dir / SHIM, wrapper.encode(), 0o755),
        (layout.bin_dir / "kata-ctl", kata_ctl.encode(), 0o755),
        (layout.config, configuration_text(layout).encode(), 0o644),
    ]
    for target, _, _ in plan:
        if target.exists() and str(target) not in owned and not force:
            raise InstallError(
                f"{target} exists and was not installed by kata-shim: move it away or use --force"
            )
    report = []
    created_dirs = [Path(d) for d in manifest["dirs"]]
    for target, data, mode in [*plan, (layout.manifest, b"", 0o644)]:
        missing = []
        parent = target.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            directory.mkdir(mode=0o755)
            created_dirs.append(directory)
        if target == layout.manifest:
            break
        want = hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else _digest(data)
        if target.exists() and _digest(target) == want:
            report.append(f"unchanged {target}")
        else:
            _write_atomic(target, data, mode)
            report.append(f"installed {target}")
        owned[str(target)] = {"path": str(target), "sha256": want}
    record = {"files": list(owned.values()), "dirs": [str(d) for d in dict.fromkeys(created_dirs)]}
    _write_atomic(layout.manifest, (json.dumps(record, indent=1) + "\n").encode(), 0o644)
    return report


def uninstall(layout: Layout) -> list[str]:
    """Remove what the manifest lists; returns one line per file."""
    if not layout.manifest.exists():
        return [f"nothing to remove: no {layout.manifest}"]
    manifest = _load_manifest(layout)
    report = []
    for entry in manifest["files"]:
        path = Path(entry["path"])
        if not path.exists():
            continue
        if path.is_file() and not path.is_symlink() and _digest(path) == entry["sha256"]:
            path.unlink()
            report.append(f"removed {path}")
        else:
            report.append(f"kept {path}: changed since kata-shim installed it")
    layout.manifest.unlink()
    for directory in sorted((Path(d) for d in manifest["dirs"]), key=lambda p: len(p.parts), reverse=True):
        try:
            directory.rmdir()
        except OSError:
            continue  # not empty (someone else's files) or already gone
    zygotes = zygote_dir()
    if zygotes is not None:  # no shim is started from here any more: its warm parent goes too
        report += [f"ended the shim's zygote (pid {pid})" for pid in end_zygotes(zygotes)]
    return report
