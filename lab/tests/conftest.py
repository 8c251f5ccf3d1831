"""Fixtures for the lab tests: guests booted inside the nested-KVM lab VM through lab/framework.

Tests marked ``lab`` run only inside the lab VM (``./dev nox -s lab``): run anywhere else they fail with a
message saying so, rather than skip, so that a run outside the lab never passes for a lab run.

The ``backend`` fixture is parametrized by the comma-separated back-end names in ``KATA_LAB_BACKENDS``
(default ``qemu``; see ``framework.BACKENDS``), so ``KATA_LAB_BACKENDS=qemu,kata-vmm`` runs every
back-end-generic test on both VMMs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1]
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))

from framework import BACKENDS, Backend, GuestAssets, MicroVMFactory, QemuBackend, in_labvm  # noqa: E402
from framework.containerd import PrivateContainerd, busybox_containerd  # noqa: E402

from kata_shim.shim._zygote import zygotes_in  # noqa: E402

OUTSIDE_LAB = (
    "tests marked `lab` boot guests inside the nested-KVM lab VM: run them with `./dev nox -s lab` "
    "(or `lab/labvm exec -- .venv/bin/python -m pytest -m lab ...`)"
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab") is not None and not in_labvm():
        pytest.fail(OUTSIDE_LAB, pytrace=False)


def _backend_names() -> list[str]:
    names = [n.strip() for n in os.environ.get("KATA_LAB_BACKENDS", "qemu").split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise pytest.UsageError(
            f"KATA_LAB_BACKENDS: unknown back-end(s) {unknown}; known: {sorted(BACKENDS)}"
        )
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", _backend_names(), indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    """A VMM back-end (one per name in KATA_LAB_BACKENDS)."""
    return BACKENDS[request.param]()


@pytest.fixture
def guest_assets() -> GuestAssets:
    """Paths of the guest kernel and images in build/lab/guest."""
    return GuestAssets()


@pytest.fixture
def microvm_factory(tmp_path: Path, backend: Backend) -> Iterator[MicroVMFactory]:
    """Builds guests on ``backend``; every guest still running at teardown is killed."""
    factory = MicroVMFactory(tmp_path, backend)
    yield factory
    factory.kill_all()


@pytest.fixture
def qemu_factory(tmp_path: Path) -> Iterator[MicroVMFactory]:
    """Like microvm_factory, always on QEMU (for what only QEMU offers so far, e.g. disks)."""
    factory = MicroVMFactory(tmp_path, QemuBackend())
    yield factory
    factory.kill_all()


@pytest.fixture(scope="module")
def ctrd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateContainerd]:
    """The module's containerd 1.6 for the shim's lab tests, with the busybox image imported and the guest
    assets installed (containerd start and image import cost tens of seconds under TCG: once a module)."""
    if not in_labvm():
        pytest.fail("the containerd lab tests run inside the lab VM", pytrace=False)
    with busybox_containerd(tmp_path_factory.mktemp("image")) as instance:
        yield instance


@pytest.fixture(autouse=True, scope="session")
def zygote_dir() -> Iterator[str]:
    """The shims of a session fork from zygotes of its own (the first shim execs and leaves one), ended
    at its end: nothing outlives the session on the host, and no zygote of one checkout serves another."""
    with zygotes_in() as directory:
        yield directory
