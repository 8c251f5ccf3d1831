"""The sandbox's host cgroup: where the VMM's threads run and what limits them.

Two layouts, as runtime-rs's cgroups resource lays them out:

* cgroup v1 (one hierarchy per controller, driven through cgroupspy): the sandbox cgroup is the OCI
  ``cgroupsPath`` of the sandbox container under each controller; with ``sandbox_cgroup_only=False`` the
  shim's other threads go to ``kata_overhead/<sid>``, a cgroup without limits.
* cgroup v2 (unified, files written directly): ``<path>`` is the domain holding the memory limit. With
  ``sandbox_cgroup_only=True`` it is a leaf that holds the whole shim. Otherwise it becomes a threaded
  domain with two threaded children, ``<path>/sandbox`` (the vCPU threads, CPU limits) and
  ``<path>/overhead`` (every other thread): v2 moves single threads only inside a threaded subtree.

``cgroupsPath`` is either a cgroupfs path (``/kubepods/pod1``) or the systemd form ``slice:prefix:name``
(``kubepods-besteffort.slice:cri-containerd:abc`` -> ``kubepods.slice/kubepods-besteffort.slice/
cri-containerd-abc.scope``); the cgroup is made directly in the filesystem either way (no systemd unit).
`SandboxCgroup.delete` moves whatever is still inside out (v1: to the nearest ancestor it did not
make), then removes the cgroups it created, deepest first. `to_dict`/`from_dict` persist it for
cleanup after a crash.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgroupspy.nodes import Node

from kata_resources._errors import ResourceError

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: v1 controllers the sandbox cgroup joins (those the host lacks are skipped).
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids")
#: v2 controllers enabled for the sandbox's subtree (those the parent does not offer are skipped).
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "pids")
#: v2 controllers that work in threaded mode.
V2_THREADED = ("cpu", "cpuset", "pids", "perf_event")
#: The v1 parent of overhead cgroups, as upstream names it.
OVERHEAD_V1 = "kata_overhead"
DEFAULT_CPU_PERIOD = 100_000


MKDIR_V2_ATTEMPTS = 3
"""Walks of a v2 cgroup path before a parent that keeps vanishing (removed by the sandbox that made it) is
an error."""


class CgroupError(ResourceError, OSError):
    """Raised when a cgroup cannot be created, written, joined or removed, or a cgroupsPath is malformed."""


def cgroup_version(root: str | Path = CGROUP_ROOT) -> int:
    """2 when ``root`` is a cgroup2 (unified) mount, else 1 (v1 or hybrid: a tmpfs of v1 hierarchies)."""
    return 2 if (Path(root) / "cgroup.controllers").exists() else 1


def _expand_slice(slice_: str) -> str:
    """systemd's slice nesting: ``a-b-c.slice`` is ``a.slice/a-b.slice/a-b-c.slice``; ``-`` is the root."""
    if slice_ in ("", "-"):
        return ""
    if not slice_.endswith(".slice") or "/" in slice_:
        raise CgroupError(errno.EINVAL, f"bad systemd slice {slice_!r}")
    name = slice_.removesuffix(".slice")
    if not name or name.startswith("-") or name.endswith("-") or "--" in name:
        raise CgroupError(errno.EINVAL, f"bad systemd slice {slice_!r}")
    parts = name.split("-")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def cgroup_relative_path(cgroups_path: str, sandbox_id: str) -> str:
    """The OCI ``cgroupsPath`` (cgroupfs or systemd ``slice:prefix:name``) as a path below a hierarchy.

    An empty path gives ``kata_<sandbox_id>``. ``..`` components are refused.
    """
    if not cgroups_path:
        rel = f"kata_{sandbox_id}"
    elif not cgroups_path.startswith("/") and cgroups_path.count(":") == 2:
        slice_, prefix, name = cgroups_path.split(":")
        if not name or "/" in name or "/" in prefix:
            raise CgroupError(errno.EINVAL, f"bad systemd cgroupsPath {cgroups_path!r}")
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
        slice_path = _expand_slice(slice_ or "system.slice")
        rel = f"{slice_path}/{unit}" if slice_path else unit
    else:
        rel = cgroups_path
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise CgroupError(errno.EINVAL, f"bad cgroupsPath {cgroups_path!r}")
    return "/".join(parts)


@dataclass(frozen=True)
class CgroupLimits:
    """CPU and memory limits as OCI ``linux.resources`` states them; None means not limited."""

    cpu_quota: int | None = None
    cpu_period: int | None = None
    cpu_shares: int | None = None
    cpuset_cpus: str | None = None
    memory_limit: int | None = None

    @classmethod
    def from_oci(cls, resources: dict[str, Any] | None) -> CgroupLimits:
        """The limits of one OCI ``linux.resources`` object (negative or zero quota/limit: unlimited)."""
        resources = resources or {}
        cpu, memory = resources.get("cpu") or {}, resources.get("memory") or {}
        quota, limit = cpu.get("quota"), memory.get("limit")
        return cls(
            cpu_quota=quota if quota and quota > 0 else None,
            cpu_period=cpu.get("period") or None,
            cpu_shares=cpu.get("shares") or None,
            cpuset_cpus=cpu.get("cpus") or None,
            memory_limit=limit if limit and limit > 0 else None,
        )

    @property
    def cpus(self) -> float | None:
        """CPUs the quota allows (quota / period)."""
        if self.cpu_quota is None:
            return None
        return self.cpu_quota / (self.cpu_period or DEFAULT_CPU_PERIOD)

    @classmethod
    def sandbox(
        cls, containers: Iterable[CgroupLimits], overhead: CgroupLimits | None = None
    ) -> CgroupLimits:
        """The sandbox's limits: the sum of the containers' CPU quotas (over one period) and memory limits
        that are set, plus ``overhead``; nothing set anywhere stays unlimited."""
        parts = [*containers, *([overhead] if overhead else [])]
        cpus = [c.cpus for c in parts if c.cpus is not None]
        mems = [c.memory_limit for c in parts if c.memory_limit is not None]
        shares = [c.cpu_shares for c in parts if c.cpu_shares is not None]
        return cls(
            cpu_quota=round(sum(cpus) * DEFAULT_CPU_PERIOD) if cpus else None,
            cpu_period=DEFAULT_CPU_PERIOD if cpus else None,
            cpu_shares=sum(shares) if shares else None,
            memory_limit=sum(mems) if mems else None,
        )


def _write(path: Path, value: str | int) -> None:
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as err:
        raise CgroupError(err.errno, f"cannot write {value!r} to {path}: {err.strerror}") from err


def _read_ids(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


def _shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares [2, 262144] -> v2 cpu.weight [1, 10000], the conversion runc uses."""
    shares = min(max(shares, 2), 262_144)
    return 1 + ((shares - 2) * 9999) // 262_142


DELETE_SETTLE = 5.0
"""Seconds `SandboxCgroup.delete` waits for tasks that were just killed to leave its cgroups."""


class SandboxCgroup:
    """The host cgroup(s) of one sandbox; `create` makes them, `delete` removes them."""

    def __init__(
        self,
        path: str,
        *,
        sandbox_id: str,
        sandbox_cgroup_only: bool = True,
        version: int | None = None,
        root: str | Path = CGROUP_ROOT,
        controllers: Iterable[str] | None = None,
        created: Iterable[str] = (),
    ) -> None:
        self.path = path
        self.sandbox_id = sandbox_id
        self.sandbox_cgroup_only = sandbox_cgroup_only
        self.root = Path(root)
        self.version = version or cgroup_version(self.root)
        default = V1_CONTROLLERS if self.version == 1 else V2_CONTROLLERS
        self.controllers = tuple(controllers if controllers is not None else default)
        #: relative cgroup dirs we made (v1: "<controller>/<rel>"), in creation order
        self.created: list[str] = list(created)

    # -- where things are -------------------------------------------------------------------------------

    @property
    def overhead_path(self) -> str | None:
        """The overhead cgroup (relative to each hierarchy), None with ``sandbox_cgroup_only``."""
        if self.sandbox_cgroup_only:
            return None
        return f"{OVERHEAD_V1}/{self.sandbox_id}" if self.version == 1 else f"{self.path}/overhead"

    @property
    def vcpu_path(self) -> str:
        """Where vCPU threads go (relative): the sandbox cgroup, or its ``sandbox`` child on v2."""
        if self.version == 2 and not self.sandbox_cgroup_only:
            return f"{self.path}/sandbox"
        return self.path

    def _v1_controllers(self) -> list[str]:
        return [c for c in self.controllers if (self.root / c / "tasks").exists()]

    def dirs(self, rel: str) -> list[Path]:
        """The directories of cgroup ``rel``: one per v1 controller, or the one v2 directory."""
        if self.version == 1:
            return [self.root / c / rel for c in self._v1_controllers()]
        return [self.root / rel]

    # -- lifecycle ---------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        sandbox_id: str,
        cgroups_path: str = "",
        *,
        sandbox_cgroup_only: bool = True,
        root: str | Path = CGROUP_ROOT,
        version: int | None = None,
        controllers: Iterable[str] | None = None,
    ) -> SandboxCgroup:
        """Make the sandbox cgroup at ``cgroups_path`` (and the overhead one). Raises `CgroupError`;
        whatever was made before the failure is removed."""
        cg = cls(
            cgroup_relative_path(cgroups_path, sandbox_id),
            sandbox_id=sandbox_id,
            sandbox_cgroup_only=sandbox_cgroup_only,
            version=version,
            root=root,
            controllers=controllers,
        )
        try:
            if cg.version == 1:
                cg._create_v1()
            else:
                cg._create_v2()
        except (OSError, RuntimeError) as err:
            cg.delete()
            if isinstance(err, CgroupError):
                raise
            raise CgroupError(
                getattr(err, "errno", None) or errno.EIO, f"cannot create cgroup: {err}"
            ) from err
        return cg

    def _create_v1(self) -> None:
        rels = [self.path] + ([self.overhead_path] if self.overhead_path else [])
        for controller in self._v1_controllers():
            for rel in rels:
                node = Node(str(self.root).encode())
                node = Node(controller.encode(), parent=node)
                for part in rel.split("/"):
                    existed = os.path.isdir(os.path.join(node.full_path, part.encode()))
                    child = node.create_cgroup(part)
                    if controller == "cpuset":  # a cpuset without cpus/mems takes no task
                        for name in ("cpuset.cpus", "cpuset.mems"):
                            own = Path(os.fsdecode(child.full_path)) / name
                            if not own.read_text().strip():
                                _write(own, (Path(os.fsdecode(node.full_path)) / name).read_text().strip())
                    if not existed:
                        self.created.append(os.fsdecode(child.path).lstrip("/"))
                    node = child

    def _mkdir_v2(self, rel: str, controllers: Iterable[str]) -> None:
        """Make each missing directory of ``rel``, offering ``controllers`` down the way. Other sandboxes
        make and remove shared parents (ctr's /default) at the same time: a parent made meanwhile is
        theirs and used; a parent removed meanwhile (its maker's cleanup) makes the walk start over, at
        most `MKDIR_V2_ATTEMPTS` times."""
        wanted = list(controllers)
        for attempt in range(MKDIR_V2_ATTEMPTS):
            try:
                self._mkdir_v2_walk(rel, wanted)
                return
            except FileNotFoundError as err:
                if attempt == MKDIR_V2_ATTEMPTS - 1:
                    raise CgroupError(
                        err.errno, f"cannot create cgroup {rel}: a parent keeps vanishing"
                    ) from err

    def _mkdir_v2_walk(self, rel: str, controllers: list[str]) -> None:
        path = self.root
        for part in rel.split("/"):
            parent, path = path, path / part
            if path.is_dir():
                continue
            self._enable_v2(parent, controllers)  # FileNotFoundError when the parent went: start over
            try:
                path.mkdir()
            except FileExistsError:
                continue  # another sandbox made this parent between our look and our mkdir: it is theirs
            except FileNotFoundError:
                raise  # the parent went between our look and our mkdir: start over
            except OSError as err:
                raise CgroupError(err.errno, f"cannot create cgroup {path}: {err.strerror}") from err
            self.created.append(str(path.relative_to(self.root)))

    def _enable_v2(self, parent: Path, controllers: Iterable[str]) -> None:
        """Offer ``controllers`` to ``parent``'s children (those ``parent`` has)."""
        have = (parent / "cgroup.controllers").read_text().split()
        on = (parent / "cgroup.subtree_control").read_text().split()
        for c in controllers:
            if c in have and c not in on:
                _write(parent / "cgroup.subtree_control", f"+{c}")

    def _create_v2(self) -> None:
        self._mkdir_v2(self.path, self.controllers)
        if not self.sandbox_cgroup_only:
            # a threaded subtree: only threaded controllers may be offered to its members
            threaded = [c for c in self.controllers if c in V2_THREADED]
            for rel in (self.vcpu_path, self.overhead_path or ""):
                self._mkdir_v2(rel, threaded)
                _write(self.root / rel / "cgroup.type", "threaded")

    def add_processes(self, pids: Iterable[int]) -> None:
        """Move whole processes (all their threads) into the sandbox: its cgroup with
        ``sandbox_cgroup_only``, else the overhead cgroup (v1) or the threaded domain (v2)."""
        if self.version == 2:
            for pid in pids:
                _write(self.root / self.path / "cgroup.procs", pid)
            return
        rel = self.path if self.sandbox_cgroup_only else self.overhead_path or self.path
        for d in self.dirs(rel):
            for pid in pids:
                _write(d / "cgroup.procs", pid)

    def add_threads(self, tids: Iterable[int], *, overhead: bool = False) -> None:
        """Move single threads: vCPU threads to the sandbox cgroup, ``overhead=True`` ones to the
        overhead cgroup (the sandbox cgroup with ``sandbox_cgroup_only``). On v2 without
        ``sandbox_cgroup_only`` the process must already be in the domain (`add_processes`)."""
        rel = self.overhead_path if overhead and self.overhead_path else self.vcpu_path
        if self.version == 2:
            name = "cgroup.procs" if self.sandbox_cgroup_only else "cgroup.threads"
            for tid in tids:
                _write(self.root / rel / name, tid)
            return
        for d in self.dirs(rel):
            for tid in tids:
                _write(d / "tasks", tid)

    def set_limits(self, limits: CgroupLimits) -> None:
        """Write CPU limits on the vCPU cgroup and the memory limit on the sandbox cgroup."""
        if self.version == 1:
            self._set_v1(limits)
        else:
            self._set_v2(limits)

    def _set_v1(self, limits: CgroupLimits) -> None:
        # cgroupspy 0.2.3's file properties join its bytes paths with str file names (TypeError on
        # Python 3), so it only builds the tree (`_create_v1`) and the files are written here.
        have = self._v1_controllers()
        if "cpu" in have:
            cpu = self.root / "cpu" / self.path
            if limits.cpu_period is not None:
                _write(cpu / "cpu.cfs_period_us", limits.cpu_period)
            _write(cpu / "cpu.cfs_quota_us", limits.cpu_quota if limits.cpu_quota is not None else -1)
            if limits.cpu_shares is not None:
                _write(cpu / "cpu.shares", limits.cpu_shares)
        if "cpuset" in have and limits.cpuset_cpus:
            _write(self.root / "cpuset" / self.path / "cpuset.cpus", limits.cpuset_cpus)
        if "memory" in have and limits.memory_limit is not None:
            _write(self.root / "memory" / self.path / "memory.limit_in_bytes", limits.memory_limit)

    def _set_v2(self, limits: CgroupLimits) -> None:
        vcpu, domain = self.root / self.vcpu_path, self.root / self.path
        if (vcpu / "cpu.max").exists():
            quota = "max" if limits.cpu_quota is None else str(limits.cpu_quota)
            _write(vcpu / "cpu.max", f"{quota} {limits.cpu_period or DEFAULT_CPU_PERIOD}")
        if limits.cpu_shares is not None and (vcpu / "cpu.weight").exists():
            _write(vcpu / "cpu.weight", _shares_to_weight(limits.cpu_shares))
        if limits.cpuset_cpus and (vcpu / "cpuset.cpus").exists():
            _write(vcpu / "cpuset.cpus", limits.cpuset_cpus)
        if (domain / "memory.max").exists():
            _write(domain / "memory.max", "max" if limits.memory_limit is None else limits.memory_limit)
        elif limits.memory_limit is not None or limits.cpu_quota is not None:
            missing = [f for f in ("cpu.max", "memory.max") if not (domain / f).exists()]
            raise CgroupError(errno.ENOTSUP, f"{domain} has no {' '.join(missing)}: controller not enabled")

    def _leaves(self) -> list[str]:
        """The cgroups (relative; v1: below each controller) that hold tasks."""
        return [r for r in {self.path, self.vcpu_path, self.overhead_path} if r]

    def tasks(self) -> list[int]:
        """Every task (thread id) in the sandbox's cgroups."""
        found: set[int] = set()
        for rel in self._leaves():
            for d in self.dirs(rel):
                found.update(_read_ids(d / ("tasks" if self.version == 1 else "cgroup.threads")))
        return sorted(found)

    def delete(self, settle: float = DELETE_SETTLE) -> None:
        """Move every task left out (v1: to the nearest ancestor we did not make, as cgroups-rs moves
        them to the parent; v2: to the root, the one cgroup with controllers that may hold processes),
        then remove the cgroups we made, deepest first. What is already gone is skipped; a parent we
        made that another sandbox now uses too (v1's ``kata_overhead``, a slice) is left.

        A task that was just killed cannot be moved and keeps its cgroup busy until it has exited (crash
        cleanup kills the VMM's processes right before this): a busy cgroup of ours is tried again for up
        to ``settle`` seconds."""
        deadline = time.monotonic() + settle
        while True:
            try:
                self._delete_once()
                return
            except CgroupError as err:
                if err.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(0.02)

    def _delete_once(self) -> None:
        made = set(self.created)
        for rel in self._leaves():
            for d in self.dirs(rel):
                if self.version == 1:
                    target = d.parent
                    while str(target.relative_to(self.root)) in made:
                        target = target.parent
                    for tid in _read_ids(d / "tasks"):
                        self._evict(target / "tasks", tid)
                else:  # a thread id written to cgroup.procs moves its whole process
                    for tid in _read_ids(d / "cgroup.threads"):
                        self._evict(self.root / "cgroup.procs", tid)
        leaves = {str(d.relative_to(self.root)) for rel in self._leaves() for d in self.dirs(rel)}
        for rel in sorted(self.created, key=lambda r: r.count("/"), reverse=True):
            try:
                (self.root / rel).rmdir()
            except FileNotFoundError:
                pass
            except OSError as err:
                if rel not in leaves and err.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    continue  # a shared parent still in use
                raise CgroupError(
                    err.errno, f"cannot remove cgroup {self.root / rel}: {err.strerror}"
                ) from err
        self.created.clear()

    @staticmethod
    def _evict(target: Path, task: int) -> None:
        try:
            _write(target, task)
        except CgroupError as err:
            if err.errno != errno.ESRCH:  # exited meanwhile
                raise

    # -- persistence -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state for `from_dict` (cleanup after a crash)."""
        return {
            "path": self.path,
            "sandbox_id": self.sandbox_id,
            "sandbox_cgroup_only": self.sandbox_cgroup_only,
            "version": self.version,
            "root": str(self.root),
            "controllers": list(self.controllers),
            "created": list(self.created),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxCgroup:
        """The cgroup `to_dict` described."""
        try:
            cg = cls(
                str(data["path"]),
                sandbox_id=str(data["sandbox_id"]),
                sandbox_cgroup_only=bool(data["sandbox_cgroup_only"]),
                version=int(data["version"]),
                root=str(data["root"]),
                controllers=[str(c) for c in data["controllers"]],
                created=[str(c) for c in data["created"]],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CgroupError(errno.EINVAL, f"bad cgroup record {data!r}: {err}") from err
        for rel in (cg.path, *cg.created):
            if ".." in rel.split("/"):
                raise CgroupError(errno.EINVAL, f"bad cgroup record {data!r}: '..' in {rel!r}")
        return cg
