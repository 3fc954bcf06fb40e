"""Ratio-preserving learning-rate schedules.

A schedule here is a multiplier ``m(step)`` applied to *each group's own* base lr (``torch.optim.lr_scheduler
.LambdaLR`` semantics), so ``lr_B / lr_A`` stays ``lambda`` at every step. DeepSpeed's JSON schedulers
``WarmupLR`` and ``WarmupDecayLR`` instead write one absolute lr into every group and flatten the ratio
(the traps table in README.md); that is why DeepSpeed JSONs with a ``scheduler`` block are refused.

``step`` is the 0-based index of the optimizer step about to run: ``m(0)`` is the multiplier of the first
update.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def multiplier(name: str, step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The lr multiplier of optimizer step ``step``.

    Warmup: linear from ``1 / warmup_steps`` at step 0 to 1 at step ``warmup_steps - 1``. Then ``constant``
    stays at 1; ``linear`` and ``cosine`` decay from 1 towards ``min_lr_ratio``, reaching it at ``max_steps``
    (one past the last step, so the last update still moves the weights).
    """
    if name not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule '{name}' (expected constant, linear or cosine)")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if name == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def lr_lambda(name: str, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """A ``LambdaLR``-ready function of the step. Validates ``name`` now rather than at the first step."""
    multiplier(name, 0, warmup_steps, max_steps, min_lr_ratio)
    return lambda step: multiplier(name, step, warmup_steps, max_steps, min_lr_ratio)
