"""Continuing a run in its ``output_dir``: is it the same experiment, and can this job pick it up?

A run started on an ``output_dir`` that holds a run continues it, from the newest checkpoint that verifies (or
from step 0 if none does). Only settings that do not change the experiment may differ between the starts;
anything else is refused, with ``--overwrite`` (delete and start again) or another ``output_dir`` as the ways out.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline import rundir
from pipeline.config import BUILTIN_DATA, Config, ConfigError, MmluEvalConfig, make_config, to_dict
from pipeline.errors import UserError

# Settings that may change between starts: where and how long to run, how often to save, and how the (same)
# global batch is split. Everything else defines the experiment.
MAY_CHANGE = {
    "output_dir", "deepspeed_config", "train.max_steps", "train.save_every", "train.keep_last", "train.on_nonfinite",
    "train.micro_batch_size", "train.grad_accum", "model.gradient_checkpointing", "model.attn_implementation",
    *(f"eval.mmlu.{k}" for k in MmluEvalConfig.__dataclass_fields__),  # how and where it is scored
    *(f"logging.{k}" for k in ("tensorboard", "wandb", "wandb_project", "wandb_name")),  # where it is watched
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.loads(json.dumps(v))  # tuples -> lists, as YAML gives them back
    return out


def _portable(flat: dict) -> dict:
    """``flat`` with the bundled data file named by its ``builtin:`` name: its path differs between a checkout and
    an installed wheel (and from one installed version to the next), its content does not, and the start decision
    compares the content of the data anyway (``start.decide``: the same tokens)."""
    if str(flat.get("data.path", "")).replace("\\", "/").endswith("/pipeline/data/assets/tiny_instruct.jsonl"):
        flat["data.path"] = BUILTIN_DATA
    return flat


def check_same_experiment(output_dir: Path, cfg: Config) -> None:
    """Refuse to continue a run whose recorded recipe differs from ``cfg`` in a setting that matters."""
    saved_path = output_dir / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"output_dir {output_dir} holds files of a run but no config.yaml, so it cannot be "
                        f"resumed; pass --overwrite to delete them and start again, or choose another output_dir=...")
    try:
        saved = _portable(_flat(to_dict(make_config(saved_path))))
    except ConfigError as e:
        raise UserError(f"the run in output_dir {output_dir} cannot be resumed: {e}; pass --overwrite to start "
                        f"again, or choose another output_dir=...") from None
    new = _portable(_flat(to_dict(cfg)))
    diffs = [f"{k}: {saved.get(k)!r} then, {new.get(k)!r} now" for k in sorted(set(saved) | set(new))
             if k not in MAY_CHANGE and saved.get(k) != new.get(k)]
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise UserError(f"output_dir {output_dir} holds a run with a different recipe ({'; '.join(diffs[:3])}{more}); "
                        f"rerun with its settings to resume it, pass --overwrite to delete it and start again, or "
                        f"choose another output_dir=...")


def fit_global_batch(cfg: Config, state: dict, world_size: int, checkpoint: str) -> tuple[Config, str | None]:
    """Keep the checkpoint's global batch on this world size (the data order and the updates depend on it).

    If the world size changed and the batch split was left as it was, ``train.grad_accum`` is rescaled when that
    gives the same global batch; otherwise the message says which split would.
    """
    saved_global = int(state["global_batch"])
    mb, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    if mb * ga * world_size == saved_global:
        return cfg, None
    split_kept = (mb, ga) == (state["micro_batch_size"], state["grad_accum"])
    if split_kept and saved_global % (mb * world_size) == 0:
        new_ga = saved_global // (mb * world_size)
        note = (f"world size {state['world_size']} -> {world_size}: train.grad_accum {ga} -> {new_ga} keeps the "
                f"global batch of {saved_global} samples")
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=new_ga)), note
    per_rank = saved_global / world_size
    hint = (f"set train.micro_batch_size and train.grad_accum so that micro_batch_size x grad_accum = {per_rank:g} "
            f"(e.g. train.micro_batch_size={int(per_rank)} train.grad_accum=1)" if per_rank == int(per_rank) else
            f"use a world size that divides {saved_global}")
    raise UserError(f"{checkpoint} was trained with a global batch of {saved_global} samples "
                    f"({state['micro_batch_size']} x {state['grad_accum']} x {state['world_size']} ranks); this run "
                    f"has {mb} x {ga} x {world_size} = {mb * ga * world_size}; to resume on {world_size} ranks, {hint}")


def check_compatible(state: dict, zero_stage: int, precision: str, fingerprint: str, num_samples: int,
                     checkpoint: str) -> None:
    """Refuse what a checkpoint cannot continue under: another ZeRO stage or precision, or changed data."""
    if state["zero_stage"] != zero_stage:
        raise UserError(f"{checkpoint} was written under ZeRO-{state['zero_stage']} and this run uses "
                        f"ZeRO-{zero_stage}; resume with a ZeRO-{state['zero_stage']} DeepSpeed config "
                        f"(e.g. --deepspeed_config deepspeed_configs/zero{state['zero_stage']}.json)")
    if state["precision"] != precision:
        raise UserError(f"{checkpoint} was trained in {state['precision']} and this run would train in "
                        f"{precision}; resume with the same precision (the DeepSpeed JSON's bf16/fp16 block)")
    if state["data_fingerprint"] != fingerprint and len(state["data_fingerprint"]) == 64:
        raise UserError(f"{checkpoint} was written before the data cache (its data fingerprint is a hash of every "
                        f"token, now it is the cache key), so this version cannot tell whether the data is the "
                        f"same; finish that run with the version that started it, or pass --overwrite")
    if state["data_fingerprint"] != fingerprint:
        raise UserError(f"the training data changed since {checkpoint} ({state['num_samples']} samples then, "
                        f"{num_samples} now, or different tokens); resuming would feed other batches than the "
                        f"run saw; restore the data, or pass --overwrite to start again")


def restore(engine, point, output_dir: Path, rank: int, world_size: int, lr_lambda, settings: list[dict]) -> str:
    """Load ``point`` into the built engine (collective) and set this rank's RNG; return a line for the log.

    On the world size that wrote it, DeepSpeed's own load. On another one (any ZeRO stage), rank 0 converts the
    checkpoint to DeepSpeed's universal layout first (the engine was built with ``checkpoint.load_universal``,
    see :func:`universal_needed`) and the groups are repaired after the load (``dist.load_universal_state``).
    """
    import shutil

    from pipeline import distributed as dist
    from pipeline.errors import RunError
    from pipeline.train import checkpoint

    if not universal_needed(point, world_size):
        dist.load_engine_state(engine, point.directory, checkpoint.ENGINE_TAG)
    else:
        universal = rundir.checkpoints_dir(output_dir) / f".universal-{point.directory.name}"
        error = None
        if rank == 0:
            try:
                shutil.rmtree(universal, ignore_errors=True)
                dist.to_universal(point.directory / checkpoint.ENGINE_TAG, universal / checkpoint.ENGINE_TAG)
            except (OSError, RuntimeError) as e:
                error = str(e)
        error = dist.first_error(error)
        if error:
            raise RunError(f"cannot resume {point.directory.name} on {world_size} ranks: {error}")
        dist.load_universal_state(engine, universal, checkpoint.ENGINE_TAG, settings)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
    dist.check_groups(engine, settings)
    dist.set_schedule_position(engine, lr_lambda)

    rng = checkpoint.read_rng_state(point.directory, rank) if point.state["world_size"] == world_size else None
    if rng is not None:
        checkpoint.set_rng_state(rng)
        how = "RNG states restored per rank"
    else:  # a new world size has no saved RNG state for some ranks; give each a deterministic fresh one
        import random

        import numpy as np
        import torch

        seed = hash((point.step, rank)) % 2 ** 31
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        via = "through DeepSpeed's universal checkpoint" if universal_needed(point, world_size) else "directly"
        how = f"saved on {point.state['world_size']} ranks, loaded on {world_size} {via}; RNG states re-seeded"
    return (f"resumed from {point.directory.name} (step {point.step}, epoch {point.state['epoch']:.3f}, "
            f"{point.state['samples_seen']:,} samples seen); {how}")


def universal_needed(point, world_size: int) -> bool:
    """Whether resuming ``point`` needs DeepSpeed's universal checkpoint: a different world size under ZeRO 1-3
    (ZeRO-0 keeps whole optimizer state, which loads on any world size)."""
    return (bool(point and point.directory) and point.state["world_size"] != world_size
            and point.state["zero_stage"] != 0)
