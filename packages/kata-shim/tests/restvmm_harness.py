"""The clh and firecracker back-ends' test harness: a fake VMM "binary" (fixtures/fake_restvmm.py) that
records every request, and validation of those requests against the upstream API specs in fixtures/
(OpenAPI 3.0 for Cloud Hypervisor, Swagger 2.0 for Firecracker).

Stricter than the specs in one way: an object schema that lists ``properties`` rejects any other key (the
specs leave ``additionalProperties`` open, and the real VMMs' serde structs reject unknown fields), so a
misspelt field fails here as it would there."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from kata_shim.hypervisor import HypervisorConfig

FIXTURES = Path(__file__).parent / "fixtures"
SPECS = {"clh": FIXTURES / "cloud-hypervisor.yaml", "firecracker": FIXTURES / "firecracker.yaml"}


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def load(kind: str) -> dict[str, Any]:
    return yaml.safe_load(SPECS[kind].read_text())


class ApiSpec:
    """One spec: which (method, path) it has and the request body schema of each."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.doc = load(kind)
        # the root carries the definitions so that "#/components/..." and "#/definitions/..." resolve
        self.root = _strict(copy.deepcopy({k: self.doc.get(k, {}) for k in ("components", "definitions")}))

    def operation(self, method: str, path: str) -> dict[str, Any]:
        for template, ops in self.doc["paths"].items():
            pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            if re.match(pattern, path) and method.lower() in ops:
                return dict(ops[method.lower()])
        raise AssertionError(f"{self.kind}: {method} {path} is not in the spec")

    def body_schema(self, op: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """(schema, required) of the operation's request body; (None, False) when it takes none."""
        if "requestBody" in op:
            rb = op["requestBody"]
            return rb["content"]["application/json"]["schema"], bool(rb.get("required"))
        for param in op.get("parameters", []):
            if param.get("in") == "body":
                return param["schema"], bool(param.get("required"))
        return None, False

    def validate(self, method: str, path: str, body: Any) -> None:
        """AssertionError unless ``method path`` exists and ``body`` validates against its schema."""
        op = self.operation(method, path)
        schema, required = self.body_schema(op)
        if schema is None:
            assert body is None, f"{self.kind}: {method} {path} takes no body, got {body!r}"
            return
        if body is None:
            assert not required, f"{self.kind}: {method} {path} needs a body"
            return
        full = {**self.root, **_strict(copy.deepcopy(schema))}
        try:
            jsonschema.Draft4Validator(full).validate(body)
        except jsonschema.ValidationError as err:
            raise AssertionError(f"{self.kind}: {method} {path}: {err.message} at {list(err.path)}") from err

    def status_codes(self, method: str, path: str) -> set[str]:
        return {str(code) for code in self.operation(method, path).get("responses", {})}


def fake_vmm(directory: Path, name: str) -> Path:
    target = directory / name
    target.write_text(f"#!{sys.executable}\n" + (FIXTURES / "fake_restvmm.py").read_text())
    target.chmod(0o755)
    return target


def guest_config(directory: Path, vmm: str, **overrides: Any) -> HypervisorConfig:
    """A `HypervisorConfig` for the fake ``vmm`` (copied into ``directory``) with a kernel and an image that
    exist there, 256 MiB, no shared fs; ``overrides`` set other fields."""
    (directory / "vmlinux").write_bytes(b"\0")
    (directory / "rootfs.img").write_bytes(b"\0" * 4096)
    fields: dict[str, Any] = {
        "path": str(fake_vmm(directory, vmm)),
        "kernel": directory / "vmlinux",
        "image": directory / "rootfs.img",
        "kernel_params": "root=/dev/vda1",
        "default_memory": 256,
        "shared_fs": "none",
    }
    return HypervisorConfig(**{**fields, **overrides})


async def read_head(stream: Any) -> bytes | None:
    """An HTTP request's bytes up to and including its blank line (and what came with them); None when the
    peer closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    return data


def recorded(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line.strip()]


def validate_all(kind: str, record: Path) -> list[tuple[str, str]]:
    """Validate every recorded request against the spec; (method, path) of each, in order."""
    spec = ApiSpec(kind)
    seen = []
    for req in recorded(record):
        spec.validate(req["method"], req["path"], req["body"])
        seen.append((req["method"], req["path"]))
    return seen


def processes_running(directory: Path) -> list[int]:
    """Pids of the processes (zombies too) whose argv names a file under ``directory`` (a fake VMM or
    virtiofsd copied there), by a scan of /proc."""
    prefix = str(directory) + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.decode(errors="replace").startswith(prefix) for arg in argv):
            found.append(int(entry))
    return found


def reaped(pid: int) -> bool:
    """Whether our child ``pid`` is gone and waited for (no process, or only another's under that pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return int(stat[stat.rfind(b")") + 2 :].split()[1]) != os.getpid()


FailedStart = tuple[str, float, str]
"""(the fake's mode, start_vm's timeout, what the error must match)."""


async def start_fails_leaving_nothing(
    hv: Any, env: str, case: FailedStart, directory: Path, children: int
) -> None:
    """With the fake VMM in mode ``case[0]`` (set through ``env``), ``hv.start_vm`` raises a `HypervisorError`
    matching ``case[2]``, and by then its ``children`` processes are killed and reaped, no fake from
    ``directory`` runs (a /proc scan) and only state.json is left in the state directory (the processes'
    record stays for cleanup)."""
    import pytest

    from kata_shim.hypervisor import HypervisorError

    mode, timeout, match = case
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(env, mode)
        with pytest.raises(HypervisorError, match=match):
            await hv.start_vm(timeout)
    pids = [c.pid for c in (hv._vmm, hv._virtiofsd) if c is not None]
    assert len(pids) == children and all(reaped(pid) for pid in pids)
    assert processes_running(directory) == []
    assert hv.state_dir is not None and {p.name for p in hv.state_dir.iterdir()} <= {"state.json"}


Answer = tuple[bytes, float]
"""Raw bytes to send back, then seconds to keep the connection open (a slow or hung VMM)."""


async def serve_api(
    kind: str,
    sock: Path,
    answers: dict[tuple[str, str], Answer],
    seen: list[tuple[str, str]],
    *,
    task_status: Any,
) -> None:
    """An in-process fake API (trio, one request per connection) on ``sock``: validates each request against
    the ``kind`` spec (an invalid one is answered 400 and recorded as ("INVALID", message)), then sends the
    raw answer given for (method, path), or ``204 No Content``."""
    import trio

    spec = ApiSpec(kind)
    raw_sock = trio.socket.socket(trio.socket.AF_UNIX)
    await raw_sock.bind(str(sock))
    raw_sock.listen(8)
    listener = trio.SocketListener(raw_sock)
    task_status.started()

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            data = await read_head(stream)
            if data is None:
                return
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = next(
                (
                    int(v)
                    for k, _, v in (x.partition(":") for x in lines[1:])
                    if k.lower() == "content-length"
                ),
                0,
            )
            while len(body) < length:
                body += await stream.receive_some(65536)
            try:
                spec.validate(method, path, json.loads(body) if body else None)
            except AssertionError as err:
                seen.append(("INVALID", str(err)))
                await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            seen.append((method, path))
            raw, linger = answers.get((method, path), (b"HTTP/1.1 204 No Content\r\n\r\n", 0.0))
            await stream.send_all(raw)
            if linger and raw:  # an empty answer: close at once
                await trio.sleep(linger)

    async with listener, trio.open_nursery() as nursery:
        while True:
            stream = await listener.accept()
            nursery.start_soon(one, stream)


def json_answer(value: Any, status: str = "200 OK") -> bytes:
    body = json.dumps(value).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
