"""Llama-family layouts (Llama, Mistral, Qwen2: same projection names), saved on disk with several layers, load
under ZeRO-3 at world size 2 in a fresh process through the launcher, and train: the way a user's pretrained
checkpoint is met (pipeline/model/load.py, ``_import_model_class``: transformers' lazy imports inside ``zero.Init`` once
lost the ``kernels`` decorator's ``__init__``, and every ZeRO-3 run of a tied checkpoint died at the first forward)."""

from __future__ import annotations

import shutil

import pytest

from safetensors.torch import load_file

from tests.conftest import ALL_PARTITIONED, ds_config, read_metrics, run_train

LAYERS = 3
STEPS = 4
MIN_FALL = 0.1  # the loss over STEPS steps must fall by more than this


def _tiny_dir(tmp_path, tiny_model_dir, model_type: str, tied: bool = False, prefixless: bool = False):
    """A ``model_type`` checkpoint of ``LAYERS`` layers with the tiny tokenizer. ``prefixless``: tensor names without
    the ``model.`` prefix (as some exports write them), which transformers' own loader reads and the shard streamer
    does not: the run goes through the second, transformers-built model."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    # The tiny tokenizer's 512 tokens, with room: loaded for a Qwen2 config it is a Qwen2Tokenizer, one token more
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"] + 64
    shape = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "mistral": (MistralForCausalLM, MistralConfig),
                "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[model_type]
    torch.manual_seed(0)
    out = tmp_path / model_type
    cls(cfg(**shape)).save_pretrained(out, safe_serialization=True)
    if prefixless:
        weights = load_file(out / "model.safetensors")
        save_file({k.removeprefix("model."): v for k, v in weights.items()}, out / "model.safetensors",
                  metadata={"format": "pt"})
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("model_type,tied,prefixless", [("llama", True, False), ("mistral", False, True),
                                                        ("qwen2", True, False)])
def test_llama_family_checkpoint_trains_under_zero3(tmp_path, tiny_model_dir, model_type, tied, prefixless):
    """Llama tied as SmolLM2 is, Mistral with prefix-less names (the transformers-loader route), Qwen2 tied as its
    small releases are: each trains ``STEPS`` steps under ZeRO-3 on 2 ranks, every parameter partitioned, with
    lr_B = 16 lr_A, its loss falling and every lora_B moved from zero. Qwen2 also gives the full-logits loss's
    losses through the chunked loss, which gathers the shared, partitioned weight."""
    model_dir = _tiny_dir(tmp_path, tiny_model_dir, model_type, tied=tied, prefixless=prefixless)
    args = [f"model.name_or_path={model_dir}", f"train.max_steps={STEPS}", "--deepspeed_config", ds_config("zero3")]
    out = tmp_path / "run"
    proc = run_train([f"output_dir={out}", *args], nprocs=2)
    assert ALL_PARTITIONED.search(proc.stdout), proc.stdout[-3000:]
    rows = read_metrics(out)
    assert len(rows) == STEPS and all(r["lr_groups"]["lora_B"] == 16 * r["lr_groups"]["lora_A"] for r in rows)
    # Trains: these random-weight models on the bundled data at the default lr fall by 0.27-0.38 from the first
    # step's loss to the fourth's (measured on the three layouts); a frozen adapter would not move it.
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"{model_type}: loss {first:.4f} -> {last:.4f} over {STEPS} steps")
    assert last < first - MIN_FALL, [r["loss"] for r in rows]
    assert f"lora_B              {7 * LAYERS} tensors" in proc.stdout  # 7 projections a layer, like Llama
    adapter = load_file(out / "checkpoints" / f"step-{STEPS}" / "adapter" / "adapter_model.safetensors")
    trained = [k for k, v in adapter.items() if "lora_B" in k and float(v.abs().max()) > 0]
    assert len(trained) == 7 * LAYERS, f"{len(trained)} lora_B tensors changed from their zero init"
    if model_type == "qwen2":
        run_train([f"output_dir={tmp_path / 'full'}", *args, "train.loss_chunk=0"], nprocs=2)
        full = read_metrics(tmp_path / "full")
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in full], abs=1e-5)
        assert all(r["grad_norm"] == pytest.approx(f["grad_norm"], rel=1e-4) for r, f in zip(rows, full))
