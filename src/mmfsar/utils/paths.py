"""Where the configs and the project root are.

The configs live in the repository (``configs/``), next to the entry points; ``MMFSAR_ROOT``
(default: the repository root) anchors ``paths.root_dir`` so data and logs land in one place
whatever the working directory.
"""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]
CONFIG_DIR = PROJECT_ROOT / "configs"
os.environ.setdefault("MMFSAR_ROOT", str(PROJECT_ROOT))
