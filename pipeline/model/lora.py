"""LoRA injection through PEFT."""

from __future__ import annotations

import torch

from pipeline.config import LoraConfig
from pipeline.errors import UserError


def add_lora(model: torch.nn.Module, cfg: LoraConfig, seed: int) -> torch.nn.Module:
    """Wrap ``model`` in a PEFT ``PeftModel`` with LoRA adapters on ``cfg.target_modules``.

    The adapters are initialised right after ``torch.manual_seed(seed)``, so every rank (and every ZeRO stage)
    starts from identical A matrices; B starts at zero as in LoRA. ``lora.use_rslora`` and ``lora.use_dora`` are
    PEFT's own options; with DoRA, PEFT computes each magnitude from the base weight's row norms at injection,
    gathering a ZeRO-3 partitioned weight for it.

    Raises:
        UserError: a target module name matches nothing in the model.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM",
                              use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
    torch.manual_seed(seed)
    try:
        # autocast_adapter_dtype=False: adapters take the base model's dtype at every ZeRO stage. (PEFT would
        # upcast them to fp32, and DeepSpeed re-casts that to bf16 under ZeRO 0-2 but not for a ZeRO-3 model
        # loaded with zero.Init, so stages would train in different dtypes.) DeepSpeed's bf16 mode keeps
        # fp32 master weights for the optimizer either way.
        return get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))})
            raise UserError(f"lora.target_modules={list(cfg.target_modules)} matches no module of this model; "
                            f"its linear/embedding module names are: {', '.join(names)}") from None
        raise

