"""Where a run's files live in its output directory: the checkpoints folder, the step directories, the ``latest`` and
``best`` pointers and the lock the best pointer is chosen under, and what a run writes. Both the checkpointing
(train) and the MMLU report (eval) read these names; they live below both."""

from __future__ import annotations

import re
from pathlib import Path

STEP_RE = re.compile(r"step-(\d+)")


BEST = "best"  # checkpoints/best: the pointer pipeline/eval/report.choose_best writes


BEST_LOCK = ".best.lock"  # output_dir/.best.lock: held while the pointer is chosen and while keep_last deletes


LORA_INIT = "lora_init"  # output_dir/lora_init: the initial PiSSA/OLoRA factors (pipeline.model.lora.save_init)


RUN_ARTIFACTS = ("config.yaml", "metrics.jsonl", "val.jsonl", "deepspeed_config.json", "checkpoints", LORA_INIT)


# What a run writes beside them (scores, plots, trackers): deleted with it by --overwrite, so a new run's scores
# are never taken for the old run's ("a step already in mmlu.jsonl is never appended twice").
RUN_OUTPUTS = ("mmlu.jsonl", "mmlu.md", "mmlu.png", "mmlu.log", ".mmlu.lock", ".best.lock", "loss.png", "base",
               "tensorboard", "trackers.json", "wandb")


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def step_dir(output_dir: Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step}"


def sealed_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-<N>`` directory, newest first (not yet verified)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def latest_name(output_dir: Path) -> str | None:
    pointer = checkpoints_dir(output_dir) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def best_name(output_dir: Path) -> str | None:
    """What ``checkpoints/best`` names (``step-<N>``), if it exists."""
    pointer = checkpoints_dir(output_dir) / BEST
    return pointer.read_text().strip() if pointer.is_file() else None
