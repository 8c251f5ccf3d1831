"""The pod's resolv.conf lines for CreateSandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kata_resources import MAX_RESOLV_CONF, ResourceError, dns_from_mounts


def test_lines_of_the_bound_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# written by CNI\nnameserver 10.96.0.10\n\nsearch default.svc.cluster.local\n; x\noptions ndots:5\n"
    )
    mounts: list[dict[str, Any]] = [
        {"destination": "/etc/hosts", "type": "bind", "source": str(tmp_path / "hosts")},
        {"destination": "/etc/resolv.conf", "type": "bind", "source": str(conf), "options": ["rbind", "ro"]},
    ]
    assert dns_from_mounts(mounts) == [
        "nameserver 10.96.0.10",
        "search default.svc.cluster.local",
        "options ndots:5",
    ]


def test_no_resolv_conf_mount_is_no_dns() -> None:
    assert dns_from_mounts([{"destination": "/proc", "type": "proc", "source": "proc"}]) == []


def test_unreadable_or_huge_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="cannot read"):
        dns_from_mounts([{"destination": "/etc/resolv.conf", "source": str(tmp_path / "missing")}])
    huge = tmp_path / "huge"
    huge.write_bytes(b"#" * (MAX_RESOLV_CONF + 1))
    with pytest.raises(ResourceError, match="larger"):
        dns_from_mounts([{"destination": "/etc/resolv.conf", "source": str(huge)}])
