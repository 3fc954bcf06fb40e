#!/usr/bin/env python
"""Score one checkpoint (or a plain model directory, as step 0) on MMLU with lm-evaluation-harness.

A checkout's entry point for :mod:`pipeline.cli.eval` (installed as ``loraplus-eval``); see there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.cli.eval import main  # noqa: E402

if __name__ == "__main__":
    main()
