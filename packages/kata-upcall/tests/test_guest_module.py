"""The guest module (guest/kata_upcall_srv.c) speaks the codec's wire format and builds without warnings.

Loading it needs the guest kernel: lab/tests/test_upcall_lab.py does that in the lab VM.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

from kata_upcall import (
    CPU_PAYLOAD_SIZE,
    DEV_MGR_MAGIC_VERSION,
    DEV_MGR_MSG_SIZE,
    DEV_MGR_SERVICE_BYTE,
    HEADER_SIZE,
    MMIO_PAYLOAD_SIZE,
    UPCALL_PORT,
    MsgType,
)

GUEST = pathlib.Path(__file__).resolve().parents[1] / "guest"
SOURCE = GUEST / "kata_upcall_srv.c"
BUILD_PY = pathlib.Path(__file__).resolve().parents[3] / "lab" / "images" / "build.py"


def _define(name: str) -> str:
    match = re.search(rf"^#define {name}\s+(\S+)", SOURCE.read_text(), re.MULTILINE)
    assert match is not None, f"#define {name} missing"
    return match.group(1)


def test_module_constants_match_the_codec() -> None:
    assert int(_define("UPCALL_PORT"), 0) == UPCALL_PORT
    assert int(_define("DEV_MGR_MSG_SIZE"), 0) == DEV_MGR_MSG_SIZE
    assert int(_define("DEV_MGR_MAGIC_VERSION"), 0) == DEV_MGR_MAGIC_VERSION
    assert _define("DEV_MGR_SERVICE_BYTE") == f"'{DEV_MGR_SERVICE_BYTE.decode()}'"


def test_module_message_types_match_the_codec() -> None:
    enum = re.search(r"enum devmgr_msg_type \{(.*?)\};", SOURCE.read_text(), re.DOTALL)
    assert enum is not None
    values = {name: int(value, 0) for name, value in re.findall(r"(\w+)\s*=\s*(\w+),", enum.group(1))}
    assert values == {member.name: int(member) for member in MsgType}


def test_module_struct_sizes_match_the_codec() -> None:
    asserts = dict(re.findall(r"static_assert\(sizeof\(struct (\w+)\) == (\w+)\);", SOURCE.read_text()))
    assert int(asserts["devmgr_msg_header"]) == HEADER_SIZE
    assert int(asserts["mmio_payload"]) == MMIO_PAYLOAD_SIZE
    assert int(asserts["cpu_payload"]) == CPU_PAYLOAD_SIZE
    assert asserts["devmgr_req"] == asserts["devmgr_reply"] == "DEV_MGR_MSG_SIZE"


def _kernel_headers() -> pathlib.Path | None:
    """/usr/src/linux-headers-<the pinned release> (lab/images/build.py's KERNEL_ABI), if installed."""
    if "KATA_UPCALL_KDIR" in os.environ:
        return pathlib.Path(os.environ["KATA_UPCALL_KDIR"])
    if not BUILD_PY.exists():
        return None
    abi = re.search(r'^KERNEL_ABI = "([^"]+)"', BUILD_PY.read_text(), re.MULTILINE)
    assert abi is not None
    kdir = pathlib.Path(f"/usr/src/linux-headers-{abi.group(1)}-cloud-amd64")
    return kdir if (kdir / "Module.symvers").exists() else None


@pytest.mark.guest_assets  # nox -s lab runs it after `nox -s images` installed the headers and make
@pytest.mark.timeout(300)
def test_module_builds_without_warnings(tmp_path: pathlib.Path) -> None:
    kdir = _kernel_headers()
    assert kdir is not None, "the pinned kernel's headers are not installed: run ./dev nox -s images"
    assert shutil.which("make") is not None, "make is not installed: run ./dev nox -s images"
    build = tmp_path / "guest"
    shutil.copytree(GUEST, build, ignore=shutil.ignore_patterns("*.ko", "*.o", ".*.cmd"))
    done = subprocess.run(
        ["make", "-C", str(build), f"KDIR={kdir}"], capture_output=True, text=True, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "warning:" not in output, output
    assert (build / "kata_upcall_srv.ko").exists()
