"""LoRA injection through PEFT, and the PiSSA/OLoRA initial factors: kept, re-applied on a resume, and used to
convert every saved adapter to one that applies to the original base model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pipeline.config import LoraConfig
from pipeline.errors import UserError

ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


def mutates_base(cfg: LoraConfig) -> bool:
    """Whether ``lora.init_lora_weights`` moves part of each adapted weight into the adapter (PiSSA, OLoRA): the
    base then trains as a residual, and a saved adapter must be converted to apply to the original weights."""
    return cfg.init_lora_weights.startswith("pissa") or cfg.init_lora_weights == "olora"


def _peft_init(cfg: LoraConfig):
    return {"default": True}.get(cfg.init_lora_weights, cfg.init_lora_weights)


def add_lora(model: torch.nn.Module, cfg: LoraConfig, seed: int, stored_init: Path | None = None,
             factors_out: dict | None = None) -> torch.nn.Module:
    """Wrap ``model`` in a PEFT ``PeftModel`` with LoRA adapters on ``cfg.target_modules``.

    The adapters are initialised right after ``torch.manual_seed(seed)``, so every rank (and every ZeRO stage)
    starts from identical A matrices; B starts at zero as in LoRA. ``lora.use_rslora`` and ``lora.use_dora`` are
    PEFT's own options; with DoRA, PEFT computes each magnitude from the base weight's row norms at injection,
    gathering a ZeRO-3 partitioned weight for it.

    ``lora.init_lora_weights`` ``pissa``/``olora``: see :func:`_factorise`. ``stored_init`` (a resume): the factors
    come from that directory (:func:`save_init`) instead of a new factorisation. ``factors_out`` (a fresh start)
    receives the new factors, in fp32, for :func:`save_init`.

    Raises:
        UserError: a target module name matches nothing in the model.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM",
                              use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                              init_lora_weights=True if mutates_base(cfg) else _peft_init(cfg))
    torch.manual_seed(seed)
    try:
        # autocast_adapter_dtype=False: adapters take the base model's dtype at every ZeRO stage. (PEFT would
        # upcast them to fp32, and DeepSpeed re-casts that to bf16 under ZeRO 0-2 but not for a ZeRO-3 model
        # loaded with zero.Init, so stages would train in different dtypes.) DeepSpeed's bf16 mode keeps
        # fp32 master weights for the optimizer either way.
        peft_model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))})
            raise UserError(f"lora.target_modules={list(cfg.target_modules)} matches no module of this model; "
                            f"its linear/embedding module names are: {', '.join(names)}") from None
        raise
    if mutates_base(cfg):
        factors = _factorise(peft_model, cfg.init_lora_weights, _read_init(stored_init) if stored_init else None)
        if factors_out is not None and stored_init is None:
            factors_out.update(factors)
    return peft_model


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            yield name, module


def _factorise(peft_model, init: str, stored: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """PiSSA/OLoRA, one adapted module at a time, by PEFT's own ``pissa_init``/``olora_init`` (the code PEFT runs
    for ``init_lora_weights``); or, with ``stored``, the same operations with the stored factors, so a resume
    rebuilds the residual ``W - scaling * B0 @ A0`` bit for bit without an SVD of every weight.

    Under ZeRO-3 each weight is gathered for its own factorisation (``gather_params_ctx``, modifier rank 0: rank 0's
    residual is partitioned back into every rank's shard when the gather ends). PEFT computes the factors and the
    residual in fp32; they are read here before being cast to the model's dtype (PEFT's ``update_layer`` casts them
    right away, and with it the only exact copy), then cast, and DoRA's magnitudes are computed afterwards from the
    residual and the cast factors, as PEFT orders it. Returns the fp32 factors, keyed as PEFT saves them.
    """
    from peft.utils.integrations import gather_params_ctx

    out = {}
    for name, layer in _lora_layers(peft_model):
        base, a, b = layer.get_base_layer(), layer.lora_A["default"], layer.lora_B["default"]
        dtype = a.weight.dtype
        with gather_params_ctx(base.weight):
            if stored is not None:
                a0, b0 = stored[f"{name}.lora_A.weight"], stored[f"{name}.lora_B.weight"]
                weight = base.weight.data.to(torch.float32) - layer.scaling["default"] * b0 @ a0
                base.weight.data = weight.to(base.weight.dtype)
                a.weight.data, b.weight.data = a0.clone(), b0.clone()
            elif init.startswith("pissa"):
                layer.pissa_init("default", init)
            else:
                layer.olora_init("default")
        out[f"{name}.lora_A.weight"] = a.weight.detach().float().cpu().clone()
        out[f"{name}.lora_B.weight"] = b.weight.detach().float().cpu().clone()
        a.weight.data, b.weight.data = a.weight.data.to(dtype), b.weight.data.to(dtype)
        if "default" in getattr(layer, "lora_variant", {}):  # DoRA: the magnitudes of the new direction
            layer.lora_variant["default"].init(layer, adapter_name="default")
    return out


def save_init(peft_model, factors: dict[str, torch.Tensor], directory: Path) -> None:
    """Write ``factors`` as a PEFT adapter directory: PEFT's ``path_initial_model_for_weight_conversion`` reads the
    same layout, so a user can also convert a saved adapter with PEFT's own ``save_pretrained``. Atomic."""
    import shutil

    from safetensors.torch import save_file

    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    peft_model.peft_config["default"].save_pretrained(str(tmp))
    save_file(factors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def check_init(directory: Path) -> None:
    """Raises:
        UserError: ``directory`` holds no initial factors (:func:`save_init`)."""
    path = directory / ADAPTER_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: a run with lora.init_lora_weights=pissa/olora keeps its initial factors "
                        f"there, and cannot be resumed or saved without them; pass --overwrite to start again")


def _read_init(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    check_init(directory)
    return load_file(str(directory / ADAPTER_FILE))


def convert_for_original_base(adapter_dir: Path, init_dir: Path) -> None:
    """Rewrite the adapter in ``adapter_dir``, trained on the residual of a PiSSA/OLoRA init, into one that applies
    to the original base weights: ``delta W = B A - B0 A0 = [B | -B0] [A ; A0]``, rank 2r, the same scaling (alpha
    doubled, or times sqrt 2 with rsLoRA). This is PEFT's ``LoraModel.subtract_mutated_init`` and the config change
    in ``PeftModel.save_pretrained(path_initial_model_for_weight_conversion=...)``, done on the files: PEFT's own
    loads the initial adapter into the live model, which under ZeRO-3 would be a new unpartitioned module.

    The factors are written in fp32: early in training ``B A - B0 A0`` is small against either product, and in bf16
    the difference would be lost to the rounding of the two. DoRA's magnitudes are kept as they are (the converted
    direction ``W + s (B A - B0 A0)`` equals the residual's ``W_res + s B A``, so the magnitudes apply unchanged;
    PEFT's conversion drops them).
    """
    from safetensors.torch import load_file, save_file

    init = _read_init(init_dir)
    path = adapter_dir / ADAPTER_FILE
    trained = load_file(str(path))
    out = {}
    for key, t in trained.items():
        if ".lora_A." in key:
            out[key] = torch.cat([t.float(), init[key]], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([t.float(), -init[key]], dim=1)
        else:
            out[key] = t
    save_file(out, str(path), metadata={"format": "pt"})
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    config["init_lora_weights"] = True
    config["r"] *= 2
    config["lora_alpha"] *= math.sqrt(2) if config.get("use_rslora") else 2
    for key in ("rank_pattern", "alpha_pattern"):
        config[key] = {k: 2 * v for k, v in (config.get(key) or {}).items()}
    (adapter_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
