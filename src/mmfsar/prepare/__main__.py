"""``python -m mmfsar.prepare <command> ...`` (see :mod:`mmfsar.prepare.cli`)."""

import sys

from mmfsar.prepare.cli import main

if __name__ == "__main__":
    sys.exit(main())
