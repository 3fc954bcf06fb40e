"""Fault injection for the test-suite. Every hook is inert unless ``LORAPLUS_FAULT`` is set.

``LORAPLUS_FAULT`` holds ``kind@step[,step...][/rank]`` entries separated by ``;``, for instance
``nonfinite@3,4``, ``save-kill@6`` or ``kill@5/1``; the rank is 0 unless given. The kinds:

- ``nonfinite``: rank 0's loss at these steps becomes NaN (before backward), as a diverging batch would.
- ``save-kill``: rank 0 is SIGKILLed in the middle of saving this step's checkpoint (after DeepSpeed wrote its
  files, before the checkpoint is sealed), as a node loss or an out-of-memory kill would.
- ``save-enospc``: rank 0's first DeepSpeed file of this step's checkpoint fails with "No space left on device"
  (on rank 0 alone, the case where the other ranks must not be left waiting).
- ``sigterm``: rank 0 sends itself SIGTERM in the middle of this step, as ``scancel`` or a preemption would
  (at a known step, so a test can compare with an uninterrupted run).
- ``kill``: the rank is SIGKILLed in the middle of this step, as the out-of-memory killer or a segfault would.
- ``slow``: the rank sleeps 2 s in this step (the others wait for it), so a test can act while a run is at a
  known step however fast the machine is.
- ``init-skew`` (step 0): the rank's LoRA factors are perturbed right after their initialization, before
  DeepSpeed's ``initialize``, as a rank whose PiSSA/OLoRA factorisation came out differently (another GPU model,
  another BLAS) would hold them.
- ``freeze``: the rank stops (SIGSTOP) in the middle of this step, every thread of it: as a node that vanished
  without closing its connections looks to the others (until SIGCONT).
- ``sigterm-scoring``, ``kill-scoring``: as ``sigterm`` and ``kill``, at the first forward of the MMLU score of this
  step's checkpoint on the training engine (``eval.mmlu.runner=engine``; step 0: the base model).

With ``LORAPLUS_FAULT_ONCE=DIR`` a fault fires once only, in whichever start of the run reaches it first: a file
``DIR/<kind>@<step>-rank<rank>`` records that it did (and, in its content, when and where: ``time.time()`` and
the pid), so a restarted run passes the same step. Without it a fault fires at every start, as a crash that is in
the data or the code would.

Real faults cannot be timed in a test; these reproduce their effect at the one point that matters.
"""

from __future__ import annotations

import errno
import os
import signal
import time


def _fires(kind: str, step: int, rank: int) -> bool:
    spec = os.environ.get("LORAPLUS_FAULT", "")
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        name, _, where = entry.partition("@")
        steps, _, at_rank = where.partition("/")
        if name == kind and step in {int(s) for s in steps.split(",") if s} and rank == int(at_rank or 0):
            return _first_time(f"{kind}@{step}-rank{rank}")
    return False


def _first_time(name: str) -> bool:
    once = os.environ.get("LORAPLUS_FAULT_ONCE")
    if not once:
        return True
    try:
        fd = os.open(os.path.join(once, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{time.time():.3f} {os.getpid()}\n")
    return True


def nonfinite(step: int, rank: int) -> bool:
    return _fires("nonfinite", step, rank)


def during_step(step: int, rank: int) -> None:
    if _fires("sigterm", step, rank):
        os.kill(os.getpid(), signal.SIGTERM)
    if _fires("kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if _fires("slow", step, rank):
        time.sleep(2.0)
    if _fires("freeze", step, rank):
        os.kill(os.getpid(), signal.SIGSTOP)


def during_scoring(step: int, rank: int) -> None:
    if _fires("sigterm-scoring", step, rank):
        os.kill(os.getpid(), signal.SIGTERM)
    if _fires("kill-scoring", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def before_write(step: int, rank: int) -> None:
    if _fires("save-enospc", step, rank):
        raise OSError(errno.ENOSPC, "No space left on device (injected by LORAPLUS_FAULT)")


def during_save(step: int, rank: int) -> None:
    if _fires("save-kill", step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def skew_init(model, rank: int) -> None:
    if _fires("init-skew", 0, rank):
        print(f"LORAPLUS_FAULT: init-skew on rank {rank}", flush=True)
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.data.add_(1e-3)
