"""The pod's shared namespaces: one IPC and one UTS namespace for every container of the sandbox.

As the Rust agent does at CreateSandbox, we make a new IPC and UTS namespace on a short-lived thread
(unshare(2) of these two moves only the calling thread), set the sandbox's hostname *inside* the new UTS
namespace, and keep both alive by bind-mounting the thread's ``/proc/thread-self/ns/{ipc,uts}`` on files
in ``<run_dir>/sandbox/ns``. Containers then join them by path (OCI ``linux.namespaces[].path``), so they
share SysV IPC and a hostname while the agent's own namespaces (and the guest's hostname) stay as they
were. The first container's PID namespace is the pod's: with ``sandbox_pidns`` at CreateSandbox every later
container joins it, and with CreateContainer's ``sandbox_pidns`` that one container does (Kubernetes
``shareProcessNamespace``), through ``/proc/<its init pid>/ns/pid``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from kata_agent._mount import MS_BIND, mount, umount
from kata_sys_util import CLONE_NEWIPC, CLONE_NEWUTS, sethostname, unshare


class PodNamespaces:
    """The sandbox's persistent IPC/UTS namespaces (bind-mounted files) and, optionally, its PID namespace."""

    def __init__(self, ns_dir: str, *, share_pid: bool = False) -> None:
        self.dir = ns_dir
        self.ipc = os.path.join(ns_dir, "ipc")
        self.uts = os.path.join(ns_dir, "uts")
        self.share_pid = share_pid
        #: /proc/<pid>/ns/pid of the first container's init, once it exists (with share_pid)
        self.pid: str | None = None

    @classmethod
    def create(cls, ns_dir: str, hostname: str = "", *, share_pid: bool = False) -> PodNamespaces:
        """Make the namespaces (hostname set inside the new UTS namespace only); OSError on failure,
        with nothing left mounted."""
        ns = cls(ns_dir, share_pid=share_pid)
        os.makedirs(ns_dir, exist_ok=True)
        for path in (ns.ipc, ns.uts):
            with open(path, "x"):
                pass
        error: list[BaseException] = []

        def persist() -> None:
            try:
                unshare(CLONE_NEWIPC | CLONE_NEWUTS)
                if hostname:
                    sethostname(hostname)
                for kind, target in (("ipc", ns.ipc), ("uts", ns.uts)):
                    mount(f"/proc/thread-self/ns/{kind}", target, "", MS_BIND)
            except BaseException as err:
                error.append(err)

        # This thread alone enters the new namespaces, and it ends here: no other code ever runs in them.
        thread = threading.Thread(target=persist, name="kata-podns")
        thread.start()
        thread.join()
        if error:
            ns.release()
            raise error[0]
        return ns

    def apply(self, config: dict[str, Any], *, share_pid: bool = False) -> None:
        """Make the container of OCI ``config`` join the pod's IPC, UTS (and shared PID) namespaces.

        The PID namespace is shared when the sandbox asked for it at CreateSandbox or this container asks
        (CreateContainerRequest.sandbox_pidns, as CRI sends for shareProcessNamespace)."""
        paths = {"ipc": self.ipc, "uts": self.uts}
        if (self.share_pid or share_pid) and self.pid:
            paths["pid"] = self.pid
        namespaces = config.setdefault("linux", {}).setdefault("namespaces", [])
        for ns in namespaces:
            if ns.get("type") in paths:
                ns["path"] = paths[ns["type"]]
        for kind, path in paths.items():
            if not any(ns.get("type") == kind for ns in namespaces):
                namespaces.append({"type": kind, "path": path})

    def container_created(self, init_pid: int) -> None:
        """Record the first container's PID namespace (the pause container's) as the pod's, for the
        containers that share it."""
        if self.pid is None and init_pid > 0:
            self.pid = f"/proc/{init_pid}/ns/pid"

    def release(self) -> None:
        """Unmount and remove the namespace files; the namespaces end with their last member."""
        for path in (self.ipc, self.uts):
            if os.path.exists(path):
                umount(path)  # not mounted (a failed create) is fine
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)
