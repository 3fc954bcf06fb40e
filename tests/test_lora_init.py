"""``lora.init_lora_weights`` (PiSSA, OLoRA) in one process: the stored factors rebuild PEFT's init bit for bit,
and the converted adapter is PEFT's own conversion and reproduces the trained model on the original base. The
distributed side (ZeRO-3 gathers, every rank the same factors, a resume) is in tests/test_lora_family.py."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError, LoraConfig
from pipeline.model.lora import add_lora, convert_for_original_base, save_init


def _base(tiny_model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)


def _train_a_little(model, seed: int = 1) -> None:
    """Move every trainable tensor, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bad", ["svd", "pissa_niter_", "pissa_niter_0", "PISSA", "true"])
def test_an_unknown_init_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match=r"lora.init_lora_weights.*pissa_niter_<N>"):
        LoraConfig(init_lora_weights=bad)


@pytest.mark.parametrize(("init", "dtype", "use_dora"), [("pissa", torch.float32, False),
                                                         ("olora", torch.bfloat16, True),
                                                         ("pissa_niter_2", torch.bfloat16, False)])
def test_the_init_is_pefts_and_a_resume_rebuilds_it_bit_for_bit(tiny_model_dir, tmp_path, init, dtype, use_dora):
    """Every tensor of the model (the residual base weights, the factors, DoRA's magnitudes) equals what PEFT's own
    ``init_lora_weights`` gives (but for the randomised SVD, whose draw differs); and a resume, which re-applies the
    stored fp32 factors instead of factorising again, gives every tensor again, in bf16 too."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    cfg = LoraConfig(r=4, alpha=8.0, init_lora_weights=init, use_dora=use_dora)
    factors: dict = {}
    fresh = add_lora(_base(tiny_model_dir, dtype), cfg, seed=0, factors_out=factors)
    assert factors and all(t.dtype == torch.float32 for t in factors.values())
    assert all(p.dtype == dtype for n, p in fresh.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    a = fresh.state_dict()

    def same(b: dict) -> None:
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, different[:5]

    if not init.startswith("pissa_niter"):
        torch.manual_seed(0)
        same(get_peft_model(_base(tiny_model_dir, dtype), PeftLoraConfig(
            r=4, lora_alpha=8.0, target_modules=list(cfg.target_modules), init_lora_weights=init, use_dora=use_dora,
            task_type="CAUSAL_LM"), autocast_adapter_dtype=False).state_dict())
    save_init(fresh, factors, tmp_path / "lora_init")
    same(add_lora(_base(tiny_model_dir, dtype), cfg, seed=5, stored_init=tmp_path / "lora_init").state_dict())
    # and the init is not a no-op: the principal part left the base weight
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[f"base_model.model.{q}".replace(".weight", ".base_layer.weight")],
                           _base(tiny_model_dir, dtype).state_dict()[q])


@pytest.mark.parametrize(("init", "use_rslora"), [("pissa", False), ("olora", True)])
def test_the_converted_adapter_is_pefts_conversion(tiny_model_dir, tmp_path, init, use_rslora):
    """Ours (on the files) equals PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``: the same
    rank-2r tensors and the same r and alpha; and on the original base it gives the trained model's logits."""
    from peft import PeftModel

    cfg = LoraConfig(r=4, alpha=8.0, init_lora_weights=init, use_rslora=use_rslora)
    factors: dict = {}
    model = add_lora(_base(tiny_model_dir), cfg, seed=0, factors_out=factors)
    model.save_pretrained(tmp_path / "peft_init")  # PEFT's documented first step, before training
    save_init(model, factors, tmp_path / "lora_init")
    _train_a_little(model)
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    model.save_pretrained(tmp_path / "ours")
    convert_for_original_base(tmp_path / "ours", tmp_path / "lora_init")

    from safetensors.torch import load_file

    theirs, ours = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert theirs.keys() == ours.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k].float(), rtol=0, atol=0, msg=k)
    c_theirs, c_ours = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours"))
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert c_ours[key] == pytest.approx(c_theirs[key]), key
    assert c_ours["r"] == 8

    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    on_original = PeftModel.from_pretrained(_base(tiny_model_dir), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(on_original, ids), _logits(model.eval(), ids), rtol=1e-4, atol=1e-5)


def test_dora_with_pissa_converts_with_its_magnitudes(tiny_model_dir, tmp_path):
    """DoRA on a PiSSA residual: the converted adapter keeps the trained magnitudes (PEFT's conversion drops them)
    and reproduces the trained model on the original base."""
    from peft import PeftModel

    cfg = LoraConfig(r=4, alpha=8.0, init_lora_weights="pissa", use_dora=True)
    factors: dict = {}
    model = add_lora(_base(tiny_model_dir), cfg, seed=0, factors_out=factors)
    save_init(model, factors, tmp_path / "lora_init")
    _train_a_little(model)
    model.save_pretrained(tmp_path / "ours")
    convert_for_original_base(tmp_path / "ours", tmp_path / "lora_init")
    on_original = PeftModel.from_pretrained(_base(tiny_model_dir), tmp_path / "ours").eval()
    assert any("lora_magnitude_vector" in n for n, _ in on_original.named_parameters())
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(on_original, ids), _logits(model.eval(), ids), rtol=1e-4, atol=1e-5)


def test_a_resume_without_the_stored_factors_is_refused_by_path(tmp_path):
    from pipeline.errors import UserError
    from pipeline.model.lora import check_init

    with pytest.raises(UserError, match=r"lora_init/adapter_model.safetensors is missing.*--overwrite"):
        check_init(tmp_path / "lora_init")
