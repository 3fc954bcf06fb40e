"""Everything that touches DeepSpeed or torch.distributed lives here, and nowhere else.

- process-group set-up (``deepspeed`` launcher, SLURM-less single process, CPU/gloo or GPU/nccl);
- reading and validating the DeepSpeed JSON, and filling batch sizes / clipping / precision from the recipe;
- the ZeRO-3 load hook, the optimizer choice, ``deepspeed.initialize``;
- the few collectives the training loop needs.

Light functions (env and JSON handling) import nothing heavy, so bad input is reported before torch or DeepSpeed
are imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError

# Keys the recipe owns. A DeepSpeed JSON setting them would be a second source of truth.
RECIPE_OWNED = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum x world size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.max_grad_norm",
}


# ----------------------------------------------------------------------------------------------------------
# Environment (no heavy imports)


def env_rank() -> int:
    """Global rank from the launcher's environment (0 for a plain ``python`` run)."""
    return int(os.environ.get("RANK", "0"))


def set_single_process_defaults() -> None:
    """Let ``python launch/train.py`` run as a world of one: DeepSpeed would otherwise try MPI discovery."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:  # a free port for the (single-member) process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# ----------------------------------------------------------------------------------------------------------
# The DeepSpeed JSON


def read_ds_json(path: Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON and refuse what would break LoRA+ or duplicate the recipe.

    Raises:
        ConfigError: malformed JSON; an ``optimizer`` or ``scheduler`` block; batch/clipping keys; ``"auto"``.
    """
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    if "optimizer" in ds:
        raise ConfigError(f"{path}: has an 'optimizer' block, which would replace the LoRA+ optimizer and its "
                          f"per-group learning rates; remove it and set optim.* in the recipe instead")
    if "scheduler" in ds:
        raise ConfigError(f"{path}: has a 'scheduler' block; DeepSpeed's WarmupLR/WarmupDecayLR write one lr into "
                          f"every group and flatten lr_B/lr_A; remove it and set schedule.* in the recipe instead")
    for key, owner in RECIPE_OWNED.items():
        if key in ds:
            raise ConfigError(f"{path}: sets '{key}', which the recipe owns ({owner}); remove it from the JSON")

    def find_auto(node: Any, trail: str) -> None:
        if node == "auto":
            raise ConfigError(f"{path}: '{trail}' is \"auto\", which only the HF Trainer resolves; give a value")
        if isinstance(node, dict):
            for k, v in node.items():
                find_auto(v, f"{trail}.{k}" if trail else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                find_auto(v, f"{trail}[{i}]")

    find_auto(ds, "")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3")
    # DeepSpeed skips a step with NaN/inf gradients only while these are on; off, a NaN update is applied.
    for section, key in (("zero_optimization", "compute_grad_norm"), ("bf16", "check_grad_overflow")):
        if isinstance(ds.get(section), dict) and ds[section].get(key) is False:
            raise ConfigError(f"{path}: {section}.{key} is false, which turns off DeepSpeed's check for NaN/inf "
                              f"gradients, so a non-finite step would poison the weights; remove it")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def optimizer_offload_device(ds: dict) -> str:
    """``cpu``, ``nvme`` or ``none``: where the JSON keeps optimizer state."""
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none")


def offloads_optimizer(ds: dict) -> bool:
    return optimizer_offload_device(ds) in ("cpu", "nvme")


TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # names; torch is imported lazily
BF16_KEYS = ("bf16", "bfloat16")  # DeepSpeed still reads the legacy "bfloat16" block (runtime/config.py)


def json_precision(ds: dict) -> str:
    """``bf16``, ``fp16`` or ``fp32``: what a DeepSpeed JSON asks for."""
    if any(isinstance(ds.get(k), dict) and ds[k].get("enabled") for k in BF16_KEYS):
        return "bf16"
    if isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled"):
        return "fp16"
    return "fp32"


def resolve_precision(ds: dict, requested: str, on_gpu: bool, json_path) -> tuple[str, str | None]:
    """The precision a run trains in, and a line to print when it is not what the JSON says.

    ``train.precision=auto`` follows the JSON on GPU and is fp32 on CPU (fast, and what CPU runs always were);
    ``bf16``/``fp32`` win over the JSON. bf16 under ZeRO-0 is refused: DeepSpeed wraps the optimizer in
    ``FP16_UnfusedOptimizer``, whose constructor takes one real ``optimizer.step()`` on zero gradients
    (``unfused_optimizer.py`` ``initialize_optimizer_states``), so every Adam state starts at step 1 and weight decay
    is applied once before training; with fp32 gradient accumulation (below) it refuses the mix outright.

    Raises:
        ConfigError: bf16 with ZeRO stage 0.
    """
    wanted = json_precision(ds)
    if requested == "auto":
        precision = wanted if on_gpu else "fp32"
        note = None
    else:
        precision = requested
        note = (f"train.precision={requested} overrides the {wanted} of {json_path}" if wanted != requested else None)
    if precision == "bf16" and zero_stage(ds) == 0:
        raise ConfigError(f"{json_path}: bf16 with ZeRO stage 0 is not supported: DeepSpeed's ZeRO-0 bf16 optimizer "
                          f"takes one real step on zero gradients when it is built; use deepspeed_configs/zero1.json "
                          f"(same memory for LoRA, fp32 master weights) or train.precision=fp32")
    return precision, note


def assemble_ds_config(ds: dict, cfg: Config, world_size: int, precision: str) -> dict[str, Any]:
    """The config handed to ``deepspeed.initialize``: the JSON's ZeRO/offload choices, the resolved precision,
    and the recipe's batch shape and clipping. The only place these two sources meet.

    In bf16, gradients accumulate and are reduced over ranks in fp32 unless the JSON says otherwise
    (``data_types.grad_accum_dtype``, ``communication_data_type``). DeepSpeed's defaults are the model dtype for
    both: summing 8 micro-batches of LoRA gradients in bf16 was off by 4e-3 (relative), and ZeRO-1's
    ``BF16_Optimizer``, which the fp32 accumulation selects, still rounds the accumulated sum to bf16 when it
    all-reduces it (1.8e-3, even on one rank); in fp32 both are exact (``tests/grad_accum_probe.py``). LoRA
    gradients are small, so the doubled gradient traffic is too.
    """
    out = json.loads(json.dumps(ds))  # deep copy
    out["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    out["gradient_accumulation_steps"] = cfg.train.grad_accum
    out["train_batch_size"] = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
    out["gradient_clipping"] = cfg.optim.max_grad_norm
    out.setdefault("steps_per_print", 10 ** 9)  # our own metrics replace DeepSpeed's periodic prints
    blocks = {k: out.pop(k) for k in (*BF16_KEYS, "fp16") if k in out}
    if precision == "bf16":
        block = next((b for k in BF16_KEYS if isinstance(b := blocks.get(k), dict) and b.get("enabled")), {})
        out["bf16"] = {**block, "enabled": True}
        out.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        out.setdefault("communication_data_type", "fp32")
    elif precision == "fp16":
        out["fp16"] = blocks["fp16"]
    if offloads_optimizer(out):
        out.setdefault("zero_force_ds_cpu_optimizer", True)
    return out


# ----------------------------------------------------------------------------------------------------------
# Process group


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: Any  # torch.device
    on_gpu: bool


def select_accelerator() -> bool:
    """Choose CUDA when present, else DeepSpeed's CPU accelerator (gloo). Call before anything imports
    DeepSpeed (transformers does, lazily), so DeepSpeed never has to guess. Returns True on GPU."""
    import torch

    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return on_gpu


def init() -> DistInfo:
    """Pick the accelerator, start the process group and return this rank's coordinates."""
    import torch

    on_gpu = select_accelerator()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    import torch.distributed as dist

    if not on_gpu:
        release_shm_segment(dist.get_rank(), dist.get_world_size())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Host threads are shared among the node's ranks on GPU too: DeepSpeedCPUAdam (optimizer offload) and the
    # data collation run on them, and every rank taking every core oversubscribes the node.
    torch.set_num_threads(cpu_threads_per_rank())
    if on_gpu:
        device = torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, on_gpu)


SHM_SEGMENT_PREFIX = "deepspeed_allreduce_buffer"  # csrc/cpu/comm/shm.cpp's SHM_BUFFER_NAME


def shm_segment(rank: int) -> Path:
    """The POSIX shared-memory segment DeepSpeed's CPU backend makes for ``rank`` of a one-node job (its shm
    all-reduce workspace, 66 MiB): named by user, ``MASTER_ADDR``, ``MASTER_PORT`` and rank, as
    ``csrc/cpu/comm/shm.cpp`` (deepspeed 0.19) does."""
    return Path("/dev/shm") / (f"{SHM_SEGMENT_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def remove_shm_segments(port: int | str) -> list[Path]:
    """Remove the shm segments that a finished one-node DeepSpeed CPU job on ``port`` left (every rank's, as
    programs other than launch/train.py leave them: the benches' peers); returns those it removed. Only for a
    job that is over: a running job's ranks may still be mapping them."""
    left = sorted(Path("/dev/shm").glob(f"{SHM_SEGMENT_PREFIX}_{os.getuid()}_*_{port}_*"))
    for f in left:
        f.unlink(missing_ok=True)
    return left


def release_shm_segment(rank: int, world_size: int) -> None:
    """Unlink this rank's shm segment once every rank has mapped every other's, so the kernel frees it when the
    job's processes end, however they end. DeepSpeed creates one per rank at ``init_distributed`` and never
    unlinks it: each run left 66 MiB per rank in /dev/shm (RAM) for good, and a machine that runs many jobs
    (our test suite; sglang's CI, sgl-project/sglang#38638) runs out of memory. A mapped segment stays valid
    after its name is gone."""
    # DeepSpeed's own test for making the segments (all ranks on this node), the same on every rank: all of them
    # enter the barrier or none does.
    if os.environ.get("LOCAL_SIZE") != str(world_size):
        return
    import torch.distributed as dist

    dist.barrier()  # every rank is past DeepSpeed's shm_initialize, which maps all ranks' segments
    with contextlib.suppress(FileNotFoundError):
        shm_segment(rank).unlink()


def gpu_index(local_rank: int, visible: int) -> int:
    """This rank's GPU among those it sees. The deepspeed launcher shows every rank all the node's GPUs (rank
    ``LOCAL_RANK`` takes GPU ``LOCAL_RANK``); a scheduler that binds one GPU per task (SLURM ``--gpus-per-task=1``)
    shows each rank one, its ``cuda:0``."""
    from pipeline.errors import UserError

    if visible == 1:
        return 0
    if local_rank >= visible:
        listed = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise UserError(f"local rank {local_rank} sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES={listed}): start at "
                        f"most {visible} ranks per node, or give each rank one GPU")
    return local_rank


def cpu_threads_per_rank() -> int:
    """torch threads for one CPU rank: ``OMP_NUM_THREADS`` if set, else this machine's cores shared among its
    ranks (the launcher's ``LOCAL_SIZE``). torch's default gives every rank every core; two ranks on two cores then
    oversubscribe them, and steps took 2.8x as long under ZeRO-2 and swung 4x under ZeRO-3 (bench/README.md)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1"
    return max(1, cores // max(1, int(local)))


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


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def all_reduce_sum(t):
    """Sum a tensor over all ranks, in place, and return it. Gloo on CPU, NCCL on GPU."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def exchange(values):
    """Every rank's 1-D tensor ``values``, stacked in rank order (``[world, len]``), with one all-gather: sums and
    maxima of several small values then cost one collective."""
    import torch
    import torch.distributed as dist

    out = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(out, values)
    return torch.stack(out)


def on_rank0(fn, rank: int):
    """``fn()`` on rank 0 only, its result given to every rank. An exception there is raised on every rank
    (a :class:`UserError` as itself, anything else as a :class:`RunError`), so no rank waits for one that died."""
    from pipeline.errors import RunError, UserError

    result = error = None
    if rank == 0:
        try:
            result = fn()
        except UserError as e:
            error = e
        except Exception as e:  # noqa: BLE001
            error = RunError(f"{type(e).__name__}: {e}")
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def max_over_ranks(value: int | list[int]) -> int | list[int]:
    """The largest of every rank's ``value``, elementwise for a list (one small all-reduce)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(value if isinstance(value, list) else [value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(x) for x in t.tolist()] if isinstance(value, list) else int(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_error(error: str | None) -> str | None:
    """Agree on failure: ``None`` on every rank if no rank failed, else the first failing rank's message on all.
    Call at points every rank reaches, so one rank's failure cannot leave the others waiting in a collective."""
    errors = gather_objects(error)
    return next((f"rank {r}: {e}" if len(errors) > 1 else e for r, e in enumerate(errors) if e), None)


def _collective_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and \
        os.environ.get("DS_ACCELERATOR", "cuda") == "cuda" else torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------------------------------------
# Optimizer and engine


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
    per-group base lrs if DeepSpeed ever rearranged the groups (FACTS.md; DeepSpeedExamples PR 756).

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
