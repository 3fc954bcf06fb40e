"""The LoRA family under LoRA+ and ZeRO-3, through the real launcher at world size 2: rsLoRA and DoRA together,
DoRA's magnitude vectors in a group of their own at every step, and the saved adapter reproducing the trained
model in plain PEFT. One run serves the module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import held_out_loss, read_metrics, run_train

pytestmark = pytest.mark.launcher

STEPS, LR, RATIO, MAGNITUDE = 6, 2.5e-4, 16.0, 2.0  # rsLoRA scales the update by alpha/sqrt(r) = 8, not 2: lr/4


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory) -> tuple[Path, Path]:
    """(output_dir, validation file) of a 6-step ZeRO-3 run with ``lora.use_dora`` and ``lora.use_rslora``."""
    from pipeline.data.builtin import generate_dataset

    root = tmp_path_factory.mktemp("family")
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in generate_dataset(9, seed=9)))
    out = root / "run"
    run_train([f"output_dir={out}", f"train.max_steps={STEPS}", "train.micro_batch_size=2", f"optim.lr={LR}",
               "seed=7", "lora.dropout=0", "lora.use_dora=true", "lora.use_rslora=true",
               f"optim.dora_magnitude_ratio={MAGNITUDE}", f"data.val_path={val}", f"train.eval_every={STEPS}",
               "--deepspeed_config", "deepspeed_configs/zero3.json"], nprocs=2)
    return out, val


def test_magnitudes_keep_their_own_lr_at_every_step(dora_run):
    """lr_B = lambda x lr_A and lr_magnitude = dora_magnitude_ratio x lr_A at every step, as the optimizer
    DeepSpeed wraps holds them; the loss falls."""
    rows = read_metrics(dora_run[0])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        lrs = r["lr_groups"]
        assert set(lrs) == {"lora_A", "lora_B", "magnitude"}, lrs
        assert lrs["lora_B"] == pytest.approx(RATIO * lrs["lora_A"], rel=1e-6)
        assert lrs["magnitude"] == pytest.approx(MAGNITUDE * lrs["lora_A"], rel=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_the_adapter_is_a_dora_rslora_adapter_that_reproduces_the_trained_model(dora_run, tiny_model_dir, tmp_path):
    """Plain PEFT loads the saved adapter onto the original base as DoRA with rsLoRA scaling, and its validation
    loss over the held-out file equals the one the two ZeRO-3 ranks computed at the last step."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.config import DataConfig
    from pipeline.data.prepared import prepare
    from pipeline.model.load import load_tokenizer

    out, val_path = dora_run
    adapter = out / "checkpoints" / f"step-{STEPS}" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    magnitudes = [n for n, _ in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes, "no DoRA magnitude was loaded"

    tok = load_tokenizer(str(tiny_model_dir))
    rows = prepare(DataConfig(path=str(val_path), cache_dir=str(tmp_path / "c")), tok, str(tiny_model_dir), 256).train
    loss, tokens = held_out_loss(model, rows)
    val = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    assert val[-1]["step"] == STEPS and val[-1]["val_tokens"] == tokens
    assert val[-1]["val_loss"] == pytest.approx(loss, abs=1e-4)
