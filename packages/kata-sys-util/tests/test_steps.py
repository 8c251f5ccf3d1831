"""Steps: the step timer behind the shim's and the agent's debug lines (issue 16: each step's time)."""

from __future__ import annotations

from kata_sys_util import Steps


def test_steps_time_each_step_from_the_previous_mark_and_render_in_order() -> None:
    now = [10.0]
    steps = Steps(clock=lambda: now[0])
    assert str(steps) == "no step"
    now[0] = 10.5
    assert steps.mark("shared-dir") == 0.5
    now[0] = 13.0
    assert steps.mark("start-vm") == 2.5
    now[0] = 13.25
    steps.mark("agent-ready")
    assert steps.items() == [("shared-dir", 0.5), ("start-vm", 2.5), ("agent-ready", 0.25)]
    assert steps.total() == 3.25
    now[0] = 14.0
    assert steps.elapsed() == 4.0 and steps.total() == 3.25  # the step under way counts in elapsed only
    assert str(steps) == "total 3.25 s: shared-dir 0.50, start-vm 2.50, agent-ready 0.25"
