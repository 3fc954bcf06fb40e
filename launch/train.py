#!/usr/bin/env python
"""Fine-tune a causal LM with LoRA+ on DeepSpeed ZeRO.

A checkout's entry point for :mod:`pipeline.cli.train` (what ``loraplus-train`` runs on every rank):

    deepspeed [--num_gpus N] launch/train.py [--config RECIPE.yaml] [--deepspeed_config JSON] [key.sub=value ...]

"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.cli.train import main  # noqa: E402

if __name__ == "__main__":
    main()
