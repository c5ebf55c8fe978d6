"""Fine-tune with MEFT (or LoRA / full) under DeepSpeed: `python -m meft_ds.train [flags]` (or `meft-train`).

The same entry as launch/train.py, for an installed package (flags: --help; docs/training.md). Under a
launcher that wants a script path, use launch/train.py.
"""

import sys

from .training.cli import main

if __name__ == "__main__":
    sys.exit(main())
