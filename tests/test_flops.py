"""The MFU numerator: model FLOPs per token against PyTorch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import LoraConfig
from pipeline.model.lora import add_lora
from pipeline.observe.flops import batch_flops, flop_model, peak_by_name, peak_tflops


def _model(layers: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, attn_implementation="eager")  # eager: counted bmm
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return add_lora(model, LoraConfig(r=8), 0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_per_token_match_the_flop_counter(checkpointing):
    model = _model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 1000, (2, 96))
    mask = torch.ones_like(ids)
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    counted = counter.get_total_flops()
    model_flops, hardware_flops = batch_flops(flop_model(model), mask, checkpointing)
    expected = hardware_flops if checkpointing else model_flops
    assert expected == pytest.approx(counted, rel=0.05), f"formula {expected:.4g} vs FlopCounterMode {counted:.4g}"
    assert hardware_flops > model_flops if checkpointing else hardware_flops == model_flops


def test_padding_tokens_are_not_counted():
    fm = flop_model(_model(layers=2))
    full = torch.ones(2, 64, dtype=torch.long)
    half = full.clone()
    half[:, 32:] = 0
    assert batch_flops(fm, half, False)[0] == pytest.approx(batch_flops(fm, full, False)[0] / 2)


def test_peak_is_given_or_known_or_none():
    assert peak_tflops(123.0, on_gpu=False) == 123.0
    assert peak_tflops(0.0, on_gpu=False) is None  # CPU: only when given


def test_peaks_by_gpu_name():
    # torch.cuda.get_device_name() strings; H100 PCIe and NVL are slower parts than the SXM H100
    assert peak_by_name("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_by_name("NVIDIA H100 PCIe") == 756.0
    assert peak_by_name("NVIDIA H100 NVL") == 835.0
    assert peak_by_name("NVIDIA H200") == 989.0 and peak_by_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_by_name("NVIDIA GeForce RTX 4090") is None
