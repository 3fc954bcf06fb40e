"""Checkpoints: layout, atomic saves, integrity, retention, and what a resume needs.

::

    output_dir/
      config.yaml                 the resolved recipe of the latest start
      deepspeed_config.json       what deepspeed.initialize received
      metrics.jsonl               one row per optimizer step
      checkpoints/
        latest                    "step-<N>": the newest sealed checkpoint (written last)
        best                      "step-<N>": the best one so far, by MMLU acc, else val loss (mmlu_report.py);
                                  never deleted by train.keep_last
        step-<N>/
          adapter/                a PEFT adapter directory: adapter_config.json + adapter_model.safetensors
          deepspeed/              DeepSpeed engine state: LoRA fp32 masters, Adam state per LoRA+ group with its
                                  lr, scheduler, step counters (one file per rank; frozen base excluded)
          rng/rank-<R>.json       python, numpy and torch (and CUDA) RNG states of each rank
          trainer_state.json      step, batch shape, world size, data fingerprint, counters
          config.yaml             the recipe that produced it
          manifest.json           size and sha256 of every file above; written last: no manifest, no checkpoint
        .step-<N>.tmp/            a save in progress (or one a crash interrupted: never read, removed on resume)
        .universal-step-<N>/      step-<N> converted for another world size while a resume loads it
        step-<N>.damaged/         a checkpoint that failed verification, set aside by resume (never deleted)

A save writes everything under ``.step-<N>.tmp``, records sizes and hashes in ``manifest.json``, fsyncs, renames
the directory to ``step-<N>`` and only then points ``latest`` at it. So a crash at any moment leaves either the
new checkpoint complete or the previous one untouched. ``output_dir`` must be one filesystem shared by all ranks
(as on any cluster; see the README).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import distributed as dist
from pipeline.config import Config, save_config
from pipeline.distributed import faults
from pipeline.errors import RunError, UserError
from pipeline.files import atomic_write_text, locked
from pipeline.model.lora import convert_for_original_base, mutates_base
from pipeline.rundir import (
    BEST,
    BEST_LOCK,
    LORA_INIT,
    RUN_ARTIFACTS,
    RUN_OUTPUTS,
    best_name,
    checkpoints_dir,
    latest_name,
    sealed_steps,
    step_dir,
)

ENGINE_TAG = "deepspeed"
MANIFEST = "manifest.json"






# ----------------------------------------------------------------------------------------------------------
# Saving


def save(engine, peft_model, cfg: Config, output_dir: Path, step: int, rank: int, zero3: bool,
         trainer_state: dict) -> Path:
    """Write and seal checkpoint ``step``; keep ``train.keep_last``. Collective: every rank calls it.

    Raises:
        RunError: a write failed on some rank (full disk, lost mount). The half-written directory is removed and
            the previous checkpoint is left as it was.
    """
    final = step_dir(output_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        error = None
        if rank == 0:
            error = _attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
        _raise_if_any(error, step, tmp, output_dir, rank)

        # Rank-0-only phases catch every exception (a full disk surfaces as SafetensorError, too): the other
        # ranks are waiting to hear how it went.
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        with dist.gathered(trainable, enabled=zero3):
            if rank == 0:
                init = output_dir / LORA_INIT if mutates_base(cfg.lora) else None
                error = _attempt(lambda: _save_adapter(peft_model, tmp / "adapter", init), Exception)
        _raise_if_any(error, step, tmp, output_dir, rank)

        error = dist.save_engine_state(engine, tmp, ENGINE_TAG, client_state={"step": step},
                                       before_write=lambda: faults.before_write(step, rank))
        error = error or _attempt(lambda: _write_json(tmp / "rng" / f"rank-{rank}.json", rng_state()))
        faults.during_save(step, rank)
        _raise_if_any(error, step, tmp, output_dir, rank)

        if rank == 0:
            error = _attempt(lambda: _seal(tmp, final, cfg, trainer_state), Exception)
        _raise_if_any(error, step, tmp, output_dir, rank)
    except RunError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        from pipeline.eval.report import choose_best

        error = _attempt(lambda: choose_best(output_dir), Exception)  # by val loss until MMLU scores arrive
        if error:
            print(f"warning: could not update {checkpoints_dir(output_dir) / BEST}: {error}", flush=True)
        error = _attempt(lambda: _retain(output_dir, cfg.train.keep_last), Exception)
        if error:  # the new checkpoint is sealed; an old one left behind costs only disk
            print(f"warning: could not delete an old checkpoint (train.keep_last): {error}", flush=True)
    dist.barrier()
    return final


def _attempt(fn, *also: type[Exception]) -> str | None:
    """Run ``fn``; a failed write becomes its message, so every rank can learn of it (see ``_raise_if_any``)."""
    try:
        fn()
    except OSError as e:
        return f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    except also as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _raise_if_any(error: str | None, step: int, tmp: Path, output_dir: Path, rank: int) -> None:
    error = dist.first_error(error)
    if error:
        previous = latest_name(output_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise RunError(f"saving checkpoint step-{step} failed: {error}; {kept}; free space or fix "
                       f"{checkpoints_dir(output_dir)}, then rerun the same command to resume")


def _save_adapter(peft_model, directory: Path, init: Path | None) -> None:
    """``init``: a PiSSA/OLoRA run's ``lora_init``; the adapter is then converted to apply to the original base."""
    # save_embedding_layers=False: the base embedding is frozen and never resized here, and PEFT would otherwise
    # also save it when an embedding is a LoRA target (a partitioned, empty tensor under ZeRO-3).
    peft_model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    _check_adapter(directory)
    if init is not None:
        convert_for_original_base(directory, init)


def _check_adapter(adapter_dir: Path) -> None:
    """Refuse to leave behind an adapter with an empty tensor (an un-gathered ZeRO-3 partition)."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        empty = [k for k in f.keys() if 0 in f.get_slice(k).get_shape()]
    if empty:
        raise RuntimeError(f"adapter saved with empty tensors (not gathered under ZeRO-3?): {empty[:3]}")


def _seal(tmp: Path, final: Path, cfg: Config, trainer_state: dict) -> None:
    """Rank 0, after every rank wrote its files: manifest, fsync, rename, then the ``latest`` pointer."""
    save_config(cfg, tmp / "config.yaml")
    _write_json(tmp / "trainer_state.json", trainer_state)
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[path.relative_to(tmp).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path, fsync=True)}
    _write_json(tmp / MANIFEST, {"format": 1, "files": files})
    _sha256(tmp / MANIFEST, fsync=True)
    _fsync_dir(tmp)
    if final.exists():  # the same step, written before a resume from an older checkpoint: replace it
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    _point_latest_at(final)


def _point_latest_at(checkpoint: Path) -> None:
    atomic_write_text(checkpoint.parent / "latest", checkpoint.name + "\n", fsync=True)
    _fsync_dir(checkpoint.parent)


def _retain(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` sealed checkpoints (0: keep all), and never ``checkpoints/best``.
    Runs after a save is sealed."""
    if keep_last <= 0:
        return
    with locked(output_dir / BEST_LOCK):  # not while a scorer moves the pointer
        keep = best_name(output_dir)
        for _, path in sealed_steps(output_dir)[keep_last:]:
            if path.name != keep:
                shutil.rmtree(path)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _sha256(path: Path, fsync: bool = False) -> str:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if fsync:
            os.fsync(f.fileno())
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# Finding and verifying








def verify(directory: Path) -> str | None:
    """Why ``directory`` is not a usable checkpoint, or ``None`` if every file matches its manifest."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (its save never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != meta["size"]:
            return f"{rel} is {size} bytes, {meta['size']} were written (truncated?)"
        if _sha256(path) != meta["sha256"]:
            return f"{rel} does not match the sha256 recorded when it was written (corrupt)"
    for required in ("trainer_state.json", "adapter/adapter_model.safetensors", f"{ENGINE_TAG}/"):
        if not any(rel == required or rel.startswith(required) for rel in files):
            return f"{required} was never written"
    return None


@dataclass
class ResumePoint:
    """Where a run continues: ``directory`` is ``None`` when the run has no usable checkpoint (start at 0)."""

    directory: Path | None = None
    state: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


def find_resume_point(output_dir: Path) -> ResumePoint:
    """Rank 0, on a run being continued: the newest checkpoint whose files all match their manifest.

    Then, and only then, interrupted saves are removed, newer damaged checkpoints are set aside as
    ``step-<N>.damaged`` and ``latest`` names the chosen one. If checkpoints exist and none verifies, nothing is
    changed and the start is refused: restarting from step 0 would cut back ``metrics.jsonl``.

    Raises:
        UserError: checkpoints exist but none verifies.
    """
    point = ResumePoint()
    root = checkpoints_dir(output_dir)
    damaged = []
    steps = sealed_steps(output_dir)
    for step, path in steps:
        reason = verify(path)
        if reason is None:
            point.directory = path
            point.state = json.loads((path / "trainer_state.json").read_text())
            break
        damaged.append((path, reason))
    if steps and point.directory is None:
        listed = "; ".join(f"{p.name}: {r}" for p, r in damaged)
        raise UserError(f"no checkpoint in {root} can be resumed ({listed}); nothing was changed; restore a good "
                        f"checkpoint there, or pass --overwrite to delete the run and start again")
    for tmp in sorted(root.glob(".step-*.tmp")) if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
        point.notes.append(f"removed {tmp.name}: a save that was interrupted before it was sealed")
    for tmp in sorted(root.glob(".universal-step-*")) if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)  # a conversion for an earlier resume; made again when needed
    for path, reason in damaged:
        aside = path.with_name(f"{path.name}.damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged{n}")
        os.replace(path, aside)
        point.notes.append(f"skipped {path.name}: {reason}; moved it to {aside.name}")
    if point.directory is not None and latest_name(output_dir) != point.directory.name:
        _point_latest_at(point.directory)
    return point


# ----------------------------------------------------------------------------------------------------------
# Starting or continuing a run in output_dir


LOCK = ".lock"
_held_lock: int | None = None  # rank 0's open lock file, held for the life of the process


def holds_run(output_dir: Path) -> bool:
    return output_dir.is_dir() and any((output_dir / a).exists() for a in RUN_ARTIFACTS)


def check_output_dir(path: str, overwrite: bool) -> Path:
    """``output_dir`` resolved. Reads only.

    Raises:
        UserError: it is a file; or it is a non-empty directory that holds no run and ``overwrite`` is false.
    """
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory")
    if out.is_dir() and not overwrite and not holds_run(out):
        foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK and not p.name.startswith(".write-test-"))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UserError(f"output_dir {out} is not empty ({shown}) and holds no run; choose a new or empty "
                            f"directory, or pass --overwrite to start a run there (only a run's own files are ever "
                            f"deleted)")
    return out


def probe_output_dir(out: Path, rank: int) -> None:
    """Rank 0 creates ``out``, checks it can write there, and locks it against a second run started on it (a
    ``flock`` held until the process ends). Every rank learns the outcome, so an unwritable or busy directory
    fails everywhere at once with one message. Collective."""

    def probe() -> None:
        global _held_lock
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            fd = os.open(out / LOCK, os.O_CREAT | os.O_RDWR)
        except OSError as e:
            raise UserError(f"output_dir {out} is not writable ({e.strerror or e}); choose another "
                            f"output_dir=...") from None
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"output_dir {out} is in use by another run (it holds {out / LOCK}); wait for that "
                            f"run to end, or choose another output_dir=...") from None
        except OSError as e:  # a filesystem without flock (some Lustre/NFS mounts): no guard, but no refusal
            print(f"warning: cannot lock {out / LOCK} ({e.strerror or e}); nothing stops a second run on this "
                  f"output_dir", file=sys.stderr, flush=True)
        _held_lock = fd

    dist.on_rank0(probe, rank)


def start_run(out: Path, overwrite: bool, rank: int, cfg: Config, ds_config: dict, resume_step: int | None) -> None:
    """Once every input has been accepted: with ``--overwrite`` clear the previous run; when continuing one,
    cut ``metrics.jsonl`` and ``val.jsonl`` back to the resumed step (later rows are recomputed); write the resolved
    ``config.yaml`` and ``deepspeed_config.json``. Collective."""

    def start() -> None:
        if overwrite:
            for name in RUN_ARTIFACTS + RUN_OUTPUTS:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        elif resume_step is not None:
            truncate_metrics(out / "metrics.jsonl", resume_step)
            truncate_metrics(out / "val.jsonl", resume_step)
        save_config(cfg, out / "config.yaml")
        (out / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")

    dist.on_rank0(start, rank)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps ``<= step`` (a row cut short by a crash is dropped). Atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------------------------
# RNG states, as JSON (no pickles)


def rng_state() -> dict:
    import numpy as np
    import torch

    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def read_rng_state(directory: Path, rank: int) -> dict | None:
    path = directory / "rng" / f"rank-{rank}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _b64(t) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(text: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def run_facts(cfg: Config, world_size: int, zero_stage: int, precision: str, num_samples: int, data_id: str):
    """A function of the loop's progress giving the ``trainer_state.json`` of a checkpoint at that point."""
    from importlib.metadata import version

    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    fixed = {
        "global_batch": global_batch, "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum, "world_size": world_size, "zero_stage": zero_stage,
        "precision": precision, "num_samples": num_samples, "data_fingerprint": data_id,
        "versions": {lib: version(lib) for lib in ("torch", "deepspeed", "transformers", "peft")},
    }

    def facts(progress) -> dict:
        return {"step": progress.step, "samples_seen": progress.step * global_batch,
                "epoch": progress.step * global_batch / num_samples, "nonfinite_steps": progress.nonfinite_steps,
                "elapsed_s": round(progress.elapsed_s, 3), **fixed,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    return facts
