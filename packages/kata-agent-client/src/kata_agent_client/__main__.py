"""`python3 -m kata_agent_client`: kata-agent-ctl without an installed console script."""

import sys

from kata_agent_client._cli import main

sys.exit(main())
