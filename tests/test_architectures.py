"""Other Llama-family layouts (Mistral, Qwen2: same projection names) train through the same entry point."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import read_metrics, run_train


def _tiny_dir(tmp_path, tiny_model_dir, model_type: str, tied: bool = False):
    import torch
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0, tie_word_embeddings=tied)
    cls, cfg = {"mistral": (MistralForCausalLM, MistralConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[model_type]
    torch.manual_seed(0)
    out = tmp_path / model_type
    cls(cfg(**shape)).save_pretrained(out, safe_serialization=True)
    for f in tiny_model_dir.iterdir():  # the tiny tokenizer fits any 512-token vocabulary
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_llama_family_layout_trains(tmp_path, tiny_model_dir, model_type):
    """Qwen2 ties its LM head to the input embedding (as its small releases do) and trains under ZeRO-3 on 2 ranks:
    the chunked loss gathers the shared, partitioned weight, and gives the full-logits loss's losses."""
    tied = model_type == "qwen2"
    model_dir = _tiny_dir(tmp_path, tiny_model_dir, model_type, tied=tied)
    args = [f"model.name_or_path={model_dir}", "train.max_steps=3", "--deepspeed_config",
            f"deepspeed_configs/{'zero3' if tied else 'zero0'}.json"]
    out = tmp_path / "run"
    proc = run_train([f"output_dir={out}", *args], nprocs=2 if tied else 0)
    rows = read_metrics(out)
    assert len(rows) == 3 and all(r["lr_groups"]["lora_B"] == 16 * r["lr_groups"]["lora_A"] for r in rows)
    assert "lora_B              14 tensors" in proc.stdout  # 7 projections x 2 layers, like Llama
    assert (out / "checkpoints" / "step-3" / "adapter" / "adapter_model.safetensors").is_file()
    if tied:
        run_train([f"output_dir={tmp_path / 'full'}", *args, "train.loss_chunk=0"], nprocs=2)
        full = read_metrics(tmp_path / "full")
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in full], abs=1e-5)
        assert all(r["grad_norm"] == pytest.approx(f["grad_norm"], rel=1e-4) for r, f in zip(rows, full))
