"""The README's example runs as written and does what its comments say."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.kvm
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_readme_example_boots_and_powers_off(capsys: pytest.CaptureFixture[str]) -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert block is not None
    namespace: dict[str, object] = {}
    try:
        exec(compile(block.group(1), str(README), "exec"), namespace)
    finally:
        Path("/tmp/kata-vmm-example.bzImage").unlink(missing_ok=True)
    out = capsys.readouterr().out
    assert "hello" in out
    assert "ExitKind.POWER_OFF" in out
    slot = namespace["slot"]
    assert (slot.index, slot.base, slot.size, slot.gsi) == (0, 0xD000_0000, 4096, 5)  # type: ignore[attr-defined]
