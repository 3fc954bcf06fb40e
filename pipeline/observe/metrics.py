"""Rank-0 output: console lines, the metrics JSONL file, the progress bar, and the trackers it feeds."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def quiet_library_warnings() -> None:
    """Silence deprecation notices that libraries raise about their own internals (nothing a user can act on):
    transformers' ``is_gradient_checkpointing`` (called by PEFT) and torch's ``all_gather_into_tensor``
    (called by DeepSpeed ZeRO)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)


class Reporter:
    """Everything a run tells the user, written by rank 0 only (other ranks get a silent instance).

    Args:
        rank: global rank; only rank 0 writes.
        metrics_path: ``output_dir/metrics.jsonl`` (opened for append, flushed every step).
        total_steps: for the progress bar.
        trackers: TensorBoard / W&B (``pipeline/observe/trackers.py``), fed every row; set by ``attach``.
    """

    def __init__(self, rank: int, metrics_path: Path | None, total_steps: int):
        self.active = rank == 0
        self.trackers = None
        self.total = total_steps
        self._path = metrics_path
        self._file = None  # opened at the first step, so a run that fails before training leaves no file
        self._bar = None
        self._every = max(1, total_steps // 20)
        self._losses: list[float] = []
        if self.active and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)

    def attach(self, trackers) -> None:
        """Feed ``trackers`` from now on (rank 0's; the others get none)."""
        self.trackers = trackers if self.active else None

    def start_at(self, step: int) -> None:
        """A resumed run: the bar starts at ``step`` of ``total_steps``."""
        if self._bar is not None:
            self._bar.update(step)

    def print(self, msg: str) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def step(self, row: dict[str, Any]) -> None:
        """Record one optimizer step: a JSONL row, and a bar update (or a log line every ~5% off a TTY)."""
        if not self.active:
            return
        if row["loss"] is not None:
            self._losses.append(row["loss"])
        self._write(row)
        if self.trackers is not None:
            from pipeline.observe.trackers import step_scalars

            self.trackers.log(row["step"], step_scalars(row))
            self.trackers.sync_mmlu()  # scores the background scorer recorded since the last step
        lrs = row["lr_groups"]
        loss = "skipped" if row["skipped"] else f"{row['loss']:.4f}"
        summary = (f"loss {loss}  lr_A {lrs.get('lora_A', float('nan')):.2e}  "
                   f"lr_B {lrs.get('lora_B', float('nan')):.2e}  {row['tokens_per_s']:,.0f} tok/s")
        if row["skipped"]:
            self.print(f"step {row['step']}: non-finite loss or gradients; update skipped "
                       f"({row['nonfinite_steps']} so far)")
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(summary, refresh=False)
        elif row["step"] % self._every == 0 or row["step"] == self.total:
            print(f"step {row['step']:>6}/{self.total}  {summary}", flush=True)

    def event(self, row: dict[str, Any], scalars: dict[str, float]) -> None:
        """Record something that happened after step ``row["step"]`` (``row["event"]`` says what; e.g. the pause
        an MMLU score on the training ranks took): a row of ``metrics.jsonl`` without a loss, and ``scalars`` to
        the trackers at that step."""
        if not self.active:
            return
        self._write(row)
        if self.trackers is not None:
            self.trackers.log(row["step"], scalars)

    def _write(self, row: dict[str, Any]) -> None:
        """Append ``row`` to ``metrics.jsonl`` (opened at the first row), flushed."""
        if self._file is None and self._path is not None:
            self._file = open(self._path, "a", encoding="utf-8")
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def validation(self, row: dict[str, Any]) -> None:
        """Record one evaluation of the validation set: a row of ``val.jsonl`` beside ``metrics.jsonl``, a line."""
        if not self.active:
            return
        if self._path is not None:
            with open(self._path.with_name("val.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row["step"], {"eval/val_loss": row["val_loss"]})
        self.print(f"validation at step {row['step']}: loss {row['val_loss']:.4f} over {row['val_tokens']:,} label "
                   f"tokens ({row['time_s']:.1f} s)")

    def loss_summary(self) -> str:
        """``loss A -> B``: the mean over the first and the last (up to) 5 steps of this run."""
        k = max(1, min(5, len(self._losses) // 2))
        first, last = self._losses[:k], self._losses[-k:]
        if not first:
            return "no steps run"
        return f"loss {sum(first) / k:.4f} (mean of first {k} steps) -> {sum(last) / k:.4f} (last {k})"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file:
            self._file.close()
        if self.trackers is not None:
            self.trackers.sync_mmlu()  # the scores that came in at the end
            self.trackers.close()


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def lap(self) -> float:
        """Seconds since the start or the previous lap; starts a new lap."""
        now = time.perf_counter()
        lap, self.start = now - self.start, now
        return lap


def describe_model(model, groups, info, zero_stage: int, offload_device: str, precision: str, optimizer: str,
                   local_numel) -> list[str]:
    """The start-of-run summary: topology, parameter counts (total, trainable, held by this rank), LoRA+ groups."""
    from pipeline.optim.loraplus import describe, numel

    params = list(model.parameters())
    total = sum(numel(p) for p in params)
    trainable = sum(numel(p) for p in params if p.requires_grad)
    frozen = [p for p in params if not p.requires_grad]
    lines = [
        f"world size {info.world_size} on {'GPU' if info.on_gpu else 'CPU'}; ZeRO-{zero_stage}, optimizer offload "
        f"{offload_device}, {precision}, optimizer {optimizer}",
        f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / max(total, 1):.3f}%); "
        f"frozen base weights held on rank 0: {local_numel(frozen):,} of {sum(numel(p) for p in frozen):,}",
        "LoRA+ param groups:",
    ]
    return lines + ["  " + line for line in describe(groups)]


def describe_load(model, load_peak: int, local_numel, gather) -> list[str]:
    """Per rank: how much of the base model it holds after loading (a ZeRO-3 partition, or all of it) and its
    memory peak while loading, beside the size of one full copy. A collective: every rank calls it."""
    from pipeline.observe.memory import GiB
    from pipeline.optim.loraplus import numel

    params = list(model.parameters())
    total = sum(numel(p) for p in params)
    full = sum(numel(p) * p.element_size() for p in params)
    ranks = gather((local_numel(params), load_peak))
    shown = range(len(ranks))
    if len(ranks) > 8:  # rank 0 (it reads the files) and the busiest other rank
        shown = [0, max(range(1, len(ranks)), key=lambda r: ranks[r][1])]
    lines = []
    for rank in shown:
        held, peak = ranks[rank]
        lines.append(f"memory: rank {rank} holds {held:,} of {total:,} base parameters ({100 * held / total:.1f}%); "
                     f"peak while loading {peak / GiB:.2f} GiB (one full copy of the weights: {full / GiB:.2f} GiB)")
    if len(ranks) > 8:
        lines.append(f"memory: ({len(ranks) - 2} more ranks within these figures)")
    return lines
