"""The DeepSpeed JSON: reading and validating it, the ZeRO stage and offload it asks for, the precision a run trains in,
and the config handed to ``deepspeed.initialize`` with batch sizes and clipping filled from the recipe (one source of
truth). Imports nothing heavy, so bad input is reported before torch or DeepSpeed load."""

from __future__ import annotations

import json
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
