"""The VM template (upstream's factory `template`): one VM booted to agent-ready and saved, every sandbox
a copy-on-write clone of it.

Layout of `[factory] template_path` (default /run/vc/vm/template, a tmpfs: the template's RAM stays in the
page cache that every clone maps)::

    lock           flock: shared while a sandbox opens the template, exclusive while it is swapped/removed
    build.lock     flock: exclusive while a template is built (one builder at a time, across shims)
    current/       the template: template.json (what it was made from) and vm/ (the kata_vmm snapshot)
    share/         the template VM's virtio-fs directory (empty; its guest never mounts it)

A template is never changed in place: a new one is built in `build-<pid>/` and renamed to `current/`
under the exclusive lock (the old one renamed away and deleted: clones that map its memory files keep
their inodes). A sandbox holds the shared lock while its VM restores (the files are opened), so it
never opens half of an old template and half of a new one.

`template.json` records what the template is made of: the kernel, initrd and image (path, size, mtime),
vCPUs, memory, the command line's inputs, the shim's and kata-vmm's versions and the guest agent's
version; `mismatch` names each difference from a configuration, and a template with any is rebuilt,
never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from kata_agent_client import open_agent_client
from kata_resources import KATA_SHARED_TAG
from kata_shim.__about__ import __version__ as SHIM_VERSION
from kata_shim.config._types import FactoryConfig, TomlConfig
from kata_shim.hypervisor._base import Hypervisor, HypervisorError, ShareFsDevice
from kata_shim.persist import sandbox_dir

log = logging.getLogger("kata_shim.factory")

TEMPLATE_FORMAT = "kata-shim-template"
TEMPLATE_VERSION = 1
MANIFEST_NAME = "template.json"
VM_DIR = "vm"
CURRENT = "current"
SHARE_DIR = "share"
LOCK_NAME = "lock"
BUILD_LOCK_NAME = "build.lock"


class FactoryError(Exception):
    """A template could not be built, read or removed (the message says which and why)."""


class TemplateBusy(FactoryError):
    """Another process is building the template right now."""


def _vmm_version() -> str:
    from kata_vmm import __version__

    return __version__


def _file_id(path: Path | None) -> dict[str, Any] | None:
    """What tells a changed guest asset: path, size and mtime (cheap on every start; a hash of a 100+ MiB
    image is not)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError as err:
        return {"path": str(path), "error": err.strerror}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def expected_manifest(config: TomlConfig, hv: Hypervisor) -> dict[str, Any]:
    """What a template made with `config` by a back-end like `hv` records (all but the guest agent's
    version, which only the booted guest tells)."""
    cfg = config.hypervisor
    passfd = config.runtime.use_passfd_io and hv.capabilities().passfd
    return {
        "format": TEMPLATE_FORMAT,
        "version": TEMPLATE_VERSION,
        "shim_version": SHIM_VERSION,
        "vmm_version": _vmm_version(),
        "hypervisor": config.runtime.hypervisor_name,
        "kernel": _file_id(Path(cfg.kernel)),
        "initrd": _file_id(cfg.initrd),
        "image": _file_id(cfg.image),
        "vcpus": cfg.default_vcpus,
        "max_vcpus": cfg.max_vcpus(),  # the guest's MADT lists that many: a restored VM hot-plugs up to it
        "memory_mib": cfg.default_memory,
        "kernel_params": cfg.kernel_params.strip(),
        "enable_debug": cfg.enable_debug,
        "shared_fs": cfg.shared_fs,
        "passfd_listener_port": config.runtime.passfd_listener_port if passfd else 0,
    }


def mismatch(saved: dict[str, Any] | None, expected: dict[str, Any]) -> list[str]:
    """Why a template with manifest `saved` cannot serve `expected` (empty: it can)."""
    if saved is None:
        return ["no template"]
    reasons = []
    for key, want in expected.items():
        have = saved.get(key)
        if have != want:
            reasons.append(f"{key}: template has {have!r}, configuration {want!r}")
    return reasons


@dataclasses.dataclass(frozen=True)
class TemplateStatus:
    """`kata-ctl factory status`: where the template is, what it was made from, whether it serves the
    configuration."""

    path: Path
    exists: bool
    manifest: dict[str, Any] | None
    stale: list[str]
    building: bool

    def lines(self) -> list[str]:
        """Human-readable, one fact a line."""
        out = [f"template path: {self.path}"]
        if self.building:
            out.append("a template is being built now")
        if not self.exists:
            out.append("template: none")
            return out
        m = self.manifest or {}
        out.append(
            f"template: {m.get('vcpus')} vCPU, {m.get('memory_mib')} MiB, agent {m.get('agent_version')}, "
            f"made by kata-shim {m.get('shim_version')}"
        )
        out += [
            f"{name}: {m.get(name, {}).get('path') if m.get(name) else '-'}" for name in ("kernel", "image")
        ]
        if self.stale:
            out.append("stale (rebuilt by the next sandbox or `kata-ctl factory init`):")
            out += [f"  {reason}" for reason in self.stale]
        else:
            out.append("matches the configuration: sandboxes start from it")
        return out


class Template:
    """The template under `FactoryConfig.template_path`: locks, manifest, build, removal."""

    def __init__(self, factory: FactoryConfig) -> None:
        self.root = Path(factory.template_path)

    @property
    def current(self) -> Path:
        return self.root / CURRENT

    @property
    def vm_dir(self) -> Path:
        """The kata_vmm snapshot of the current template (what `Hypervisor.restore_from` is given)."""
        return self.current / VM_DIR

    def read_manifest(self) -> dict[str, Any] | None:
        """The current template's manifest; None when there is none (or it is unreadable: logged)."""
        path = self.current / MANIFEST_NAME
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("template %s: unreadable manifest (%s); it will be rebuilt", path, err)
            return None
        return data if isinstance(data, dict) else None

    # --- locks -----------------------------------------------------------------------------------
    def _open_lock(self, name: str) -> int:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(self.root / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as err:
            raise FactoryError(f"template lock {self.root / name}: {err.strerror}") from err

    @contextlib.contextmanager
    def _flock(self, name: str, operation: int) -> Iterator[None]:
        fd = self._open_lock(name)
        try:
            try:
                fcntl.flock(fd, operation)
            except BlockingIOError as err:
                what = "built" if name == BUILD_LOCK_NAME else "replaced or removed"
                raise TemplateBusy(
                    f"the template under {self.root} is being {what} by another process"
                ) from err
            yield
        finally:
            os.close(fd)  # releases the lock

    def reading_nowait(self) -> contextlib.AbstractContextManager[None]:
        """Hold while a VM restores from the template: it is not swapped or removed meanwhile; `TemplateBusy`
        at once while a swap or a removal holds it."""
        return self._flock(LOCK_NAME, fcntl.LOCK_SH | fcntl.LOCK_NB)

    def building(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive right to build; `TemplateBusy` at once when another process builds."""
        return self._flock(BUILD_LOCK_NAME, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def is_building(self) -> bool:
        """Whether some process holds the build lock now."""
        try:
            with self.building():
                return False
        except TemplateBusy:
            return True
        except FactoryError:
            return False

    # --- status, build, destroy ------------------------------------------------------------------
    def status(self, expected: dict[str, Any] | None) -> TemplateStatus:
        """Where it is, what it was made from and, given a configuration's `expected_manifest`, why it is
        stale (if it is)."""
        manifest = self.read_manifest()
        stale = mismatch(manifest, expected) if expected is not None and manifest is not None else []
        building = self.root.is_dir() and self.is_building()
        return TemplateStatus(self.root, manifest is not None, manifest, stale, building)

    def destroy(self) -> bool:
        """Remove the template (waits for sandboxes opening it; `TemplateBusy` while one is built); False
        when there was none. Clones running from it keep running: their memory files stay alive as long as
        they are mapped."""
        if not self.root.is_dir():
            return False
        with self.building(), self._flock(LOCK_NAME, fcntl.LOCK_EX):
            found = self.current.exists()
            if found:
                self._remove(self.current)
            self._remove(self.root / SHARE_DIR)
            for stale in self.root.glob("build-*"):  # left by a builder that was killed
                self._remove(stale)
        return found

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)

    def _install(self, built: Path) -> None:
        """Make `built` the current template (the old one renamed away, then deleted)."""
        with self._flock(LOCK_NAME, fcntl.LOCK_EX):
            old = self.root / f"old-{os.getpid()}"
            if self.current.exists():
                os.rename(self.current, old)
            os.rename(built, self.current)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)

    async def build(self, config: TomlConfig, hv: Hypervisor) -> dict[str, Any]:
        """Boot a template VM with `config` on the fresh back-end `hv`, wait for its agent, disconnect,
        save it and make it the current template; returns its manifest. `TemplateBusy` when another
        process builds; `FactoryError` when the VM or its agent fails (nothing is left behind)."""
        with self.building():
            return await self._build(config, hv)

    async def _build(self, config: TomlConfig, hv: Hypervisor) -> dict[str, Any]:
        if not hv.capabilities().snapshot:
            raise FactoryError(f"hypervisor {hv.name} cannot save a VM: no template")
        expected = expected_manifest(config, hv)
        work = self.root / f"build-{os.getpid()}"
        share = self.root / SHARE_DIR
        self._remove(work)
        try:
            work.mkdir(mode=0o700)
            share.mkdir(mode=0o700, exist_ok=True)
        except OSError as err:
            raise FactoryError(f"template directory {work}: {err.strerror}") from err
        try:
            agent_version = await self._boot_and_save(config, hv, share, work / VM_DIR)
            manifest = {**expected, "agent_version": agent_version}
            (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
            self._install(work)
        except BaseException:
            self._remove(work)
            raise
        log.info("VM template built in %s (agent %s)", self.current, agent_version)
        return manifest

    async def _boot_and_save(self, config: TomlConfig, hv: Hypervisor, share: Path, target: Path) -> str:
        """The template VM: the devices a sandbox's VM has before its agent is reached (image, vsock, rng,
        the virtio-fs share, which the guest mounts only when CreateSandbox asks), booted to agent-ready,
        every host connection closed, paused and saved."""
        vm_id = f"template-{os.getpid()}"
        try:
            await hv.prepare_vm(vm_id, None)
            if config.runtime.use_passfd_io and hv.capabilities().passfd:
                hv.set_passfd_listener_port(config.runtime.passfd_listener_port)
            await hv.add_device(ShareFsDevice(share, KATA_SHARED_TAG))
            budget = config.agent.connect_budget_s
            await hv.start_vm(budget)
            version = await self._agent_ready(config, hv)
            await hv.save_vm(target)
            return version
        except (HypervisorError, OSError) as err:
            raise FactoryError(f"building the VM template: {err}") from err
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await hv.stop_vm()
                    await hv.cleanup()
                except Exception as err:
                    log.warning("template VM cleanup: %r", err)
                with contextlib.suppress(Exception):
                    sandbox_dir(vm_id).rmdir()  # the back-end's state directory, empty after cleanup

    async def _agent_ready(self, config: TomlConfig, hv: Hypervisor) -> str:
        """Dial the agent until it answers (or the VM stops: an error at once), ask its version, hang up."""
        agent_cfg = config.agent
        address = hv.agent_address()
        version = ""
        stopped: list[str] = []

        async def watch() -> None:
            await hv.wait_vm()
            stopped.append(hv.exit_reason() or "the VM stopped")
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            try:
                async with open_agent_client(
                    address,
                    ready_timeout=agent_cfg.connect_budget_s,
                    retry_interval=agent_cfg.dial_interval_s,
                    call_timeout=agent_cfg.request_timeout_ms / 1000,
                ) as agent:
                    version = (await agent.get_guest_details()).agent_version
                    # warms the agent's netlink code (its pyroute2 imports: seconds of guest CPU under
                    # nested virtualization) into the template, so a clone's first UpdateInterface does not
                    # pay for them inside CreateSandbox's request budget
                    await agent.list_interfaces()
            except Exception as err:
                raise FactoryError(f"template VM: agent at {address}: {err}{_console(hv)}") from err
            nursery.cancel_scope.cancel()
        if stopped:
            raise FactoryError(f"template VM stopped before its agent answered: {stopped[0]}{_console(hv)}")
        # The client's close went out as vsock RSTs; whatever the guest did not see yet is dropped by the
        # TRANSPORT_RESET every restore sends, and the agent's listener stays for the clone to dial.
        return version


def _console(hv: Hypervisor) -> str:
    tail = hv.console_tail()
    return f"; console:\n{tail}" if tail else ""


async def template_for(
    config: TomlConfig, hv: Hypervisor, new_hypervisor: Any, *, vcpus: int, memory_mib: int, nics: int
) -> Template | None:
    """The template a sandbox about to start on `hv` restores from, built first when missing or stale
    (with a VM from `new_hypervisor(config)`); None, with the reason logged, when it cold-boots instead:
    the back-end cannot restore, the pod's annotations changed its hypervisor configuration, the pod is
    sized otherwise or has `nics` NICs to cold-plug (a template has neither; the caller hot-plugs a pod's
    NICs after the restore on a back-end that can, and passes 0), another shim is building the template
    (building takes a cold boot's time: a cold boot now is no slower, and the template is there for the
    next sandboxes), or the build failed."""
    if not hv.capabilities().snapshot:
        log.warning("[factory] enable_template: hypervisor %s cannot restore a VM; cold boot", hv.name)
        return None
    cfg = config.hypervisor
    if config.annotated:
        # the template serves the file's configuration; building one per annotated pod would thrash it
        log.info("pod annotations set %s: cold boot", ", ".join(config.annotated))
        return None
    if (vcpus, memory_mib) != (cfg.default_vcpus, cfg.default_memory):
        log.info(
            "pod sized %d vCPU/%d MiB, the template %d/%d: cold boot",
            vcpus,
            memory_mib,
            cfg.default_vcpus,
            cfg.default_memory,
        )
        return None
    if nics:
        log.info(
            "pod has %d network device(s), a template none, hypervisor %s cannot hot-plug NICs: cold boot",
            nics,
            hv.name,
        )
        return None
    template = Template(config.factory)
    expected = expected_manifest(config, hv)
    reasons = mismatch(template.read_manifest(), expected)
    if reasons:
        try:
            with template.building():
                # checked again under the build lock: another shim may have just built it
                reasons = mismatch(template.read_manifest(), expected)
                if reasons:
                    log.info("VM template %s: building it (%s)", template.current, "; ".join(reasons))
                    await template._build(config, new_hypervisor(config))
        except TemplateBusy:
            log.info("VM template %s is being built by another shim: cold boot", template.current)
            return None
        except FactoryError as err:
            log.warning("VM template %s: %s; cold boot", template.current, err)
            return None
    return template


@contextlib.contextmanager
def opened(template: Template, config: TomlConfig, hv: Hypervisor) -> Iterator[Path | None]:
    """Hold the template's shared lock while a VM restores from it; yields its snapshot directory, or None
    (cold boot, reason logged) when it is being replaced or removed right now, or changed since
    `template_for` looked."""
    with contextlib.ExitStack() as held:
        why = ""
        try:
            held.enter_context(template.reading_nowait())
        except FactoryError as err:
            why = str(err)
        if not why and mismatch(template.read_manifest(), expected_manifest(config, hv)):
            why = "it changed since it was checked"
        if why:
            log.info("VM template %s: %s; cold boot", template.current, why)
        yield None if why else template.vm_dir
