"""The shim process: containerd's command line, `start`, `delete` and run mode.

Only standard-library modules are imported here: `start` and `delete` run in a fresh interpreter for
every container, and the run mode (`kata_shim.shim._run`, trio and protobuf) is imported only by it.
"""

from kata_shim.shim._address import SOCKET_ROOT, can_connect, go_join, pod_sandbox_id, socket_address
from kata_shim.shim._flags import ShimFlags, UsageError, parse_flags

__all__ = [
    "SOCKET_ROOT",
    "ShimFlags",
    "UsageError",
    "can_connect",
    "go_join",
    "parse_flags",
    "pod_sandbox_id",
    "socket_address",
]
