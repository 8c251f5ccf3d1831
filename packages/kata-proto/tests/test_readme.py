"""The README's ttrpc example runs and prints what it says it prints."""

from __future__ import annotations

import pathlib
import re
import tempfile

import pytest
import trio

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_server_and_client_example_works(capsys: pytest.CaptureFixture[str]) -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert block is not None
    code = block.group(1)
    assert code.rstrip().endswith("trio.run(main)")
    namespace: dict[str, object] = {}
    exec(compile(code.rstrip().removesuffix("trio.run(main)"), str(README), "exec"), namespace)
    with tempfile.TemporaryDirectory() as d:
        trio.run(namespace["main"], f"{d}/events.sock")  # type: ignore[arg-type]
    assert capsys.readouterr().out == "k8s.io /tasks/exit\n"
