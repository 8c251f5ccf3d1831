"""MountLedger: host mounts recorded in order, so they can be undone (after a crash too)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from kata_resources import _mount
from kata_resources._errors import MountError, ResourceError

Recorder = Callable[[list[str]], None]
"""Called with the whole list of mount points (oldest first) after every change."""


def write_mount_record(path: Path, points: list[str]) -> None:
    """Write `points` as a JSON list to `path` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".mounts-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(points, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_mount_record(path: Path) -> list[str]:
    """The mount points recorded in `path` (empty when the file is missing); `ResourceError` if corrupt."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise ResourceError(f"mount record {path}: {err}") from err
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise ResourceError(f"mount record {path} is not a JSON list of paths")
    return data


def undo_mount_record(path: Path) -> list[str]:
    """Lazily unmount what `path` records, newest first, then delete it; returns what was unmounted.

    For `delete` after a crashed shim; never raises for a mount that is already gone.
    """
    done = []
    for point in reversed(read_mount_record(path)):
        with contextlib.suppress(MountError):
            if _mount.umount(point):
                done.append(point)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return done


class MountLedger:
    """Makes host mounts and remembers them, in order; `undo` lazily unmounts them newest first.

    With a `recorder` (e.g. `MountLedger.to_file(path)`), the list is persisted before a mount is made
    and after it is undone, so a crash between the two leaves at worst a path that is not mounted.
    """

    def __init__(self, recorder: Recorder | None = None) -> None:
        self._points: list[str] = []
        self._recorder = recorder

    @classmethod
    def to_file(cls, path: Path) -> MountLedger:
        """A ledger that keeps `path` (a JSON list of mount points, oldest first) up to date."""
        return cls(lambda points: write_mount_record(path, points))

    @property
    def mounts(self) -> list[str]:
        """The recorded mount points, oldest first."""
        return list(self._points)

    def _save(self) -> None:
        if self._recorder is not None:
            self._recorder(list(self._points))

    def _add(self, target: str | Path) -> str:
        point = str(target)
        self._points.append(point)
        self._save()
        return point

    def _drop(self, point: str) -> None:
        # The newest entry for this point goes (a point may be stacked).
        for i in range(len(self._points) - 1, -1, -1):
            if self._points[i] == point:
                del self._points[i]
                break
        self._save()

    def mount(
        self, source: str, target: str | Path, fstype: str = "", flags: int = 0, data: str = ""
    ) -> None:
        """mount(2), recorded."""
        point = self._add(target)
        try:
            _mount.mount(source, target, fstype, flags, data)
        except BaseException:
            self._drop(point)
            raise

    def bind(
        self, source: str | Path, target: str | Path, *, readonly: bool = False, recursive: bool = True
    ) -> None:
        """A bind mount (read-only on request), recorded."""
        point = self._add(target)
        try:
            _mount.bind(source, target, readonly=readonly, recursive=recursive)
        except BaseException:
            self._drop(point)
            raise

    def mark(self) -> int:
        """A position in the ledger, for `undo_since` (roll back what a failed step mounted)."""
        return len(self._points)

    def undo_since(self, mark: int) -> list[str]:
        """Lazily unmount what was recorded after `mark`, newest first (best effort, never raises)."""
        done = []
        while len(self._points) > mark:
            point = self._points[-1]
            with contextlib.suppress(MountError):
                _mount.umount(point)
                done.append(point)
            self._points.pop()
            self._save()
        return done

    def undo(self, below: str | Path | None = None) -> list[str]:
        """Lazily unmount the recorded mounts (only those at or below `below`, if given), newest first.

        Every mount is tried; a `MountError` listing the failures is raised at the end.
        """
        prefix = str(below).rstrip("/") if below is not None else None
        failed: list[str] = []
        done: list[str] = []
        for point in reversed(list(self._points)):
            if prefix is not None and point != prefix and not point.startswith(prefix + "/"):
                continue
            try:
                _mount.umount(point)
            except MountError as err:
                failed.append(str(err))
                continue
            done.append(point)
            self._drop(point)
        if failed:
            raise MountError(f"{len(failed)} mounts could not be undone: {'; '.join(failed)}")
        return done
