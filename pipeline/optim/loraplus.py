"""LoRA+ parameter groups (Hayou, Ghosh, Yu, arXiv 2402.12354), chosen by parameter name only.

A pure function: it never imports DeepSpeed and never looks at a tensor's shape or ``ndim``. Under ZeRO-3 a
partitioned parameter is an empty 1-D tensor (its real shape is ``param.ds_shape``), so the ``ndim == 1`` test
used by PEFT's ``create_loraplus_optimizer`` and the paper's ``lora_plus.py`` would put every partitioned
weight into the B group. Names survive partitioning; shapes do not.

Groups (each carries a ``name`` key so that its lr can be read back from whatever optimizer wraps it):

==================  ==============================  ============  =========================================
group               parameters                      lr            weight decay
==================  ==============================  ============  =========================================
``lora_A``          ``*.lora_A.*.weight``           lr            weight_decay
``lora_B``          ``*.lora_B.*.weight``           lr * ratio    weight_decay
``lora_B_no_decay`` ``*.lora_B.*.bias``             lr * ratio    0
``magnitude``       ``*.lora_magnitude_vector.*``   lr * m_ratio  0
``lora_embedding``  ``*.lora_embedding_A/B.*``      lr_embedding  weight_decay
``other``           any other trainable matrix      lr            weight_decay
``no_decay``        other biases and norm weights   lr            0
==================  ==============================  ============  =========================================

``magnitude`` holds DoRA's magnitude vectors (``lora.use_dora``; Liu et al., arXiv 2402.09353), one per adapted
layer: 1-D, so PEFT's ``create_loraplus_optimizer`` (and LLaMA-Factory's and ms-swift's copies) put them into B's
group at lr * ratio, with B's weight decay. Here they get a group and an lr of their own
(``optim.dora_magnitude_ratio`` times lr_A) and no weight decay: they are the scale of each output row of the
adapted weight, and decaying them would shrink the weight itself.

Every trainable parameter lands in exactly one group (asserted), and no empty group is ever created (DeepSpeed
drops empty groups in place, which desynchronises a scheduler built earlier).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pipeline.config import ConfigError

GROUP_ORDER = ("lora_A", "lora_B", "lora_B_no_decay", "magnitude", "lora_embedding", "other", "no_decay")


@dataclass(frozen=True)
class LoraPlusRates:
    """The numbers that define LoRA+ groups."""

    lr: float
    """lr of the A matrices (and of other trainable parameters)."""
    ratio: float
    """lambda = lr_B / lr_A."""
    lr_embedding: float
    """lr of embedding adapters."""
    weight_decay: float
    magnitude_ratio: float = 1.0
    """lr of DoRA's magnitude vectors / lr."""


def _is_no_decay(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or "norm" in name.lower()


def classify(name: str) -> str:
    """The LoRA+ group of a trainable parameter, from its name alone.

    Args:
        name: a ``named_parameters()`` name, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight``.
    Returns:
        One of :data:`GROUP_ORDER`.
    """
    parts = name.split(".")
    if "lora_magnitude_vector" in parts:
        return "magnitude"
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        return "lora_embedding"
    if "lora_A" in parts:
        return "lora_A"  # PEFT gives lora_A no bias; were there one, A's lr is still the right one
    if "lora_B" in parts:
        return "lora_B_no_decay" if parts[-1] == "bias" else "lora_B"
    return "no_decay" if _is_no_decay(name) else "other"


def _group_lr(group: str, rates: LoraPlusRates) -> float:
    if group in ("lora_B", "lora_B_no_decay"):
        return rates.lr * rates.ratio
    if group == "magnitude":
        return rates.lr * rates.magnitude_ratio
    if group == "lora_embedding":
        return rates.lr_embedding
    return rates.lr


def numel(param: torch.Tensor) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter (which is empty locally)."""
    return int(getattr(param, "ds_numel", param.numel()))


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], rates: LoraPlusRates) -> list[dict]:
    """Build LoRA+ optimizer param groups from ``model.named_parameters()``.

    Frozen parameters (``requires_grad=False``) are skipped. Groups come in :data:`GROUP_ORDER`, empty ones
    omitted. Each group dict has ``params``, ``lr``, ``weight_decay``, ``name`` and ``param_names``.

    Raises:
        ValueError: no trainable parameter at all, or a parameter object appears twice.
    """
    buckets: dict[str, list[tuple[str, torch.nn.Parameter]]] = {g: [] for g in GROUP_ORDER}
    trainable = 0
    for name, param in named_params:
        if not param.requires_grad:
            continue
        trainable += 1
        buckets[classify(name)].append((name, param))
    if trainable == 0:
        raise ValueError("the model has no trainable parameters: did LoRA injection fail?")

    groups = []
    for g in GROUP_ORDER:
        members = buckets[g]
        if not members:
            continue
        groups.append({
            "name": g,
            "params": [p for _, p in members],
            "param_names": [n for n, _ in members],
            "lr": _group_lr(g, rates),
            "weight_decay": 0.0 if g in ("lora_B_no_decay", "magnitude", "no_decay") else rates.weight_decay,
        })

    # Full coverage, each parameter exactly once (by identity: tied weights would show up here).
    seen = [id(p) for grp in groups for p in grp["params"]]
    assert len(seen) == trainable, "a trainable parameter was dropped from the LoRA+ groups"
    if len(set(seen)) != len(seen):
        raise ValueError("a trainable parameter appears twice (tied weights?); LoRA+ needs one group each")
    assert all(grp["params"] for grp in groups), "empty LoRA+ group"
    return groups


def describe(groups: list[dict]) -> list[str]:
    """One human-readable line per group: name, tensors, elements, lr, weight decay."""
    lines = []
    for g in groups:
        n = sum(numel(p) for p in g["params"])
        lines.append(f"{g['name']:<16} {len(g['params']):>5} tensors {n:>13,} params  lr {g['lr']:.3e}  "
                     f"wd {g['weight_decay']:g}")
    return lines


def pick_optimizer(requested: str, offload_optimizer: bool, on_gpu: bool) -> str:
    """Resolve ``optim.optimizer``: ``auto`` -> ``cpu_adam`` with offload, ``adamw_fused`` on GPU, else ``adamw``.

    Raises:
        ConfigError: a combination that cannot work (an explicit GPU-only optimizer on CPU, or a torch
            optimizer with offloaded optimizer state, which would step on the CPU copy at torch speed).
    """
    if requested == "auto":
        return "cpu_adam" if offload_optimizer else ("adamw_fused" if on_gpu else "adamw")
    if requested == "adamw_fused" and not on_gpu:
        raise ConfigError("optim.optimizer=adamw_fused needs a CUDA GPU; use adamw (or auto) on CPU")
    if requested == "cpu_adam" and on_gpu and not offload_optimizer:
        raise ConfigError("optim.optimizer=cpu_adam steps optimizer state on the CPU, but the DeepSpeed JSON keeps "
                          "it on the GPU; use a JSON with offload_optimizer (zero3_offload.json) or optim.optimizer=auto")
    if requested in ("adamw", "adamw_fused") and offload_optimizer:
        raise ConfigError(f"optim.optimizer={requested} cannot step optimizer state offloaded to CPU; use "
                         f"cpu_adam (or auto) with offload_optimizer, or a DeepSpeed JSON without offload")
    return requested
