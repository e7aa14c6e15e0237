"""``python -m engine.sim`` runs ``kvswitch sim``."""

import sys

from engine.sim.cli import main

sys.exit(main())
