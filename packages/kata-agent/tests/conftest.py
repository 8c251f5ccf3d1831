"""Makes agent_harness (this directory's helpers) importable and provides its fixtures.

With --import-mode=importlib test directories are not on sys.path, so this adds ours.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from agent_harness import busybox_rootfs  # noqa: E402

__all__ = ["busybox_rootfs"]
