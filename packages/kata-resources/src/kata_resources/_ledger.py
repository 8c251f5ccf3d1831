"""MountLedger: host mounts below a sandbox directory, recorded with the mount id each one got, so they can
be undone (after a crash too) without ever unmounting something else.

Every target is opened beneath the ledger's root with openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS) and
mounted or unmounted through ``/proc/self/fd/N``: a symlink or ``..`` the guest planted fails the
operation instead of redirecting it. Undo unmounts an entry only when the path still opens to the root
of the very mount recorded there; ENOENT is not taken for "not mounted": mountinfo decides.

The record (mounts.json) is ``{"version": 2, "root": "/abs/sandbox/dir", "mounts": [{"path":
"mounts/c1/rootfs", "mount_id": 123}, ...]}``, oldest first; ``mount_id`` is null while a mount is being made.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import kata_sys_util as sys_util
from kata_resources._errors import MountError, ResourceError
from kata_sys_util import MS_NODEV, MS_NOSUID, MS_RDONLY

RECORD_VERSION = 2


@dataclass(frozen=True)
class LedgerEntry:
    """One mount the ledger made: its path relative to the root and the mount id it observed."""

    path: str
    mount_id: int | None = None


@dataclass(frozen=True)
class MountRecord:
    """What a mount record file holds."""

    root: Path
    entries: list[LedgerEntry]

    def to_json(self) -> bytes:
        """The record file's contents."""
        mounts = [{"path": e.path, "mount_id": e.mount_id} for e in self.entries]
        return json.dumps({"version": RECORD_VERSION, "root": str(self.root), "mounts": mounts}).encode()


Recorder = Callable[[MountRecord], None]
"""Called with the whole record after every change."""


def write_mount_record(path: Path, record: MountRecord) -> None:
    """Write `record` to `path` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys_util.write_atomic(path, record.to_json())


def read_mount_record(path: Path) -> MountRecord | None:
    """The record in `path` (None when the file is missing); `ResourceError` if it cannot be understood."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ResourceError(f"mount record {path}: {err}") from err
    try:
        if isinstance(data, list):  # version 1: absolute paths, no mount ids
            return MountRecord(Path("/"), [LedgerEntry(_relative(Path("/"), p)) for p in data])
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"version {data.get('version')!r}")
        root = Path(data["root"])
        entries = [LedgerEntry(_relative(root, str(e["path"])), e["mount_id"]) for e in data["mounts"]]
        if not root.is_absolute() or not all(
            e.mount_id is None or isinstance(e.mount_id, int) for e in entries
        ):
            raise ValueError("bad root or mount id")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ResourceError(f"mount record {path} is not a mount ledger: {err}") from err
    return MountRecord(root, entries)


def undo_mount_record(path: Path) -> list[str]:
    """Unmount what `path` records, newest first, then delete it; returns what was unmounted.

    For `delete` after a crashed shim. A mount that is gone is skipped; one that cannot be proven to be
    the recorded one is left alone, and `MountError` lists those at the end (the record is then kept).
    """
    record = read_mount_record(path)
    if record is None:
        return []
    ledger = MountLedger(root=record.root)
    ledger._entries = list(record.entries)
    try:
        return ledger.undo()
    finally:
        if not ledger._entries:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _relative(root: Path, target: str | Path) -> str:
    target = Path(target)
    if target.is_absolute():
        try:
            target = target.relative_to(root)
        except ValueError as err:
            raise ResourceError(f"{target} is not below {root}") from err
    rel = str(target)
    if rel in ("", ".") or rel.startswith("/") or ".." in rel.split("/"):
        raise ResourceError(f"mount target {rel!r} is not a path below {root}")
    return rel


class MountLedger:
    """Makes host mounts below `root` (the sandbox directory) and remembers them, in order, with their ids.

    With a `recorder` (e.g. `MountLedger.to_file(path, root=...)`), the record is persisted before a mount
    is made, again with the mount id once made, and after it is undone: a crash leaves at worst an entry
    whose mount id is unknown, which undo treats as mounted only if the path opens to a mount root.
    """

    def __init__(self, recorder: Recorder | None = None, *, root: Path | str = "/") -> None:
        self.root = Path(root)
        self._entries: list[LedgerEntry] = []
        self._recorder = recorder

    @classmethod
    def to_file(cls, path: Path, *, root: Path | str = "/") -> MountLedger:
        """A ledger below `root` that keeps the record file `path` up to date."""
        return cls(lambda record: write_mount_record(path, record), root=root)

    @property
    def mounts(self) -> list[str]:
        """The recorded mount points (absolute paths), oldest first."""
        return [str(self.root / e.path) for e in self._entries]

    @property
    def entries(self) -> list[LedgerEntry]:
        """The recorded entries, oldest first."""
        return list(self._entries)

    def record(self) -> MountRecord:
        """The ledger as its record file holds it."""
        return MountRecord(self.root, list(self._entries))

    @contextlib.contextmanager
    def root_fd(self) -> Iterator[int]:
        """An O_PATH fd of the root (a trusted host path: the sandbox directory)."""
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def relative(self, target: str | Path) -> str:
        """`target` (absolute below the root, or relative to it) as a path relative to the root."""
        return _relative(self.root, target)

    def _save(self) -> None:
        if self._recorder is not None:
            self._recorder(self.record())

    # -- path operations beneath the root -------------------------------------------------------------
    def mkdir(self, target: str | Path, mode: int = 0o755) -> None:
        """``mkdir -p`` of `target` beneath the root; `ResourceError` if a symlink is in the way."""
        rel = self.relative(target)
        with self.root_fd() as root:
            try:
                sys_util.mkdir_beneath(root, rel, mode)
            except OSError as err:
                raise ResourceError(f"mkdir {self.root / rel}: {err.strerror}") from err

    def touch(self, target: str | Path, mode: int = 0o644) -> None:
        """Create an empty regular file at `target` beneath the root (parents created)."""
        rel = self.relative(target)
        parent = os.path.dirname(rel)
        if parent:
            self.mkdir(parent)
        with self.root_fd() as root:
            try:
                sys_util.create_file_beneath(root, rel, mode)
            except OSError as err:
                raise ResourceError(f"create {self.root / rel}: {err.strerror}") from err

    def set_propagation(self, target: str | Path, flags: int) -> None:
        """Change the propagation (MS_PRIVATE, MS_SHARED, MS_SLAVE, | MS_REC) of the mount at `target`."""
        rel = self.relative(target)
        with self.root_fd() as root, sys_util.opened_beneath(root, rel) as fd:
            try:
                sys_util.mount(None, sys_util.proc_fd_path(fd), "", flags)
            except OSError as err:
                raise MountError(err.errno, f"propagation of {self.root / rel}: {err.strerror}") from err

    # -- mounts ---------------------------------------------------------------------------------------
    def _made(self, rel: str, make: Callable[[int], None]) -> None:
        entry = LedgerEntry(rel)
        self._entries.append(entry)
        self._save()
        try:
            with self.root_fd() as root:
                make(root)
                with sys_util.opened_beneath(root, rel) as fd:
                    observed = sys_util.mount_id(fd)
        except BaseException:
            self._entries.remove(entry)
            self._save()
            raise
        self._entries[self._entries.index(entry)] = LedgerEntry(rel, observed)
        self._save()

    def mount(
        self, source: str, target: str | Path, fstype: str = "", flags: int = 0, data: str = ""
    ) -> None:
        """mount(2) on `target` beneath the root (nosuid and nodev added), recorded."""
        rel = self.relative(target)

        def make(root: int) -> None:
            try:
                sys_util.mount_beneath(
                    source or None, root, rel, fstype, flags | MS_NOSUID | MS_NODEV, data=data
                )
            except OSError as err:
                raise MountError(
                    err.errno, f"mount {source or '-'} on {self.root / rel} ({fstype}): {err.strerror}"
                ) from err

        self._made(rel, make)

    def bind(
        self,
        source: str | Path | int,
        target: str | Path,
        *,
        readonly: bool = False,
        recursive: bool = True,
    ) -> None:
        """Bind `source` (a trusted host path, or an fd) on `target` beneath the root, nosuid and nodev
        (and read-only on request), recorded."""
        rel = self.relative(target)
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
        src = source if isinstance(source, int) else os.fspath(source)

        def make(root: int) -> None:
            try:
                sys_util.bind_beneath(src, root, rel, flags=flags, recursive=recursive)
            except OSError as err:
                raise MountError(err.errno, f"bind {source} on {self.root / rel}: {err.strerror}") from err

        self._made(rel, make)

    def mark(self) -> int:
        """A position in the ledger, for `undo_since` (roll back what a failed step mounted)."""
        return len(self._entries)

    def _unmount(self, root: int, entry: LedgerEntry) -> bool:
        """Unmount `entry` if its path opens to the root of the mount recorded; False if it is gone.

        `MountError` when the recorded mount is still alive below the root but not at its path (moved).
        """
        try:
            fd = sys_util.open_beneath(root, entry.path)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                parent = sys_util.open_beneath(root, os.path.dirname(entry.path) or ".")
                try:
                    parent_id = sys_util.mount_id(parent)
                finally:
                    os.close(parent)
                mid = sys_util.mount_id(fd)
                is_root = mid != parent_id
                if is_root and (entry.mount_id is None or entry.mount_id == mid):
                    try:
                        sys_util.umount_fd(fd)
                    except OSError as err:
                        raise MountError(
                            err.errno, f"umount {self.root / entry.path}: {err.strerror}"
                        ) from err
                    return True
            finally:
                os.close(fd)
        alive = self._alive_below_root(entry)
        if alive is not None:
            raise MountError(
                errno.EBUSY,
                f"mount {entry.mount_id} recorded at {self.root / entry.path} is now at {alive.path}: "
                "left alone",
            )
        return False

    def _alive_below_root(self, entry: LedgerEntry) -> sys_util.MountInfo | None:
        """The recorded mount if it still exists below the root (an id reused elsewhere is not it)."""
        if entry.mount_id is None:
            return None
        alive = sys_util.find_mount(entry.mount_id)
        below = os.fsencode(self.root).rstrip(b"/") + b"/"
        if alive is not None and (alive.mount_point + b"/").startswith(below):
            return alive
        return None

    def undo_since(self, mark: int) -> list[str]:
        """Lazily unmount what was recorded after `mark`, newest first (best effort, never raises)."""
        done = []
        with self.root_fd() as root:
            while len(self._entries) > mark:
                entry = self._entries[-1]
                with contextlib.suppress(MountError, OSError):
                    if self._unmount(root, entry):
                        done.append(str(self.root / entry.path))
                self._entries.pop()
                self._save()
        return done

    def undo(self, below: str | Path | None = None) -> list[str]:
        """Lazily unmount the recorded mounts (only those at or below `below`, if given), newest first.

        Every mount is tried; a `MountError` listing the ones left alone is raised at the end (they stay
        in the ledger).
        """
        prefix = self.relative(below) if below is not None else None
        if not os.path.isdir(self.root):
            if any(self._alive_below_root(e) for e in self._entries):
                raise MountError(errno.ENOENT, f"{self.root} is gone but recorded mounts are alive")
            self._entries.clear()
            self._save()
            return []
        failed: list[str] = []
        done: list[str] = []
        with self.root_fd() as root:
            for entry in reversed(list(self._entries)):
                if prefix is not None and entry.path != prefix and not entry.path.startswith(prefix + "/"):
                    continue
                try:
                    if self._unmount(root, entry):
                        done.append(str(self.root / entry.path))
                except MountError as err:
                    failed.append(str(err))
                    continue
                self._entries.remove(entry)
                self._save()
        if failed:
            raise MountError(errno.EBUSY, f"{len(failed)} mounts could not be undone: {'; '.join(failed)}")
        return done


def unmount_below(directory: Path) -> list[str]:
    """Unmount every mount at or below `directory` (a trusted host path), newest first; returns them.

    For leftovers no ledger recorded. Each mount is unmounted only through a path that opens beneath
    `directory` without symlinks to the root of the very mount mountinfo lists (by id); any other is left
    alone and `MountError` lists those at the end.
    """
    top = os.fsencode(directory).rstrip(b"/")
    found = [m for m in sys_util.mountinfo() if m.mount_point == top or m.mount_point.startswith(top + b"/")]
    done: list[str] = []
    failed: list[str] = []
    try:
        root = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        # mountinfo lists parents first, and a stacked mount after the one it covers.
        for m in reversed(found):
            if sys_util.find_mount(m.mount_id) is None:
                continue  # went with a parent (MNT_DETACH takes the subtree)
            rel = os.fsdecode(m.mount_point[len(top) + 1 :])
            try:
                fd = (
                    sys_util.open_beneath(root, rel)
                    if rel
                    else os.open(directory, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
                )
            except OSError as err:
                failed.append(f"{m.path}: {err.strerror}")
                continue
            try:
                if sys_util.mount_id(fd) != m.mount_id:
                    failed.append(f"{m.path}: mount {m.mount_id} is not what the path opens to; left alone")
                    continue
                sys_util.umount_fd(fd)
                done.append(m.path)
            except OSError as err:
                failed.append(f"{m.path}: {err.strerror}")
            finally:
                os.close(fd)
    finally:
        os.close(root)
    if failed:
        raise MountError(errno.EBUSY, f"mounts below {directory} left alone: {'; '.join(failed)}")
    return done
