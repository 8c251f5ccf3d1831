"""The shim lab suite over the external back-end (issue 15: "the whole shim lab suite passes, parameterised
over both back-ends").

The same tests as test_shim_lab.py (imported from it: one copy of each), run against a containerd whose shims
read upstream's configuration-qemu-runtime-rs.toml (test_qemu_lab.qemu_config: asset paths substituted, the
lab's needs in a drop-in) through KATA_CONF_FILE, so every `ctr run` boots QEMU with virtiofsd and the agent
over vhost-vsock. A file of its own, so `nox -s lab` runs it in its own lab VM beside test_shim_lab.py.

Left out, because they are about the built-in back-end by design: the one-process check (an external VMM
is three processes: `test_shim_qemu_and_virtiofsd_are_the_pods_processes_and_go_with_it` checks that
instead, and `kill -9` of the shim too, so `test_kill_9_of_the_shim_is_cleaned_up_by_containerd` is not
repeated), the bad-configuration messages (they name [hypervisor.dragonball]), upstream's
configuration-dragonball.toml and `kata-shim install` (which installs the dragonball default).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework import in_labvm
from framework.configs import qemu_config
from framework.containerd import BUSYBOX_IMAGE, PrivateContainerd, busybox_containerd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_shim_lab
from test_qemu_lab import _assert_nothing_left, _processes
from test_shim_lab import kata_run, kill_9_then_clean_up

# The shared tests and their module fixtures, bound here in test_shim_lab.py's order (pytest runs a module's
# tests in the order its namespace got them; the `service` tests end with the one that deletes it).
events = test_shim_lab.events
service = test_shim_lab.service
test_run_rm_prints_guest_kernel_and_hello_with_the_task_events = (
    test_shim_lab.test_run_rm_prints_guest_kernel_and_hello_with_the_task_events
)
test_exec_ps_and_metrics = test_shim_lab.test_exec_ps_and_metrics
test_pause_and_resume = test_shim_lab.test_pause_and_resume
test_exit_code_and_stdin_reach_ctr = test_shim_lab.test_exit_code_and_stdin_reach_ctr
test_run_t_is_interactive_through_tmux = test_shim_lab.test_run_t_is_interactive_through_tmux
test_thread_count_is_the_same_with_1_and_10_containers_in_the_pod = (
    test_shim_lab.test_thread_count_is_the_same_with_1_and_10_containers_in_the_pod
)
test_kill_sigterm_is_delivered_then_sigkill_ends_the_task = (
    test_shim_lab.test_kill_sigterm_is_delivered_then_sigkill_ends_the_task
)
test_a_dying_guest_ends_ctr_run_and_leaves_nothing = (
    test_shim_lab.test_a_dying_guest_ends_ctr_run_and_leaves_nothing
)

QEMU, VIRTIOFSD = "qemu-system-x86_64", "virtiofsd"


@pytest.fixture(scope="module")
def ctrd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateContainerd]:
    """The module's containerd, its shims on the qemu back-end (KATA_CONF_FILE in containerd's environment,
    which the shims inherit; upstream's lookup order puts it first)."""
    if not in_labvm():
        pytest.fail("the containerd lab tests run inside the lab VM", pytrace=False)
    config = qemu_config(tmp_path_factory.mktemp("qemu-config"))
    with busybox_containerd(
        tmp_path_factory.mktemp("image"), extra_env={"KATA_CONF_FILE": str(config)}
    ) as ctrd:
        yield ctrd
    left = _processes(QEMU) + _processes(VIRTIOFSD)
    assert not left, f"qemu/virtiofsd left after the module: {left}"


@pytest.mark.lab
def test_shim_qemu_and_virtiofsd_are_the_pods_processes_and_go_with_it(ctrd: PrivateContainerd) -> None:
    """An external VMM's pod: the shim, its QEMU and its virtiofsd (which forks a sandboxed child of its
    own), nothing else; `kill -9` of the shim, then containerd's cleanup, leaves none of them."""
    done = kata_run(ctrd, "-d", BUSYBOX_IMAGE, "qtree", "sleep", "1000")
    assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
    shims = ctrd.shim_pids()
    assert len(shims) == 1, shims
    tree = ctrd.processes_below(shims[0])
    comms = sorted({comm for _, comm in tree[1:]})
    print(f"qemu pod's process tree: {tree}")
    assert comms == sorted({QEMU[:15], VIRTIOFSD}), tree  # comm is cut at 15 characters
    started = {pid for pid, comm in tree[1:] if comm in (QEMU[:15], VIRTIOFSD)}
    kill_9_then_clean_up(ctrd, shims[0], "qtree")
    _assert_nothing_left(ctrd)
    assert not [pid for pid in started if os.path.exists(f"/proc/{pid}")], started
