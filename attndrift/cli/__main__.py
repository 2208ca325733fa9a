"""``python -m attndrift.cli <command> [options]`` (also under ``torchrun -m attndrift.cli``)."""

import sys

from attndrift.cli import main

sys.exit(main())
