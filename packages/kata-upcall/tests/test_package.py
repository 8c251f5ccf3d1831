"""The installed distribution and the import package agree on their version."""

import subprocess
import sys
from importlib.metadata import version

import kata_upcall


def test_installed_version_matches_about() -> None:
    assert version("kata-upcall") == kata_upcall.__version__


def test_codec_and_core_import_without_trio() -> None:
    # The codec and the sans-I/O core are standard library only; the trio driver loads on first use.
    code = (
        "import sys, kata_upcall\n"
        "kata_upcall.AddMmio(0, 0x1000, 5).encode(); kata_upcall.UpcallClientCore().connect()\n"
        "assert 'trio' not in sys.modules, 'trio imported'\n"
        "kata_upcall.open_upcall_client\n"
        "assert 'trio' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_resolves() -> None:
    for name in kata_upcall.__all__:
        assert getattr(kata_upcall, name) is not None
