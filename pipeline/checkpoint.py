"""Checkpoint layout (resume and fault tolerance build on it).

::

    output_dir/
      config.yaml                 the resolved recipe
      metrics.jsonl               one row per optimizer step
      checkpoints/step-<N>/
        adapter/                  a PEFT adapter directory: adapter_config.json + adapter_model.safetensors
        deepspeed/                DeepSpeed engine state (optimizer, scheduler, trainable weights; per rank)
        trainer_state.json        step, and what produced it
        config.yaml               the recipe that produced it
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline import distributed as dist
from pipeline.config import Config, save_config
from pipeline.errors import UserError

ENGINE_TAG = "deepspeed"


def step_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step}"


def save(engine, peft_model, cfg: Config, output_dir: Path, step: int, rank: int, zero3: bool) -> Path:
    """Save adapter + engine state for ``step``. Collective: every rank calls it.

    Under ZeRO-3 the LoRA parameters are gathered first; saving them partitioned would write empty tensors.
    """
    out = step_dir(output_dir, step)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    with dist.gathered(trainable, enabled=zero3):
        if rank == 0:
            # save_embedding_layers=False: the base embedding is frozen and never resized here, and PEFT would
            # otherwise also save it when an embedding is a LoRA target (a partitioned, empty tensor under ZeRO-3).
            peft_model.save_pretrained(out / "adapter", safe_serialization=True, save_embedding_layers=False)
            _check_adapter(out / "adapter")
    dist.save_engine_state(engine, out, ENGINE_TAG, client_state={"step": step})
    if rank == 0:
        save_config(cfg, out / "config.yaml")
        (out / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
    dist.barrier()
    return out


def _check_adapter(adapter_dir: Path) -> None:
    """Refuse to leave behind an adapter with an empty tensor (an un-gathered ZeRO-3 partition)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        empty = [k for k in f.keys() if 0 in f.get_slice(k).get_shape()]
    if empty:
        raise RuntimeError(f"adapter saved with empty tensors (not gathered under ZeRO-3?): {empty[:3]}")


RUN_ARTIFACTS = ("config.yaml", "metrics.jsonl", "deepspeed_config.json", "checkpoints")


def check_output_dir(path: str, overwrite: bool) -> Path:
    """Refuse to start over an existing run unless ``--overwrite`` was given. Reads only; changes nothing.

    Raises:
        UserError: ``output_dir`` holds a run and ``overwrite`` is false, or it is a file.
    """
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory")
    if out.is_dir() and not overwrite:
        found = [a for a in RUN_ARTIFACTS if (out / a).exists()]
        if found:
            raise UserError(f"output_dir {out} already holds a run ({', '.join(found)}); choose another "
                            f"output_dir=..., or pass --overwrite to delete that run's files and start again")
    return out


def probe_output_dir(out: Path, rank: int) -> None:
    """Rank 0 creates ``out`` and checks it can write there; every rank learns the outcome, so an unwritable
    directory fails everywhere at once with one message. Writes nothing that stays. Collective."""
    error = None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            error = f"output_dir {out} is not writable ({e.strerror or e}); choose another output_dir=..."
    error = dist.broadcast_object(error)
    if error:
        raise UserError(error)


def start_run(out: Path, overwrite: bool, rank: int, cfg: Config, ds_config: dict) -> None:
    """Once every input has been accepted: clear a previous run (with ``--overwrite``) and write the resolved
    ``config.yaml`` and ``deepspeed_config.json``. Collective."""
    if rank == 0:
        if overwrite:
            for name in RUN_ARTIFACTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        save_config(cfg, out / "config.yaml")
        (out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    dist.barrier()
