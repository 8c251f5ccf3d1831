"""VmmStatistics.summary: the one line the shim logs at debug level when a VM stops."""

from __future__ import annotations

from kata_virtio import FuseStatistics
from kata_vmm import VmmStatistics


def stats(**kw: object) -> VmmStatistics:
    base: dict[str, object] = dict(
        exits={"mmio": 40, "io": 7, "hlt": 40, "shutdown": 1},
        exit_seconds={"mmio": 0.5, "io": 0.01},
        io_ports={},
        run_seconds=1.5,
        wall_seconds=4.25,
        unhandled_pio=0,
        unhandled_mmio=0,
        console_bytes_out=0,
        console_bytes_in=0,
    )
    base.update(kw)
    return VmmStatistics(**base)  # type: ignore[arg-type]


def test_summary_ranks_exits_and_names_each_fs_device() -> None:
    fs = {"kataShared": FuseStatistics({"LOOKUP": 30, "GETATTR": 2}, 0.125)}
    line = stats(virtio_fs=fs).summary(top=3)
    assert line == (
        "vCPUs ran 1.50 s of 4.25 s; exits: hlt 40 (0.00 s), mmio 40 (0.50 s), io 7 (0.01 s); "
        "virtio-fs kataShared: 32 requests in 0.12 s: LOOKUP 30, GETATTR 2"
    )


def test_summary_of_a_vm_that_never_exited() -> None:
    assert stats(exits={}, exit_seconds={}).summary() == "vCPUs ran 1.50 s of 4.25 s; exits: none"
