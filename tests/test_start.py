"""The start decision (``pipeline/train/start.py: decide``), case by case, without a launcher: fresh, resume on the
same world size, resume on another (universal, batch split refitted), nothing to do, a run without a complete
checkpoint, and the checkpoints a start refuses to continue."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import make_config
from pipeline.errors import UserError
from pipeline.train.checkpoint import ResumePoint
from pipeline.train.start import decide

OUT = Path("/runs/x")
CFG = make_config(None, ["train.max_steps=12", "train.micro_batch_size=2", "train.grad_accum=1"])


def point(step: int = 8, world_size: int = 2, zero_stage: int = 2, notes=(), **state) -> ResumePoint:
    base = {"step": step, "world_size": world_size, "zero_stage": zero_stage, "precision": "fp32",
            "data_fingerprint": "k" * 24, "num_samples": 100, "global_batch": 2 * 1 * world_size,
            "micro_batch_size": 2, "grad_accum": 1, "nonfinite_steps": 0, "elapsed_s": 1.0}
    return ResumePoint(OUT / "checkpoints" / f"step-{step}", {**base, **state}, list(notes))


def call(p, world_size: int = 2, zero_stage: int = 2, precision: str = "fp32", data_id: str = "k" * 24,
         cfg=CFG):
    return decide(cfg, p, world_size, OUT, zero_stage, precision, data_id, 100)


def test_fresh_when_there_is_nothing_to_continue():
    s = call(None)
    assert (s.kind, s.point, s.universal, s.notes, s.resume_step) == ("fresh", None, False, (), None)
    assert s.cfg is CFG


def test_resume_on_the_same_world_size():
    p = point(notes=["step-10: damaged (a hash differs); set aside as step-10.damaged"])
    s = call(p)
    assert (s.kind, s.point, s.universal, s.resume_step) == ("resume", p, False, 8)
    assert s.notes == ("step-10: damaged (a hash differs); set aside as step-10.damaged",)  # rank 0's notes first
    assert s.cfg == CFG


def test_resume_on_another_world_size_refits_the_batch_split_and_loads_universal():
    s = call(point(world_size=4, global_batch=8), world_size=2)
    assert s.kind == "resume" and s.universal and s.cfg.train.grad_accum == 2 and CFG.train.grad_accum == 1
    assert s.notes == ("world size 4 -> 2: train.grad_accum 1 -> 2 keeps the global batch of 8 samples",)
    zero0 = call(point(world_size=4, global_batch=8, zero_stage=0), world_size=2, zero_stage=0)
    assert zero0.kind == "resume" and not zero0.universal  # ZeRO-0's whole optimizer state loads anywhere
    with pytest.raises(UserError, match=r"global batch of 6 samples .* use a world size that divides 6"):
        call(point(world_size=3, global_batch=6), world_size=4)


def test_nothing_to_do_at_max_steps():
    s = call(point(step=12, notes=["a note"]))
    assert s.kind == "nothing_to_do" and s.notes[0] == "a note"
    assert s.notes[1] == ("nothing to do: /runs/x is at step 12 of train.max_steps=12; raise train.max_steps to "
                          "train further")


def test_a_run_without_a_complete_checkpoint_starts_at_step_0():
    p = ResumePoint(None, {}, ["step-4: incomplete"])
    s = call(p)
    assert (s.kind, s.universal, s.resume_step) == ("fresh", False, 0)  # its metrics are cut back to step 0
    assert s.notes == ("step-4: incomplete",
                       "/runs/x holds a run without a complete checkpoint: starting it from step 0")


@pytest.mark.parametrize("change, needle", [
    ({"zero_stage": 3}, "was written under ZeRO-2 and this run uses ZeRO-3"),
    ({"precision": "bf16"}, "was trained in fp32 and this run would train in bf16"),
    ({"data_id": "other" * 5}, "the training data changed since step-8"),
])
def test_a_checkpoint_this_start_cannot_continue_is_refused(change, needle):
    with pytest.raises(UserError, match=needle):
        call(point(), **change)
