"""The guest's vsock tool and the host's side of it, for tests that talk to a guest over hybrid vsock.

`build_vsock_helper` compiles lab/tests/scripts/vsock_helper.c statically (busybox has no AF_VSOCK) for a
test initrd; `vsock_echo` is the host end of its ``echo PORT FILE`` mode through a VMM's hybrid vsock
socket (also a way to tell a waiting guest script that the host is done).
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from framework.assets import REPO, LabAssetError

VSOCK_HELPER_SOURCE = REPO / "lab" / "tests" / "scripts" / "vsock_helper.c"


def build_vsock_helper(dest: Path) -> bytes:
    """vsock_helper.c built with ``gcc -static -O2`` into ``dest``; returns the binary."""
    if shutil.which("gcc") is None:
        raise LabAssetError("gcc is needed to build the guest's vsock helper (apt-get install gcc libc6-dev)")
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(dest), str(VSOCK_HELPER_SOURCE)], check=True, capture_output=True
    )
    return dest.read_bytes()


def vsock_echo(uds: Path, payload: bytes) -> tuple[bytes, float, str]:
    """CONNECT 1024 on the hybrid vsock socket, send ``payload``, read the echo: (echo, seconds, OK line)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(300)
        s.connect(str(uds))
        s.sendall(b"CONNECT 1024\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(1)
            assert chunk, f"hybrid vsock closed during the handshake after {line!r}"
            line += chunk
        t0 = time.monotonic()
        # length-prefixed: a half-close of this socket would end the whole vsock connection
        sender = threading.Thread(target=s.sendall, args=(struct.pack("<Q", len(payload)) + payload,))
        sender.start()
        back = bytearray()
        try:
            while chunk := s.recv(1 << 20):
                back += chunk
        except TimeoutError:
            sending = "is still sending" if sender.is_alive() else "was done"
            raise TimeoutError(
                f"vsock echo stalled: nothing for 300 s after {len(back)} of {len(payload)} bytes came back "
                f"({time.monotonic() - t0:.0f} s in; the sender {sending})"
            ) from None
        sender.join()
        return bytes(back), time.monotonic() - t0, line.decode().strip()
