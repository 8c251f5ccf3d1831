"""containerd's command line and socket naming, as containerd's shim helpers define them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kata_shim._cli import main
from kata_shim.shim import ShimFlags, UsageError, go_join, parse_flags, pod_sandbox_id, socket_address
from kata_shim.shim._address import bundle_sandbox_id, load_spec


def test_parse_flags_reads_containerd_start_argv() -> None:
    argv = ["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock"]
    argv += ["-publish-binary", "/usr/bin/containerd", "-id", "abc", "-debug", "start"]
    flags = parse_flags(argv)
    assert flags == ShimFlags(
        namespace="k8s.io",
        id="abc",
        address="/run/containerd/containerd.sock",
        publish_binary="/usr/bin/containerd",
        debug=True,
        action="start",
    )


def test_parse_flags_accepts_go_spellings_and_defaults_to_run() -> None:
    flags = parse_flags(["--namespace=ns", "-id=x", "-bundle", "/b", "-debug=false"])
    assert (flags.namespace, flags.id, flags.bundle, flags.debug, flags.action) == (
        "ns",
        "x",
        "/b",
        False,
        "run",
    )


@pytest.mark.parametrize(
    "argv",
    [["-nope", "x"], ["-id"], ["-namespace", "n", "frobnicate"], ["-debug=maybe"], ["---id", "x"]],
)
def test_parse_flags_rejects_what_go_flag_rejects(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_flags(argv)


def test_to_argv_round_trips() -> None:
    flags = ShimFlags(namespace="n", id="i", address="/a", publish_binary="/p", debug=True)
    again = parse_flags(flags.to_argv())
    assert again == flags


def test_socket_address_is_containerd_sha256_of_joined_path() -> None:
    # containerd: sha256(filepath.Join(address, namespace, id)) under /run/containerd/s, lower-case hex.
    expected = hashlib.sha256(b"/run/containerd/containerd.sock/default/t1").hexdigest()
    assert socket_address("/run/containerd/containerd.sock", "default", "t1") == (
        f"unix:///run/containerd/s/{expected}"
    )


@pytest.mark.parametrize(
    ("elements", "joined"),
    [
        (("/a//b/", "ns", "id"), "/a/b/ns/id"),
        (("//a", "ns", "id"), "/a/ns/id"),
        (("/a/./c/../b", "ns", "id"), "/a/b/ns/id"),
        (("", "ns", "id"), "ns/id"),
        (("rel", "", "id"), "rel/id"),
        (("", "", ""), ""),
    ],
)
def test_go_join_matches_filepath_join(elements: tuple[str, ...], joined: str) -> None:
    assert go_join(*elements) == joined


def test_socket_address_differs_by_namespace_and_id() -> None:
    addresses = {socket_address("/c.sock", ns, id) for ns in ("default", "k8s.io") for id in ("a", "b")}
    assert len(addresses) == 4


def test_pod_sandbox_id_from_cri_annotations() -> None:
    cri = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod1"}
    assert pod_sandbox_id({"annotations": cri}) == "pod1"
    sandbox = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod1"}
    assert pod_sandbox_id({"annotations": sandbox}) is None
    crio = {"io.kubernetes.cri-o.ContainerType": "container", "io.kubernetes.cri-o.SandboxID": "pod2"}
    assert pod_sandbox_id({"annotations": crio}) == "pod2"
    assert pod_sandbox_id({}) is None
    assert pod_sandbox_id(None) is None


def test_shim_flags_compare_and_print_by_value() -> None:
    flags = ShimFlags(namespace="n", id="i")
    assert flags == ShimFlags("n", "i")
    assert flags != ShimFlags(namespace="n", id="j")
    assert flags != ("n", "i")
    assert repr(flags).startswith("ShimFlags(namespace='n', id='i', address='', publish_binary='containerd'")
    with pytest.raises(TypeError):
        hash(flags)


_CRI_KEYS = st.sampled_from(
    [
        "io.kubernetes.cri.container-type",
        "io.kubernetes.cri.sandbox-id",
        "io.kubernetes.cri-o.ContainerType",
        "io.kubernetes.cri-o.SandboxID",
        "other",
    ]
)
_ANNOTATIONS = st.dictionaries(_CRI_KEYS, st.sampled_from(["container", "sandbox", "pod-1", "", "<&>"]))


@settings(max_examples=150)
@given(annotations=_ANNOTATIONS, ascii_only=st.booleans(), extra=st.sampled_from(["", "\u00e9", "\u0026"]))
def test_bundle_sandbox_id_agrees_with_parsing_the_spec(
    tmp_path_factory: pytest.TempPathFactory, annotations: dict[str, str], ascii_only: bool, extra: str
) -> None:
    bundle = tmp_path_factory.mktemp("bundle")
    text = json.dumps(
        {"ociVersion": "1.0.2", "annotations": annotations, "x": extra}, ensure_ascii=ascii_only
    )
    (bundle / "config.json").write_text(text)
    assert bundle_sandbox_id(bundle) == pod_sandbox_id(load_spec(bundle))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # A key spelled with \u escapes is still the CRI annotation.
        (
            rb'{"annotations": {"io.kubernetes.cri.container\u002dtype": "container",'
            rb' "io.kubernetes.cri.sandbox-id": "pod1"}}',
            "pod1",
        ),
        (
            rb'{"annotations": {"\u0069o.kubernetes.cri-o.ContainerType": "container",'
            rb' "io.kubernetes.cri-o.SandboxID": "pod2"}}',
            "pod2",
        ),
        (b'{"annotations": {"io.kubernetes.cri.container-type": "container"}', None),  # not JSON
        (b"\xff\xfe{}", None),  # not UTF-8
        (b"[]", None),
    ],
)
def test_bundle_sandbox_id_reads_escaped_keys_and_rejects_bad_specs(
    tmp_path: Path, raw: bytes, expected: str | None
) -> None:
    (tmp_path / "config.json").write_bytes(raw)
    assert bundle_sandbox_id(tmp_path) == expected == pod_sandbox_id(load_spec(tmp_path))


def test_bundle_sandbox_id_without_config_json(tmp_path: Path) -> None:
    assert bundle_sandbox_id(tmp_path) is None
    assert bundle_sandbox_id(str(tmp_path)) is None


def test_start_path_imports_only_light_standard_modules(tmp_path: Path) -> None:
    # `start` runs in a fresh interpreter per container; under nested TCG each of these costs it tenths
    # of a second (pathlib, typing and json for a bundle without CRI annotations).
    (tmp_path / "config.json").write_text('{"ociVersion": "1.0.2", "annotations": {"a": "b"}}')
    code = (
        "import sys\n"
        "at_startup = set(sys.modules)\n"
        "import kata_shim._cli, kata_shim.shim._start\n"
        "from kata_shim.shim._address import bundle_sandbox_id\n"
        f"assert bundle_sandbox_id({str(tmp_path)!r}) is None\n"
        "heavy = ['trio', 'google.protobuf', 'kata_proto', 'dataclasses', 'inspect', 'pathlib', 'typing',"
        " 'json', 'hashlib', 'kata_shim.persist']\n"
        "print(sorted(m for m in heavy if m in sys.modules and m not in at_startup))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_delete_path_leaves_network_cgroup_and_async_modules_unimported() -> None:
    # containerd gives `delete` a few seconds; under nested TCG pyroute2 + trio + cgroupspy alone took
    # longer (containerd killed the delete, and the dead shim's mounts stayed).
    code = (
        "import sys\n"
        "import kata_shim.shim._delete, kata_shim.persist\n"
        "from kata_shim.persist import cleanup_sandbox\n"
        "heavy = ['trio', 'pyroute2', 'cgroupspy', 'kata_resources._network', 'kata_resources._cgroups']\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_serving_a_pod_without_a_network_leaves_pyroute2_unimported() -> None:
    # the daemon's modules (virt_container, the dragonball back-end): pyroute2 is ~0.25 s of imports on the
    # host and seconds in the emulated lab VM, paid only by a pod with a netns (kata_resources._netlink)
    code = (
        "import sys\n"
        "import kata_shim.virt_container, kata_shim.hypervisor._dragonball\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cli_reports_usage_errors_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-bogus", "1", "start"]) == 2
    err = capsys.readouterr().err
    assert "flag provided but not defined: -bogus" in err
    assert "Traceback" not in err


def test_cli_start_needs_a_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-id", "x", "start"]) == 1
    assert "namespace cannot be empty" in capsys.readouterr().err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v"]) == 0
    assert "Version: " in capsys.readouterr().out


RUNC_SHIM = "/usr/bin/containerd-shim-runc-v2"


@pytest.mark.root
@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(RUNC_SHIM, os.X_OK), reason="needs root and runc's shim"
)
@pytest.mark.parametrize(
    ("address", "namespace"), [("/run/containerd/containerd.sock", "k8s.io"), ("/tmp//x.sock/", "ns")]
)
def test_socket_address_equals_what_containerds_own_runc_shim_prints(
    tmp_path: Path, address: str, namespace: str
) -> None:
    # containerd-shim-runc-v2 derives its socket with containerd's Go helpers: same inputs, same address.
    id = f"cmp-{uuid.uuid4().hex[:10]}"
    (tmp_path / "config.json").write_text('{"ociVersion": "1.0.2"}')
    argv = [
        RUNC_SHIM,
        "-namespace",
        namespace,
        "-address",
        address,
        "-publish-binary",
        "/bin/true",
        "-id",
        id,
        "start",
    ]
    env = {**os.environ, "TTRPC_ADDRESS": str(tmp_path / "none.ttrpc")}
    try:
        result = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == socket_address(address, namespace, id)
    finally:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ProcessLookupError):
                    if id.encode() in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_address(address, namespace, id).removeprefix("unix://"))
