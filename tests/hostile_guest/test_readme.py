"""The README's table names real tests: a renamed or removed test must take its row with it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = Path(__file__).with_name("README.md")


def _node_ids() -> list[str]:
    ids = []
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and "::" in cells[2]:
            ids.append(cells[2].strip("`"))
    return ids


def test_every_test_the_readme_names_exists() -> None:
    ids = _node_ids()
    assert len(ids) >= 40, ids
    missing = []
    for node in ids:
        path, _, rest = node.partition("::")
        name = re.split(r"[\[:]", rest)[0]
        source = (ROOT / path).read_text() if (ROOT / path).exists() else ""
        defined = rf"^\s*((async )?(def|class) {re.escape(name)}\b|{re.escape(name)} = )"
        if not re.search(defined, source, re.M):
            missing.append(node)
    assert not missing, f"README rows naming no test: {missing}"


def test_every_finding_of_the_issue_has_a_row() -> None:
    findings = set()
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and "::" in cells[2]:
            findings.update(int(n) for n in re.findall(r"\d+", cells[1]))
    assert set(range(1, 11)) <= findings, sorted(findings)
