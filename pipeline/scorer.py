"""Scoring checkpoints on MMLU while a run trains, without holding the training ranks.

Rank 0 starts ``eval/watch.py --once`` in a background process after a checkpoint is sealed (one at a time; a
checkpoint saved while one is running is picked up by the next). At the end of the run, rank 0 waits for it,
scores whatever is left, and returns the table. The watcher's locks make it safe to run a separate
``eval/watch.py`` on another node at the same time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import MmluEvalConfig

WATCH = Path(__file__).resolve().parent.parent / "eval" / "watch.py"
LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "CROSS_RANK", "CROSS_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE"}


def enabled(cfg: MmluEvalConfig, model_is_builtin: bool) -> bool:
    """``eval.mmlu.every_checkpoint``: ``auto`` means on for the embedded tiny model only."""
    return cfg.every_checkpoint == "true" or (cfg.every_checkpoint == "auto" and model_is_builtin)


class BackgroundScorer:
    """Rank 0's background scoring (``active`` false elsewhere, or when scoring is off)."""

    def __init__(self, output_dir: Path, cfg: MmluEvalConfig, active: bool):
        self.output_dir, self.cfg = output_dir, cfg
        self.active = active
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, str(WATCH), "--run", str(self.output_dir), "--once", "--mmlu-data", self.cfg.data,
               "--num-fewshot", str(self.cfg.num_fewshot), "--batch-size", self.cfg.batch_size,
               "--device", self.cfg.device]
        return cmd + (["--limit", str(self.cfg.limit)] if self.cfg.limit else [])

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
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
        self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env)
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
