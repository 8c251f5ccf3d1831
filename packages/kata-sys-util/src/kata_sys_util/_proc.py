"""Process and thread state: namespaces (setns, unshare), the hostname, prctl names, subreaping, fd limit."""

from __future__ import annotations

import resource

from kata_sys_util._libc import check, libc

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# <linux/prctl.h>
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def setns(fd: int, nstype: int = 0, what: str = "") -> None:
    """setns(2): move the calling thread into the namespace `fd` refers to (`what` names it in errors)."""
    check(libc().setns(fd, nstype), f"setns({what or fd}, {nstype:#x})")


def unshare(flags: int) -> None:
    """unshare(2) of the calling thread's (or process's) namespaces."""
    check(libc().unshare(flags), f"unshare({flags:#x})")


def sethostname(name: str | bytes) -> None:
    """sethostname(2) in the caller's UTS namespace."""
    raw = name.encode() if isinstance(name, str) else name
    check(libc().sethostname(raw, len(raw)), f"sethostname({raw!r})")


def set_thread_name(name: str) -> None:
    """prctl(PR_SET_NAME): the calling thread's name as /proc/<pid>/task/<tid>/comm shows it (15 bytes)."""
    check(libc().prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0), "prctl(PR_SET_NAME)")


def set_child_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants are re-parented to this process."""
    check(libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one and return the soft limit now in force.

    For a process that holds an fd per object a guest knows (virtio-fs keeps one per inode and handle);
    the hard limit is the administrator's and is left alone. A refusal keeps the old limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft
