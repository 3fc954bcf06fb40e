"""The DeepSpeed engine: the ZeRO-3 load hook, the optimizer, ``deepspeed.initialize``, the lrs and grad norms read back
from the optimizer DeepSpeed wraps, gathering ZeRO-3 parameters, and the engine's own checkpoints (save, load,
universal conversion, the LoRA+ group settings put back after a universal load)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from pipeline.distributed.ds_config import zero_stage


def zero3_load_hook(ds_config: dict):
    """Under ZeRO-3, an object that makes ``from_pretrained`` load inside ``deepspeed.zero.Init`` (partitioned
    at load). Transformers holds it by weak reference: keep the returned object alive for the whole run."""
    if zero_stage(ds_config) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def local_numel(params) -> int:
    """Elements this rank actually holds (a ZeRO-3 partition, or the whole tensor)."""
    return sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in params)


def kept_whole(model, ds_config: dict) -> str | None:
    """Under ZeRO-3, one line: how many parameter tensors DeepSpeed keeps whole on every rank after
    ``deepspeed.initialize`` (``ds_persist``: those of at most ``stage3_param_persistence_threshold`` elements,
    gathered once and never partitioned again) against how many it partitions; ``None`` elsewhere.

    The shipped threshold (100,000) keeps a 7B model's norms whole (4,096 elements each) and partitions every
    projection; on the tiny test model it would keep every tensor whole, and no gather would be collective.
    """
    if zero_stage(ds_config) != 3:
        return None
    params = list(model.parameters())
    whole = [p for p in params if getattr(p, "ds_persist", False)]
    numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    held = sum(int(getattr(p, "ds_numel", p.numel())) for p in whole)
    threshold = (ds_config.get("zero_optimization") or {}).get("stage3_param_persistence_threshold", "default")
    return (f"ZeRO-3: {len(params) - len(whole):,} of {len(params):,} parameter tensors partitioned, {len(whole):,} "
            f"kept whole on every rank ({held:,} of {numel:,} elements; stage3_param_persistence_threshold "
            f"{threshold})")


def build_optimizer(groups: list[dict], kind: str, betas: tuple[float, float], eps: float):
    """The client optimizer over the LoRA+ groups. Group dicts (with their ``name``) are kept as given."""
    import torch

    betas = (float(betas[0]), float(betas[1]))
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=betas, eps=eps, adamw_mode=True)
    if kind == "adamw_fused":
        return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=False)


def initialize(model, optimizer, lr_lambda, ds_config: dict):
    """``deepspeed.initialize`` with our optimizer and a ratio-preserving ``LambdaLR``.

    The scheduler is passed as a callable, so DeepSpeed builds it on the optimizer it actually kept: no stale
    per-group base lrs if DeepSpeed ever rearranged the groups (DeepSpeedExamples PR 756).

    Returns:
        The engine, and each group's settings (everything but its tensors) as DeepSpeed holds them now, for
        :func:`check_groups` after a load.
    """
    import deepspeed
    import torch

    before = [(g["name"], g["lr"]) for g in optimizer.param_groups]
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    after = [(g.get("name"), g.get("initial_lr")) for g in optimizer_param_groups(engine)]
    # DeepSpeed must not have dropped, merged or re-ordered a group, nor changed a base lr.
    assert after == before, f"DeepSpeed changed the LoRA+ param groups: {before} -> {after}"
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer_param_groups(engine)]
    return engine, json.loads(json.dumps(settings))  # a deep copy (settings are numbers, strings and lists)


def optimizer_param_groups(engine) -> list[dict]:
    """The param groups of the optimizer that actually steps (inside DeepSpeed's ZeRO wrapper, if any)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)  # ZeRO 1/2/3 and other wrappers keep the client optimizer here
    return inner.param_groups if inner is not None and hasattr(inner, "param_groups") else opt.param_groups


def current_lrs(engine) -> dict[str, float]:
    """Group name -> lr as it sits in the stepping optimizer now (the lr of the next update)."""
    return {g["name"]: float(g["lr"]) for g in optimizer_param_groups(engine)}


def grad_norm_if_untracked(engine) -> float | None:
    """The global gradient norm where DeepSpeed does not record one (ZeRO-0 in fp32), else ``None``.

    Call after the last backward of a step and before its ``engine.step()``: ZeRO-0 has all-reduced the
    gradients by then (identical on every rank), and the step clips and then zeroes them.
    """
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    import torch

    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


@contextlib.contextmanager
def without_update(engine, enabled: bool):
    """ZeRO-0 (no overflow check of its own): around the boundary ``engine.step()``, forget the step's gradients,
    so the optimizer leaves every parameter and its Adam state alone; the scheduler still steps. Clipping is off
    for that step (DeepSpeed's ``clip_grad_norm_`` fails on a model with no gradient)."""
    if not enabled:
        yield
        return
    for p in engine.module.parameters():
        p.grad = None
    clip = engine._config.gradient_clipping
    engine._config.gradient_clipping = 0.0
    try:
        yield
    finally:
        engine._config.gradient_clipping = clip


def grad_norm(engine, fallback: float | None = None) -> float | None:
    """The step's global gradient norm before clipping: DeepSpeed's own, else ``fallback``."""
    norm = engine.get_global_grad_norm()
    return fallback if norm is None else float(norm)


@contextlib.contextmanager
def gathered(params, enabled: bool):
    """Under ZeRO-3, make ``params`` whole on every rank for the duration (read-only)."""
    if not enabled:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield


@contextlib.contextmanager
def whole_for_compute(params):
    """Under ZeRO-3, make ``params`` whole for the duration (read-only), gathering only those that are not whole
    already and partitioning again only those it gathered; elsewhere a no-op.

    ZeRO-3's fetcher keeps a parameter whole between two uses that its trace puts close together
    (``stage3_max_reuse_distance``): the tied LM head / input embedding stays whole from the head's forward to its
    backward. ``GatheredParameters`` on such a parameter gathers nothing but partitions it on exit, from under the
    fetcher, which then gathers it again for the head's backward. With the chunked loss on SmolLM2 (ZeRO-3, fp32)
    that was two all-gathers of the 108 MiB embedding per micro-batch beyond what the HF Trainer runs: 486 all-gathers
    and 748 MiB a step against 484 and 532 MiB. Every rank takes the same branch: ZeRO-3's fetches follow one trace,
    the same on every rank (DeepSpeed asserts it), so a parameter is whole on all ranks or on none.
    """
    params = [p for p in params if hasattr(p, "ds_status")]
    if not params:
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    missing = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
    with deepspeed.zero.GatheredParameters(missing, modifier_rank=None, enabled=bool(missing)):
        yield


def save_engine_state(engine, directory: Path, tag: str, client_state: dict, before_write=None) -> str | None:
    """DeepSpeed's own checkpoint of optimizer/scheduler/trainable weights (frozen base weights excluded), in
    ``directory/tag``. Collective: every rank must call it.

    Returns this rank's first write error, or ``None``. A failed write is recorded rather than raised: DeepSpeed
    writes some files on rank 0 alone and then waits in a barrier, so an exception there would leave the other
    ranks waiting forever. ``before_write`` runs before each file (fault injection).
    """
    writer = engine.checkpoint_engine
    errors: list[str] = []

    def guarded_save(*args, **kwargs):
        if errors:
            return
        try:
            if before_write:
                before_write()
            type(writer).save(writer, *args, **kwargs)
        except Exception as e:  # noqa: BLE001  (reported to every rank by the caller)
            errors.append(f"{getattr(e, 'strerror', None) or e}")

    writer.save = guarded_save
    try:
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
    finally:
        del writer.save  # back to the class's method
    return errors[0] if errors else None


def load_engine_state(engine, directory: Path, tag: str) -> dict:
    """Restore what :func:`save_engine_state` wrote: the LoRA weights (fp32 masters under ZeRO), every param
    group's Adam state and lr, the scheduler position and DeepSpeed's step counters. Collective.

    DeepSpeed's files are torch pickles; they are read only after the checkpoint's manifest (sizes and sha256
    recorded by this pipeline when it wrote them) has been verified.
    """
    path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {directory / tag}")
    return client_state or {}


def to_universal(tag_dir: Path, out_dir: Path) -> None:
    """Convert a DeepSpeed checkpoint into DeepSpeed's world-size-independent "universal" layout (one folder of
    fp32 weights and Adam moments per parameter), which any number of ranks can load. Rank 0 only.

    ``--inject_missing_state``: ZeRO-1/2 checkpoints written by ``save_checkpoint`` lack the layout metadata the
    converter wants; the flag fills it in (without it: "Required universal_checkpoint_info state is missing").
    """
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out_dir), "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"DeepSpeed's ds_to_universal failed on {tag_dir}: {tail[0]}")


def load_universal_state(engine, directory: Path, tag: str, settings: list[dict]) -> None:
    """Load a universal checkpoint (the engine was built with ``checkpoint.load_universal``) and repair what
    DeepSpeed 0.19.8 gets wrong under ZeRO-3, measured on this pipeline:

    - ``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` copies group 0's settings into every group: every
      group is then named ``lora_A`` with lr_A, so the first resumed step would train B at A's lr (LoRA+ off);
    - it stores one ``step`` tensor object in every group's Adam state, so AdamW counts each step once per group
      and the bias correction drifts, and leaves it on the CPU (:func:`place_adam_steps`).

    Each group gets back the settings it had after ``deepspeed.initialize``, and each Adam state its own step.
    """
    load_engine_state(engine, directory, tag)
    for group, saved in zip(optimizer_param_groups(engine), settings):
        group.update(json.loads(json.dumps(saved)))
    opt = engine.optimizer
    place_adam_steps(getattr(opt, "optimizer", None) or opt)


def place_adam_steps(optimizer) -> None:
    """Give every parameter's Adam ``step`` its own tensor where torch's AdamW expects it.

    DeepSpeed's universal load (``ds_to_universal`` reads with ``map_location='cpu'``; ``stage3.py`` and
    ``base_optimizer.py`` assign the value straight into the state) leaves one shared CPU tensor: AdamW then counts
    each step once per group, and the fused and capturable kernels read a host pointer on a GPU. torch keeps
    ``step`` as a float32 scalar on the parameter's device for fused/capturable AdamW, on the CPU otherwise
    (``torch/optim/adam.py`` ``_init_group``).
    """
    import torch

    # ZeRO-3 empties its groups' "params" between steps (stage3.py puts each flat partition in only while it
    # steps), so the state is walked, and a parameter found in no group takes the optimizer's defaults.
    default = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    flags = {id(p): bool(g.get("fused") or g.get("capturable")) for g in optimizer.param_groups for p in g["params"]}
    for p, state in optimizer.state.items():
        if "step" not in state:
            continue
        step = state["step"]
        value = step if torch.is_tensor(step) else torch.tensor(float(step))
        on_device = flags.get(id(p), default)
        state["step"] = value.detach().to(device=p.device if on_device else "cpu", dtype=torch.float32, copy=True)


def check_groups(engine, settings: list[dict]) -> None:
    """After a load: the groups are still ours, by name and base lr (the LoRA+ ratio survived)."""
    now = [(g.get("name"), g.get("initial_lr")) for g in optimizer_param_groups(engine)]
    built = [(s.get("name"), s.get("initial_lr")) for s in settings]
    assert now == built, f"loading the checkpoint changed the LoRA+ param groups: {built} -> {now}"


def set_schedule_position(engine, lr_lambda) -> None:
    """Set every group's lr to its base lr times ``lr_lambda`` at the restored scheduler position.

    With an unchanged recipe this rewrites the very values DeepSpeed restored; with a raised ``train.max_steps``
    it moves the run onto the new schedule at once rather than one step late.
    """
    scheduler = engine.lr_scheduler
    lrs = []
    for g in optimizer_param_groups(engine):
        g["lr"] = g["initial_lr"] * lr_lambda(scheduler.last_epoch)
        lrs.append(g["lr"])
    scheduler._last_lr = lrs  # what get_last_lr() reports (torch keeps it in this attribute)
