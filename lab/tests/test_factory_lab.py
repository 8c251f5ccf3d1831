"""VM templates in the lab (issue 16): `[factory] enable_template` with a real containerd 1.6, the lab's
Debian guest and the built-in VMM.

Two `ctr run --rm` sandboxes on a configuration with the template on: the first builds the template (a
VM booted to agent-ready, hung up, saved) and starts as its clone, the second restores without building
(the shim log says "restored from template" for each and "building it" once). Each clone prints its
hostname, clock, 16 bytes of /dev/urandom and boot_id: the RNG output differs between the two, each clock
is the host's (SetGuestDateTime, not the template's frozen one), and the hostname is the sandbox's own.
boot_id is printed, not asserted: the kernel sets it at boot, so clones of one template share it (as
upstream's templates do). `kata-ctl factory status` then says the template matches, `destroy` removes it.

Run by the lead: ./dev nox -s lab -- lab/tests/test_factory_lab.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from framework.configs import template_config
from framework.containerd import BUSYBOX_IMAGE, KATA_RUNTIME, PrivateContainerd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_shim_lab import RUN_TIMEOUT, assert_nothing_left

CLONE_SCRIPT = (
    "hostname; date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
    "cat /proc/sys/kernel/random/boot_id"
)
KATA_CTL = [
    sys.executable,
    "-c",
    "import sys; from kata_shim._kata_ctl import main; sys.exit(main(sys.argv[1:]))",
]


def _kata_ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KATA_CONF_FILE": str(config)}
    return subprocess.run(
        [*KATA_CTL, *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


def _has_hostname_flag(ctrd: PrivateContainerd) -> bool:
    return "--hostname" in ctrd.ctr("run", "--help", check=False).stdout


def _ctr_run(
    ctrd: PrivateContainerd, config: Path, name: str, *command: str, options: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``ctr run --rm`` of busybox container ``name`` on the kata runtime with ``config`` (and ``options``
    before the image), running ``command``; not checked."""
    return ctrd.ctr(
        "run",
        "--rm",
        "--runtime",
        KATA_RUNTIME,
        "--runtime-config-path",
        str(config),
        *options,
        BUSYBOX_IMAGE,
        name,
        *command,
        timeout=RUN_TIMEOUT,
        check=False,
    )


@pytest.mark.lab
def test_two_sandboxes_start_from_the_template_with_their_own_rng_clock_and_hostname(
    ctrd: PrivateContainerd, tmp_path: Path
) -> None:
    config, template = template_config(tmp_path)
    hostname_flag = _has_hostname_flag(ctrd)
    outputs = []
    for index in (1, 2):
        name = f"tpl{index}"
        args = ["--hostname", f"clone-{index}"] if hostname_flag else []
        t0 = time.monotonic()
        done = _ctr_run(ctrd, config, name, "sh", "-c", CLONE_SCRIPT, options=args)
        host_now = time.time()
        print(f"ctr run --rm {name} (template on): {time.monotonic() - t0:.1f} s wall")
        assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
        hostname, clock, rng, boot_id = done.stdout.split()
        print(
            f"{name}: hostname {hostname}, clock {clock} (host {host_now:.0f}), rng {rng}, boot_id {boot_id}"
        )
        if hostname_flag:
            assert hostname == f"clone-{index}"
        assert abs(int(clock) - host_now) < 120, (clock, host_now)  # the host's time, not the template's
        outputs.append((hostname, rng, boot_id))
        assert_nothing_left(ctrd, name)
    assert outputs[0][1] != outputs[1][1], "two clones read the same bytes from /dev/urandom"
    log = ctrd.log()
    assert log.count("restored from template") >= 2, ctrd.log_tail(200)
    assert log.count("building it (") == 1, ctrd.log_tail(200)
    assert log.count("clone identity set") >= 2
    assert (template / "current" / "template.json").is_file()
    status = _kata_ctl(config, "factory", "status")
    assert status.returncode == 0 and "matches the configuration" in status.stdout, (
        status.stdout + status.stderr
    )
    destroyed = _kata_ctl(config, "factory", "destroy")
    assert destroyed.returncode == 0 and "removed" in destroyed.stdout, destroyed.stdout + destroyed.stderr
    assert not (template / "current").exists()


@pytest.mark.lab
def test_kata_ctl_factory_init_builds_and_a_changed_config_rebuilds_it(
    ctrd: PrivateContainerd, tmp_path: Path
) -> None:
    config, template = template_config(tmp_path)
    built = _kata_ctl(config, "factory", "init")
    assert built.returncode == 0 and "template built in" in built.stdout, built.stdout + built.stderr
    again = _kata_ctl(config, "factory", "init")
    assert "up to date" in again.stdout
    config.write_text(config.read_text().replace('kernel_params = ""', 'kernel_params = "loglevel=3"'))
    status = _kata_ctl(config, "factory", "status")
    assert "stale" in status.stdout and "kernel_params" in status.stdout, status.stdout
    done = _ctr_run(ctrd, config, "tpl3", "echo", "ok")
    assert done.returncode == 0 and done.stdout.split() == ["ok"], f"{done.stderr}\n{ctrd.log_tail(100)}"
    assert "building it (kernel_params: template has ''" in ctrd.log()
    assert_nothing_left(ctrd, "tpl3")
    _kata_ctl(config, "factory", "destroy")
    assert not (template / "current").exists()
