"""`python -m pdserve.cli`: the `pdserve` command (how the local cluster starts its servers)."""

import sys

from pdserve.cli import main

sys.exit(main())
