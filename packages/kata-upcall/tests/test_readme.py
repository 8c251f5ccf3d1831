"""The README's examples run and print what they say they print."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


@pytest.mark.parametrize("index", [0, 1], ids=["codec", "trio client"])
def test_readme_example_prints_what_it_says(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = _blocks()[index]
    expected = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.splitlines() == expected


def test_readme_has_two_examples() -> None:
    assert len(_blocks()) == 2
