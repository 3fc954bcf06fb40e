"""Fault injection for the test-suite. Every hook is inert unless ``LORAPLUS_FAULT`` is set.

``LORAPLUS_FAULT`` holds ``kind@step[,step...]`` entries separated by ``;``, for instance
``nonfinite@3,4`` or ``save-kill@6``. The kinds:

- ``nonfinite``: rank 0's loss at these steps becomes NaN (before backward), as a diverging batch would.
- ``save-kill``: rank 0 is SIGKILLed in the middle of saving this step's checkpoint (after DeepSpeed wrote its
  files, before the checkpoint is sealed), as a node loss or an out-of-memory kill would.
- ``save-enospc``: rank 0's first DeepSpeed file of this step's checkpoint fails with "No space left on device"
  (on rank 0 alone, the case where the other ranks must not be left waiting).
- ``sigterm``: rank 0 sends itself SIGTERM in the middle of this step, as ``scancel`` or a preemption would
  (at a known step, so a test can compare with an uninterrupted run).

Real faults cannot be timed in a test; these reproduce their effect at the one point that matters.
"""

from __future__ import annotations

import errno
import os
import signal


def _steps(kind: str) -> set[int]:
    spec = os.environ.get("LORAPLUS_FAULT", "")
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        name, _, steps = entry.partition("@")
        if name == kind:
            return {int(s) for s in steps.split(",") if s}
    return set()


def nonfinite(step: int, rank: int) -> bool:
    return rank == 0 and step in _steps("nonfinite")


def during_step(step: int, rank: int) -> None:
    if rank == 0 and step in _steps("sigterm"):
        os.kill(os.getpid(), signal.SIGTERM)


def before_write(step: int, rank: int) -> None:
    if rank == 0 and step in _steps("save-enospc"):
        raise OSError(errno.ENOSPC, "No space left on device (injected by LORAPLUS_FAULT)")


def during_save(step: int, rank: int) -> None:
    if rank == 0 and step in _steps("save-kill"):
        os.kill(os.getpid(), signal.SIGKILL)
