"""Scoring checkpoints on MMLU while a run trains, without holding the training ranks.

Rank 0 starts ``python -m pipeline.cli.watch --once`` in a background process when training starts (it scores
the base model as step 0) and after each checkpoint is sealed (one at a time; a checkpoint saved while one is
running is picked up by the next). At the end of the run, rank 0 waits for it, scores whatever is left, and
returns the table. The watcher's locks make it safe to run a separate
``loraplus-watch`` (or ``eval/watch.py``) on another node at the same time.

On CPU the scorer takes its memory from the machine the training ranks use, so its batch is sized to
``eval.mmlu.memory_gb`` (default ``auto``: half of the memory available when it starts; ``pipeline/eval/score.py``,
``memory_budget``), not fixed: a fixed batch of long 5-shot prompts at a 128k vocabulary holds tens of GiB of logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import MmluEvalConfig
from pipeline.errors import UserError

#: The directory that holds the ``pipeline`` package: on the watcher's PYTHONPATH, so ``-m`` finds the same code
#: from a checkout that was never installed as from an installed wheel.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "CROSS_RANK", "CROSS_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE"}


def enabled(cfg: MmluEvalConfig, model_is_builtin: bool) -> bool:
    """``eval.mmlu.every_checkpoint``: ``auto`` means on for the embedded tiny model only."""
    return cfg.every_checkpoint == "true" or (cfg.every_checkpoint == "auto" and model_is_builtin)


def shots(cfg: MmluEvalConfig, model_is_builtin: bool) -> int:
    """``eval.mmlu.num_fewshot``: ``auto`` means 5, MMLU's standard, and 0 for the embedded tiny model."""
    if cfg.num_fewshot == "auto":
        return 0 if model_is_builtin else 5
    return int(cfg.num_fewshot)


def check_device(device: str, on_gpu: bool, active: bool) -> None:
    """Refuse an ``eval.mmlu.device`` the scorer could not use, before training starts.

    lm-eval would not refuse it: it maps an unknown ``cuda:N`` to ``cuda`` (GPU 0, rank 0's training GPU) with only
    an info log. ``config.py`` has checked the form (``cpu`` or ``cuda:N``).
    """
    if not active or device == "cpu":
        return
    n = int(device.split(":")[1])
    if not on_gpu:
        raise UserError(f"eval.mmlu.device={device}, but this machine trains on CPU (no CUDA GPU); use "
                        f"eval.mmlu.device=cpu")
    visible = node_gpus()
    if n >= len(visible):
        raise UserError(f"eval.mmlu.device={device}, but this node has {len(visible)} GPU(s) (cuda:0.."
                        f"cuda:{len(visible) - 1}); name one of them, or cpu")


def node_gpus() -> list[str]:
    """The node's GPUs as the launcher gave them to this process: ``CUDA_VISIBLE_DEVICES`` entries, else ``0..n-1``.
    The deepspeed launcher sets the variable to the node's whole list for every rank (ranks pick theirs by
    ``LOCAL_RANK``)."""
    listed = _listed(os.environ)
    if listed is not None:
        return listed
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _listed(env) -> list[str] | None:
    value = env.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [d.strip() for d in value.split(",") if d.strip()]


def scorer_env(device: str, env: dict[str, str]) -> tuple[dict[str, str], str]:
    """The scorer's environment and ``--device``: it sees only its own GPU (``cuda:N`` -> that GPU, as its
    ``cuda:0``), or none at all for ``cpu``, so it can never land on a training GPU by default."""
    env = {k: v for k, v in env.items() if k not in LAUNCHER_VARS}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        return env, "cpu"
    n, ids = int(device.split(":")[1]), _listed(env)
    env["CUDA_VISIBLE_DEVICES"] = ids[n] if ids is not None and n < len(ids) else str(n)
    return env, "cuda:0"


class BackgroundScorer:
    """Rank 0's background scoring (``active`` false elsewhere, or when scoring is off)."""

    def __init__(self, output_dir: Path, cfg: MmluEvalConfig, active: bool):
        self.output_dir, self.cfg = output_dir, cfg
        self.active = active
        self._proc: subprocess.Popen | None = None

    def command(self, device: str) -> list[str]:
        # --no-trackers: the training process logs the scores to TensorBoard / W&B as they land in mmlu.jsonl.
        cmd = [sys.executable, "-m", "pipeline.cli.watch", "--run", str(self.output_dir), "--once",
               "--no-trackers",
               "--mmlu-data", self.cfg.data,
               "--num-fewshot", str(self.cfg.num_fewshot), "--batch-size", self.cfg.batch_size,
               "--memory-gb", self.cfg.memory_gb, "--device", device]
        return (cmd + (["--limit", str(self.cfg.limit)] if self.cfg.limit else []) +
                (["--subjects", self.cfg.subjects] if self.cfg.subjects else []) +
                (["--log-samples"] if self.cfg.log_samples else []))

    def begin(self) -> None:
        """Training starts: score the base model (step 0) while it trains, unless it already has a score."""
        self.checkpoint_saved()

    def checkpoint_saved(self) -> None:
        if not self.active:
            return
        if self._proc is not None and self._proc.poll() is None:
            return  # still busy: the next save (or finish) picks this checkpoint up
        self._start()

    def _start(self) -> None:
        log = open(self.output_dir / "mmlu.log", "a", encoding="utf-8")
        # Not a member of the training's process group: without the launcher's variables, lm-eval's accelerate
        # would try to join it (and fail on the port that is already taken).
        env, device = scorer_env(self.cfg.device, dict(os.environ))
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), *filter(None, [env.get("PYTHONPATH")])])
        self._proc = subprocess.Popen(self.command(device), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env)
        log.close()  # the child holds its own descriptor

    def stop(self) -> None:
        """The run is ending early (signal, error): end a scoring pass in flight rather than leave it behind."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self.active = False

    def finish(self) -> str | None:
        """Wait for the scorer, score what is left, and return ``mmlu.md`` (``None`` if not scoring)."""
        if not self.active:
            return None
        if self._proc is not None:
            self._proc.wait()
        self._start()
        if self._proc.wait() != 0:
            return f"MMLU scoring failed; see {self.output_dir / 'mmlu.log'}"
        table = self.output_dir / "mmlu.md"
        return table.read_text() if table.is_file() else None
