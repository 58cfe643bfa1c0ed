"""`python -m device_sim.cli` runs `device-sim`."""

import sys

from device_sim.cli.main import main

sys.exit(main())
