#!/usr/bin/env python
"""Score every checkpoint of a run that has no MMLU result yet, as checkpoints appear.

A checkout's entry point for :mod:`pipeline.cli.watch` (installed as ``loraplus-watch``); see there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.cli.watch import main  # noqa: E402

if __name__ == "__main__":
    main()
