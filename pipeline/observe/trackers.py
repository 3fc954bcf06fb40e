"""Experiment trackers, TensorBoard and Weights & Biases, beside ``metrics.jsonl`` (which is always written).

What is logged, each at its own step number:

- rank 0 of the training, every optimizer step: ``train/loss``, ``train/lr/<group>`` for every LoRA+ group,
  ``train/grad_norm``, ``train/tokens_per_s``, ``train/mfu``, ``train/mem_peak_gb``; ``eval/val_loss`` when the
  validation set is scored; and ``eval/mmlu/acc`` with ``eval/mmlu/acc_stderr`` and the four categories at each
  checkpoint's step, as its score lands in ``mmlu.jsonl`` (the background scorer writes the file; the training
  process, the one writer while it lives, logs the rows);
- ``eval/watch.py`` run on its own: the scores it adds.

Everyone writes into the same run. TensorBoard: event files in ``output_dir/tensorboard/``, one per writer, as for
any resumed TensorBoard run (``tensorboard --logdir OUTPUT_DIR/tensorboard``; add ``--reload_multifile true`` to
see a watcher's scores arrive live). W&B: the one run whose id ``output_dir/trackers.json`` records, resumed with
``resume="allow"``; ``WANDB_MODE=offline`` and ``WANDB_DIR`` are W&B's own and honoured (default directory:
``output_dir``). The step is the metric ``step``, the x axis of every chart (``define_metric``, as transformers'
``WandbCallback`` does with ``train/global_step``): a checkpoint's score, which arrives after training has moved
on, is drawn at the checkpoint's step, where ``wandb.log(step=...)`` would refuse a step below the run's current
one. The resolved config is logged once per run, by its first start.

A tracker that fails (no network, a bad key, a full disk) prints one warning line and is off for the rest of the
process; training, and ``metrics.jsonl``, go on. A tracker asked for but not installed is refused before the run
starts (:func:`check_installed`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
from pathlib import Path
from typing import Callable

from pipeline.config import LoggingConfig
from pipeline.errors import UserError
from pipeline.files import atomic_write_text

STATE = "trackers.json"  # {"wandb_id": ..., "config_logged": [...], "mmlu_logged": [...]}
MMLU_KEYS = ("acc", "acc_stderr", "stem", "humanities", "social_sciences", "other")
INSTALL = "pip install tensorboard wandb (or pip install -e '.[trackers]')"


def check_installed(cfg: LoggingConfig) -> None:
    """Refuse a tracker that is asked for and not installed, before anything starts."""
    for on, key, module, package in ((cfg.tensorboard, "logging.tensorboard", "tensorboard", "tensorboard"),
                                     (cfg.wandb, "logging.wandb", "wandb", "wandb")):
        if on and importlib.util.find_spec(module) is None:
            raise UserError(f"{key}=true needs the {package} package, which is not installed: {INSTALL}; or set "
                            f"{key}=false")


def step_scalars(row: dict) -> dict[str, float | None]:
    """A ``metrics.jsonl`` row as tracker scalars."""
    out = {"train/loss": row["loss"], "train/grad_norm": row["grad_norm"], "train/tokens_per_s": row["tokens_per_s"],
           "train/mfu": row["mfu"], "train/mem_peak_gb": row["mem_peak_gb"]}
    out.update({f"train/lr/{group}": lr for group, lr in row["lr_groups"].items()})
    return out


def mmlu_scalars(row: dict) -> dict[str, float | None]:
    """An ``mmlu.jsonl`` row as tracker scalars."""
    return {f"eval/mmlu/{k}": row.get(k) for k in MMLU_KEYS}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Trackers:
    """The trackers ``cfg`` asks for, writing into the run in ``output_dir`` (none when ``active`` is false).

    Args:
        config: the resolved recipe to log once per run (``None``: a watcher, which never logs it).
        warn: prints one line (the run's console).
    """

    def __init__(self, output_dir: Path, cfg: LoggingConfig, config: dict | None = None,
                 warn: Callable[[str], None] = print, active: bool = True):
        self.output_dir = output_dir
        self._warn = warn
        self._tb = self._wb = None
        self._mmlu_seen: tuple[float, int] | None = None
        if not active or not (cfg.tensorboard or cfg.wandb):
            self._state: dict = {}
            return
        self._state = self._read_state()
        logged = set(self._state.get("config_logged", []))
        if cfg.tensorboard:
            self._tb = self._attempt("TensorBoard", lambda: self._open_tensorboard(
                None if "tensorboard" in logged else config))[1]
        if cfg.wandb:
            self._wb = self._attempt("W&B", lambda: self._open_wandb(cfg, None if "wandb" in logged else config))[1]
        if config is not None:
            self._state["config_logged"] = sorted(logged | {n for n, t in (("tensorboard", self._tb),
                                                                             ("wandb", self._wb)) if t})
        self._save_state()

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wb is not None

    # ------------------------------------------------------------------------------------------------------

    def _read_state(self) -> dict:
        try:
            state = json.loads((self.output_dir / STATE).read_text())
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        if not self.active:
            return
        try:
            atomic_write_text(self.output_dir / STATE, json.dumps(self._state, indent=1) + "\n")
        except OSError as e:
            self._warn(f"warning: could not write {self.output_dir / STATE} ({e.strerror or e}); the trackers go on")

    def _attempt(self, name: str, fn) -> tuple[bool, object]:
        """``(True, fn())``, or ``(False, None)`` after one warning line if ``fn`` raised."""
        try:
            return True, fn()
        except Exception as e:  # noqa: BLE001  (any tracker failure: one line, and training goes on)
            self._warn(f"warning: {name} logging is off for this run: {_one_line(e)} (metrics.jsonl is unaffected)")
            return False, None

    def _open_tensorboard(self, config: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.output_dir / "tensorboard"))
        if config is not None:
            import yaml

            text = yaml.safe_dump(config, sort_keys=False)
            writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), 0)  # a code block
            writer.flush()
        return writer

    def _open_wandb(self, cfg: LoggingConfig, config: dict | None):
        import wandb

        run_id = self._state.get("wandb_id") or secrets.token_hex(4)
        kwargs = {} if os.environ.get("WANDB_DIR") else {"dir": str(self.output_dir)}
        run = wandb.init(project=cfg.wandb_project or None, name=cfg.wandb_name or self.output_dir.name, id=run_id,
                         resume="allow", config=config, settings=wandb.Settings(quiet=True), **kwargs)
        run.define_metric("step")
        run.define_metric("*", step_metric="step", step_sync=True)
        self._state["wandb_id"] = run_id
        where = (f"offline in {Path(run.dir).parent}; `wandb sync` that directory to upload it" if run.offline
                 else run.url)
        self._warn(f"W&B: run {run.name} ({run_id}), {where}")
        return run

    # ------------------------------------------------------------------------------------------------------

    def log(self, step: int, scalars: dict) -> None:
        """Log the finite numbers of ``scalars`` at ``step``."""
        values = {k: float(v) for k, v in scalars.items() if _number(v)}
        if not values:
            return
        if self._tb is not None:
            def tb():
                for k, v in values.items():
                    self._tb.add_scalar(k, v, step)
                self._tb.flush()

            if not self._attempt("TensorBoard", tb)[0]:
                self._tb = None
        if self._wb is not None:
            if not self._attempt("W&B", lambda: self._wb.log({**values, "step": step}))[0]:
                self._wb = None

    def mmlu_rows(self, rows: list[dict]) -> None:
        """Log the rows of ``mmlu.jsonl`` not logged into this run yet (by anyone)."""
        if not self.active:
            return
        done = set(self._read_state().get("mmlu_logged", [])) | set(self._state.get("mmlu_logged", []))
        new = [r for r in rows if r["step"] not in done]
        for r in new:
            self.log(r["step"], mmlu_scalars(r))
        if new:
            self._state["mmlu_logged"] = sorted(done | {r["step"] for r in new})
            self._save_state()

    def sync_mmlu(self) -> None:
        """Log the rows ``mmlu.jsonl`` gained since the last look (a ``stat`` when it has not changed)."""
        if not self.active:
            return
        path = self.output_dir / "mmlu.jsonl"
        try:
            st = path.stat()
        except OSError:
            return
        if self._mmlu_seen == (st.st_mtime, st.st_size):
            return
        self._mmlu_seen = (st.st_mtime, st.st_size)
        from pipeline.eval.report import read_rows

        self.mmlu_rows(read_rows(self.output_dir))

    def close(self) -> None:
        if self._tb is not None:
            self._attempt("TensorBoard", self._tb.close)
        if self._wb is not None:
            self._attempt("W&B", self._wb.finish)
        self._tb = self._wb = None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
