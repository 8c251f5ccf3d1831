"""`python3 -m kata_agent`: the agent without an installed console script (guest images)."""

import sys

from kata_agent._main import main

sys.exit(main())
