"""MMLU on the live training engine (``eval.mmlu.runner=engine``): at the start of a run and after each checkpoint
is saved, training pauses and every rank scores its share of MMLU's questions on the model it holds, sharded as
it trains, through lm-eval's own ``mmlu`` task (:class:`pipeline.eval.engine_lm.EngineLM`). No second copy of the
model, no reload, no merge: what lets a 70B run score every checkpoint on the GPUs that train it.

What is scored, and when:

- the base model, as step 0, at a fresh start before the first update: with the adapters disabled (the base
  weights are untouched), or, where ``lora.init_lora_weights`` moved part of the base into the adapter (PiSSA,
  OLoRA), with the adapters as initialised, whose sum is the base (``W_res + B A = W``);
- each checkpoint right after it is saved, when the live weights are the checkpoint's;
- on a resumed start, the checkpoint it resumed from if that has no score yet (a stop or a crash while it was being
  scored), and the base model if it has none and the adapters can be disabled. Older checkpoints without a score
  cannot be scored by the live model (it no longer holds their weights): the start says so, and ``loraplus-watch``
  scores them.

Training is not disturbed: the engine is put in eval mode and back, no gradient is made, the random number
generators (which lm-eval seeds) are put back as they were, and the scored batches never touch the data order. A
stop signal during scoring stops the run at the next batch on every rank, with the checkpoint already saved; the
next start scores it first. Collective: every rank calls every method.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline import distributed as dist
from pipeline import rundir
from pipeline.eval import report, score
from pipeline.eval.engine_lm import EngineLM, ScoringStopped

__all__ = ["EngineScorer", "ScoringStopped"]


class EngineScorer:
    """Scores on the training ranks.

    Args:
        output_dir: the run's directory (``base/``, ``checkpoints/``, ``mmlu.jsonl``).
        setting: what is scored (data, shots, limit, subjects).
        log_samples: also write each request's log-likelihood (``mmlu_samples.jsonl``).
        lm: the engine-backed lm-eval model.
        engine: the DeepSpeed engine (its train/eval mode), and ``model``, the PEFT model it wraps (its adapters
            disabled for the base model).
        base_dir: the base model's directory (recorded with each score).
        adapters_off_is_base: disabling the adapters gives the base model (not after PiSSA/OLoRA moved part of
            the base into them).
        info: this rank's coordinates.
        report_to: the run's reporter: console lines, and the pause of each score as a ``metrics.jsonl`` row.
    """

    def __init__(self, output_dir: Path, setting: score.Setting, log_samples: bool, lm: EngineLM, engine, model,
                 base_dir: Path, adapters_off_is_base: bool, info: dist.DistInfo, report_to):
        self.output_dir, self.setting, self.log_samples = output_dir, setting, log_samples
        self.lm, self.engine, self.model, self.base_dir = lm, engine, model, base_dir
        self.adapters_off_is_base, self.info, self.log = adapters_off_is_base, info, report_to
        self._lm_eval_ranks: int | None = None

    # When

    def at_start(self, resumed_step: int | None) -> None:
        """A fresh start: score the base model (step 0). A resumed one: the base model and the checkpoint it
        resumed from, where either has no score yet; say which older checkpoints are left for the watcher."""
        if resumed_step is None:  # (a base score of this setting is kept: a run restarted before its first save)
            if self._needs(0):
                self.score(0, adapters_as_initialised=not self.adapters_off_is_base)
            return
        if self._needs(0):
            if self.adapters_off_is_base:
                self.score(0)
            else:
                self.log.print("MMLU: the base model (step 0) has no score, and this run's adapters now hold part of "
                               "the base (lora.init_lora_weights): score it with loraplus-watch --run "
                               f"{self.output_dir}")
        older = [s for s, _ in rundir.sealed_steps(self.output_dir) if s < resumed_step and self._needs(s)]
        if older:
            self.log.print(f"MMLU: step(s) {', '.join(map(str, older))} have no score and the live model no longer "
                           f"holds their weights: loraplus-watch --run {self.output_dir} --once scores them")
        if self._needs(resumed_step):
            self.score(resumed_step)

    def after_save(self, step: int) -> None:
        """Score the checkpoint of ``step``, just saved: the live weights are its weights."""
        self.score(step)

    # How

    def _result_dir(self, step: int) -> Path:
        return self.output_dir / "base" if step == 0 else rundir.step_dir(self.output_dir, step)

    def _needs(self, step: int) -> bool:
        """Whether ``step`` has no score of this setting yet (rank 0 reads; every rank gets the answer)."""
        return dist.on_rank0(lambda: not score.has_score(self._result_dir(step), self.setting), self.info.rank)

    def score(self, step: int, adapters_as_initialised: bool = False) -> dict | None:
        """Score the live model as ``step`` (0: the base model) on every rank; record it on rank 0 (``mmlu.json``,
        ``mmlu.jsonl``, the table and plot, ``checkpoints/best``, the pause in ``metrics.jsonl``). Returns the
        summary on rank 0.

        Raises:
            ScoringStopped: a stop signal came while scoring (on every rank, at the same batch); nothing recorded.
        """
        signum = self.lm.stop_signal()  # a signal before the score begins (in the save before it): no score
        if signum:
            raise ScoringStopped(signum)
        result_dir = self._result_dir(step)
        what = "the base model (step 0)" if step == 0 else f"step-{step}"
        if self.info.rank == 0:
            result_dir.mkdir(exist_ok=True)
        started = time.perf_counter()
        self.log.print(f"MMLU: scoring {what} on the training engine ({self.info.world_size} rank(s))...")
        base = step == 0 and not adapters_as_initialised
        ranks = self._ranks()
        with _paused(self.engine), _kept_rng(self.info.on_gpu), _quiet_lm_eval(), \
                (self.model.disable_adapter() if base else contextlib.nullcontext()):
            if self.lm.take_part(step, ranks):
                results = score.evaluate(self.lm, self.setting, self.lm.batch_size, self.log_samples)
                self.lm.done()
            else:
                self.lm.serve()
        pause = time.perf_counter() - started
        forwards = self.lm.forwards
        if self.info.rank != 0:
            return None
        adapter = None if step == 0 else result_dir / "adapter"
        tgt = score.Target(self.base_dir, adapter, step, result_dir)
        summary = score.summarize(results, tgt, self.setting, pause, runner="engine")
        summary["ranks"], summary["lm_eval_ranks"], summary["forwards_per_rank"] = self.info.world_size, ranks, forwards
        summary["model"]["adapters"] = "disabled" if base else ("as initialised" if step == 0 else "trained")
        score.write(summary, results, result_dir)
        report.record(self.output_dir, score.table_row(summary))
        self.log.event({"step": step, "event": "mmlu", "pause_s": round(pause, 3), "runner": "engine",
                        "forwards_per_rank": forwards}, {"eval/mmlu/pause_s": pause})
        self.log.print(f"MMLU, {what}: {score.headline(summary)}; training paused {pause:.1f} s ({forwards} forwards "
                       f"a rank)")
        return summary

    def _ranks(self) -> int:
        """How many ranks run lm-eval: all, unless a task has fewer questions than there are ranks (lm-eval
        refuses a rank with none); the others serve forwards. The same on every rank (rank 0 reads the data)."""
        if self._lm_eval_ranks is None:
            def fewest() -> int:
                if self.setting.data is None:  # the hub's cais/mmlu: its smallest test split has 100 questions
                    return min(100, self.setting.limit or 100)
                from pipeline.eval.mmlu import test_questions

                sizes = test_questions(self.setting.data, list(self.setting.subjects))
                return min(min(sizes.values()), self.setting.limit or 10 ** 9)

            self._lm_eval_ranks = max(1, min(self.info.world_size, dist.on_rank0(fewest, self.info.rank)))
        return self._lm_eval_ranks

    def table(self) -> str | None:
        """``mmlu.md`` (rank 0), for the end of the run."""
        path = self.output_dir / "mmlu.md"
        return path.read_text() if self.info.rank == 0 and path.is_file() else None


@contextlib.contextmanager
def _paused(engine) -> Iterator[None]:
    """The engine in eval mode (dropout off) with no autograd graph, back in training mode afterwards."""
    import torch

    engine.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        engine.train()


@contextlib.contextmanager
def _kept_rng(on_gpu: bool) -> Iterator[None]:
    """Put Python's, NumPy's and torch's generators (and this GPU's) back as they were: lm-eval's
    ``simple_evaluate`` seeds all three, which would otherwise change the run's dropout from here on."""
    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state() if on_gpu else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if on_gpu:
            torch.cuda.set_rng_state(states[3])


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's and ``datasets``' progress bars and info lines off while scoring inside a training run (our own
    lines say what happens; every rank would draw its own bars, and lm-eval warns once a subject that the shots
    were set); errors still show. lm-eval draws some bars
    unconditionally (``Task.build_all_requests``), and tqdm reads its switches at import, so those are dropped on
    their way to stderr."""
    import logging
    import sys

    import datasets

    loggers = [logging.getLogger(name) for name in ("lm-eval", "lm_eval")]
    levels = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    stderr, sys.stderr = sys.stderr, _WithoutProgressBars(sys.stderr)
    try:
        yield
    finally:
        sys.stderr = stderr
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


class _WithoutProgressBars:
    """A text stream that passes everything to ``stream`` except tqdm's redraws (text with a carriage return, and
    the blank writes around them)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if "\r" not in text and text.strip():
            self._stream.write(text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)
