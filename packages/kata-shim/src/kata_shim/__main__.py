"""`python -m kata_shim` is `containerd-shim-kata-v2`."""

import sys

from kata_shim._cli import main

sys.exit(main())
