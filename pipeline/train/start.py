"""How a run starts: the inputs checked before anything heavy is imported, and the start decision.

:func:`check_request` turns the command line into a :class:`Request`: the recipe, the DeepSpeed JSON, the model,
data and output paths, all resolved and checked before DeepSpeed is imported or a process group exists (what a
user can get wrong fails in a second). :func:`check_runtime` adds what the machine decides (accelerator,
optimizer, precision). :func:`decide` is the one place that decides how the start begins, from the resume point
rank 0 found (:func:`find_point`):

- ``fresh``: nothing to continue (a new ``output_dir``, ``--overwrite``, or a run without a complete checkpoint);
- ``resume``: from a checkpoint, on the world size that wrote it or on another (``universal``: DeepSpeed's
  universal checkpoint; the batch split is refitted to the checkpoint's global batch);
- ``nothing_to_do``: the run is already at ``train.max_steps``.

It returns one :class:`Start` that carries everything the later phases need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import distributed as dist
from pipeline import files
from pipeline.config import Config, make_config, resolve_file
from pipeline.distributed import watchdog
from pipeline.errors import UserError
from pipeline.eval import scorer
from pipeline.model import tiny
from pipeline.observe import trackers
from pipeline.optim import loraplus
from pipeline.train import checkpoint, resume


@dataclass(frozen=True)
class Request:
    """What the command line asks for, resolved and checked (phase 1)."""

    cfg: Config  # model, data, DeepSpeed and output paths absolute
    ds_path: Path
    ds_json: dict
    output_dir: Path
    overwrite: bool
    scoring: bool  # MMLU in the background (eval.mmlu.every_checkpoint)
    continuing: bool  # output_dir holds a run to continue
    peer_timeout: float  # LORAPLUS_PEER_TIMEOUT


@dataclass(frozen=True)
class Runtime:
    """What this machine decides: the accelerator, the optimizer class, the precision."""

    on_gpu: bool
    optimizer: str
    precision: str
    precision_note: str | None


@dataclass(frozen=True)
class Start:
    """How this start begins: ``kind`` is ``fresh``, ``resume`` or ``nothing_to_do``."""

    kind: str
    cfg: Config  # with the batch split refitted on a resume on another world size
    point: checkpoint.ResumePoint | None = None  # what rank 0 found (with a checkpoint: ``resume``)
    universal: bool = False  # load it through DeepSpeed's universal checkpoint (another world size)
    notes: tuple[str, ...] = field(default_factory=tuple)  # lines for the log, in order

    @property
    def resume_step(self) -> int | None:
        """The step ``output_dir``'s metrics are cut back to (``None``: a new run)."""
        return self.point.step if self.point is not None else None


def check_request(args) -> Request:
    """Phase 1: the recipe, the JSON, the model and data paths and ``output_dir``, before anything heavy.

    Raises:
        UserError: anything a user can get wrong there, in one line.
    """
    cfg = make_config(args.config, args.overrides, args.deepspeed_config)
    ds_path = resolve_file(cfg.deepspeed_config, "DeepSpeed config", "deepspeed_config")
    ds_json = dist.read_ds_json(ds_path)
    builtin = cfg.model.name_or_path == tiny.BUILTIN_MODEL
    scoring = scorer.enabled(cfg.eval.mmlu, model_is_builtin=builtin)
    # eval.mmlu.num_fewshot=auto resolved here, once: config.yaml and the scorer see the number
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, mmlu=dataclasses.replace(
        cfg.eval.mmlu, num_fewshot=str(scorer.shots(cfg.eval.mmlu, model_is_builtin=builtin)))))
    if cfg.model.random_init and scoring:
        if cfg.eval.mmlu.every_checkpoint == "true":
            raise UserError("eval.mmlu.every_checkpoint=true cannot score model.random_init runs: their adapters "
                            "have no base model on disk to load with")
        scoring = False
    trackers.check_installed(cfg.logging)
    model_path, data_path = tiny.resolve_builtin(cfg.model.name_or_path, cfg.data.path)
    from pipeline.model.load import check_model_dir, check_shape, has_tokenizer

    if not cfg.model.random_init:
        check_shape(check_model_dir(model_path), cfg.model.shape, model_path)
    elif not has_tokenizer(model_path):  # random weights: any tokenizer whose ids fit the vocabulary will do
        model_path = str(tiny.ensure_tiny_model())
    output_dir = checkpoint.check_output_dir(cfg.output_dir, args.overwrite)
    val_path = cfg.data.val_path and str(Path(cfg.data.val_path).resolve())
    cfg = dataclasses.replace(cfg, deepspeed_config=str(ds_path), output_dir=str(output_dir),
                              model=dataclasses.replace(cfg.model, name_or_path=str(Path(model_path).resolve())),
                              data=dataclasses.replace(cfg.data, path=str(Path(data_path).resolve()),
                                                       val_path=val_path))
    if scoring:  # bad MMLU data is found now, not in mmlu.log after the first checkpoint
        from pipeline.eval import mmlu

        mmlu.resolve(cfg.eval.mmlu.data, int(cfg.eval.mmlu.num_fewshot), files.cache_dir())
        mmlu.check_subjects(cfg.eval.mmlu.parse_subjects(cfg.eval.mmlu.subjects))
    continuing = checkpoint.holds_run(output_dir) and not args.overwrite
    peer_timeout = watchdog.timeout_from_env()
    if continuing:
        resume.check_same_experiment(output_dir, cfg)
    return Request(cfg, ds_path, ds_json, output_dir, args.overwrite, scoring, continuing, peer_timeout)


def check_runtime(req: Request) -> Runtime:
    """The accelerator, the optimizer and the precision, and what they refuse."""
    cfg = req.cfg
    on_gpu = dist.select_accelerator()
    kind = loraplus.pick_optimizer(cfg.optim.optimizer, dist.offloads_optimizer(req.ds_json), on_gpu)
    precision, precision_note = dist.resolve_precision(req.ds_json, cfg.train.precision, on_gpu, req.ds_path)
    if cfg.model.attn_implementation == "flash_attention_2" and precision == "fp32":
        raise UserError(f"model.attn_implementation=flash_attention_2 runs in bf16 or fp16 only, and this run trains "
                        f"in fp32 ({req.ds_path}, train.precision={cfg.train.precision}); set train.precision=bf16 "
                        f"or model.attn_implementation=sdpa")
    scorer.check_device(cfg.eval.mmlu.device, on_gpu, active=req.scoring)
    from pipeline.observe.metrics import quiet_library_warnings

    quiet_library_warnings()
    return Runtime(on_gpu, kind, precision, precision_note)


def find_point(req: Request, rank: int) -> checkpoint.ResumePoint | None:
    """Rank 0 verifies the checkpoints (hashes every file) and tells the others; ``None`` for a new run.
    Collective when continuing."""
    if not req.continuing:
        return None
    return dist.on_rank0(lambda: checkpoint.find_resume_point(req.output_dir), rank)


def decide(cfg: Config, point: checkpoint.ResumePoint | None, world_size: int, output_dir: Path,
           zero_stage: int, precision: str, data_id: str, num_samples: int, unscored: bool = False) -> Start:
    """How this start begins, from the resume point (``None``: nothing to continue). ``unscored``: the point's
    checkpoint waits for its MMLU score on the training engine (:func:`waits_for_engine_score`); a finished run
    is then resumed to score it, and trains no step.

    Raises:
        UserError: a checkpoint this start cannot continue (another ZeRO stage or precision, changed data, a
            global batch this world size cannot keep).
    """
    if point is None:
        return Start("fresh", cfg)
    notes = list(point.notes)
    if point.step >= cfg.train.max_steps and not (unscored and point.directory is not None):
        notes.append(f"nothing to do: {output_dir} is at step {point.step} of train.max_steps="
                     f"{cfg.train.max_steps}; raise train.max_steps to train further")
        return Start("nothing_to_do", cfg, notes=tuple(notes))
    if point.step >= cfg.train.max_steps:
        notes.append(f"{output_dir} is at step {point.step} of train.max_steps={cfg.train.max_steps}: loading "
                     f"{point.directory.name} only to score it on MMLU (eval.mmlu.runner=engine); nothing to train")
    if point.directory is None:
        notes.append(f"{output_dir} holds a run without a complete checkpoint: starting it from step 0")
        return Start("fresh", cfg, point, notes=tuple(notes))  # its metrics are cut back to step 0
    cfg, note = resume.fit_global_batch(cfg, point.state, world_size, point.directory.name)
    if note:
        notes.append(note)
    resume.check_compatible(point.state, zero_stage, precision, data_id, num_samples, point.directory.name)
    return Start("resume", cfg, point, resume.universal_needed(point, world_size), tuple(notes))


def waits_for_engine_score(req: Request, point: checkpoint.ResumePoint | None) -> bool:
    """The newest checkpoint has no MMLU score yet and the training ranks score (``eval.mmlu.runner=engine``): a
    stop or a crash came while it was being scored."""
    if not (req.scoring and req.cfg.eval.mmlu.runner == "engine") or point is None or point.directory is None:
        return False
    from pipeline.eval import score

    return not score.has_score(point.directory, score.configured_setting(req.cfg.eval.mmlu))


def run_notes(cfg: Config, rt: Runtime) -> list[str]:
    """Lines for the log once the start is decided: a precision the JSON did not ask for, random weights."""
    lines = [rt.precision_note] if rt.precision_note else []
    if cfg.model.random_init:
        lines.append(f"model: random weights of model.shape ({cfg.model.shape.num_hidden_layers} layers, width "
                     f"{cfg.model.shape.hidden_size}; model.random_init=true), tokenizer of {cfg.model.name_or_path}")
    return lines
