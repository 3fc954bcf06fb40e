"""The LoRA family under LoRA+ through the real launcher at world size 2:

- ZeRO-3: rsLoRA, DoRA and PiSSA together, one rank's factors skewed before ``deepspeed.initialize``;
- ZeRO-2: DoRA and OLoRA, stopped by SIGTERM at step 3 and resumed.

Checked: lr_B / lr_A and DoRA's own magnitude lr at every step, every rank training from the same factors, the
stored factors being those of the whole weights, and the saved adapter (converted for the original base)
reproducing the trained model's validation loss in plain PEFT on the original base, after the resume too."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import ALL_PARTITIONED, ENGINE_SCORING, ds_config, held_out_loss, read_metrics, run_train

pytestmark = pytest.mark.launcher

STEPS, LR, RATIO, MAGNITUDE = 6, 2.5e-4, 16.0, 2.0  # rsLoRA scales the update by alpha/sqrt(r) = 8, not 2: lr/4
SEED = 7
ZERO3 = ("lora.use_dora=true", "lora.use_rslora=true", "lora.init_lora_weights=pissa")
ZERO2 = ("lora.use_dora=true", "lora.init_lora_weights=olora")


@pytest.fixture(scope="module")
def val_file(tmp_path_factory) -> Path:
    from pipeline.data.builtin import generate_dataset

    val = tmp_path_factory.mktemp("family-val") / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in generate_dataset(9, seed=9)))
    return val


def _args(out: Path, val: Path, stage: str, family: tuple[str, ...]) -> list[str]:
    return [f"output_dir={out}", f"train.max_steps={STEPS}", "train.micro_batch_size=2", f"optim.lr={LR}",
            f"seed={SEED}", "lora.dropout=0", *family, f"optim.dora_magnitude_ratio={MAGNITUDE}",
            f"data.val_path={val}", f"train.eval_every={STEPS}", "train.save_every=3",
            "--deepspeed_config", ds_config(stage), *ENGINE_SCORING]  # MMLU at steps 0, 3 and 6, by the ranks


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory, val_file) -> tuple[Path, Path, str]:
    """(output_dir, validation file, stdout) of a 6-step ZeRO-3 run with DoRA, rsLoRA and PiSSA, rank 1's factors
    perturbed before ``deepspeed.initialize`` (``LORAPLUS_FAULT=init-skew``)."""
    out = tmp_path_factory.mktemp("family") / "zero3"
    done = run_train(_args(out, val_file, "zero3", ZERO3), nprocs=2, env={"LORAPLUS_FAULT": "init-skew@0/1"})
    return out, val_file, done.stdout


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, val_file) -> tuple[Path, Path, str]:
    """(output_dir, validation file, stdout of both starts) of a ZeRO-2 run with DoRA and OLoRA, stopped by SIGTERM
    in step 3 and resumed to step 6."""
    out = tmp_path_factory.mktemp("family") / "zero2"
    stopped = run_train(_args(out, val_file, "zero2", ZERO2), nprocs=2, check=False,
                        env={"LORAPLUS_FAULT": "sigterm@3"})
    assert stopped.returncode != 0 and "stopped by SIGTERM after step 3" in stopped.stdout, stopped.stdout[-3000:]
    return out, val_file, stopped.stdout + run_train(_args(out, val_file, "zero2", ZERO2), nprocs=2).stdout


def _recipe(out: Path):
    from pipeline.config import make_config

    return make_config(out / "config.yaml")


@pytest.fixture(params=["zero3", "zero2-resumed"])
def family_run(request):
    return request.getfixturevalue({"zero3": "dora_run", "zero2-resumed": "resumed_run"}[request.param])


def test_magnitudes_keep_their_own_lr_at_every_step(family_run):
    """lr_B = lambda x lr_A and lr_magnitude = dora_magnitude_ratio x lr_A at every step, as the optimizer
    DeepSpeed wraps holds them (ZeRO-3; ZeRO-2 across a resume); the loss falls."""
    rows = read_metrics(family_run[0])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        lrs = r["lr_groups"]
        assert set(lrs) == {"lora_A", "lora_B", "magnitude"}, lrs
        assert lrs["lora_B"] == pytest.approx(RATIO * lrs["lora_A"], rel=1e-6)
        assert lrs["magnitude"] == pytest.approx(MAGNITUDE * lrs["lora_A"], rel=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_the_adapter_reproduces_the_trained_model_on_the_original_base(family_run, tiny_model_dir, tmp_path):
    """Plain PEFT loads the saved adapter onto the original base (DoRA, with rsLoRA scaling under ZeRO-3; converted
    from the PiSSA/OLoRA residual: rank 2r, PEFT's default init recorded), and its validation loss over the held-out
    file equals the one the two ranks computed at the last step: after the resume too, which rebuilt the residual
    from the stored factors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.config import DataConfig
    from pipeline.data.prepared import prepare
    from pipeline.model.load import load_tokenizer

    out, val_path, _ = family_run
    adapter = out / "checkpoints" / f"step-{STEPS}" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is (out.name == "zero3")
    assert saved["r"] == 2 * _recipe(out).lora.r and saved["init_lora_weights"] is True
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


def test_every_rank_trains_from_the_factors_of_the_whole_weights(dora_run, tiny_model_dir):
    """Under ZeRO-3 each weight was gathered whole for its SVD: the stored factors are those one process computes
    from the unpartitioned model; and with rank 1's factors perturbed after the init, both ranks still train from
    rank 0's (the digest check after ``deepspeed.initialize`` would stop the run otherwise)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.model.lora import add_lora

    out, _, stdout = dora_run
    assert "LORAPLUS_FAULT: init-skew on rank 1" in stdout
    assert ALL_PARTITIONED.search(stdout), stdout[-3000:]  # the magnitudes and factors too: nothing kept whole
    assert re.search(r"lora.init_lora_weights=pissa: \d+ adapters factorised, the same on all 2 rank", stdout), \
        stdout[-3000:]
    stored = load_file(str(out / "lora_init" / "adapter_model.safetensors"))
    factors: dict = {}
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    add_lora(base, _recipe(out).lora, SEED, factors_out=factors)
    assert stored.keys() == factors.keys()
    for k in factors:  # to the SVD's float error (the thread count differs); a shard's SVD would not come close
        torch.testing.assert_close(stored[k], factors[k], rtol=1e-4, atol=2e-5)


def test_the_resume_reapplied_the_stored_factors(resumed_run):
    _, _, stdout = resumed_run
    assert re.search(r"lora.init_lora_weights=olora: \d+ adapters factorised, the same on all 2 rank", stdout)
    assert re.search(r"lora.init_lora_weights=olora: \d+ adapters read from \S+lora_init, the same on all 2 rank",
                     stdout), stdout[-3000:]


@pytest.fixture(scope="module")
def cli_scores(dora_run, resumed_run, tiny_model_dir, tmp_path_factory) -> dict:
    """lm-eval's CLI on the original base model, and on it with each run's last saved (converted) adapter, two at a
    time: name -> (the engine's result directory, the CLI's score)."""
    from tests import lm_eval_cli

    cases = {"pissa-base": dora_run[0] / "base", "zero3": dora_run[0] / "checkpoints" / f"step-{STEPS}",
             "zero2-resumed": resumed_run[0] / "checkpoints" / f"step-{STEPS}"}
    jobs = {name: lm_eval_cli.Job(tiny_model_dir, None if name == "pissa-base" else result_dir / "adapter", 0, 2)
            for name, result_dir in cases.items()}
    scores = lm_eval_cli.score_all(jobs, tmp_path_factory.mktemp("family-cli"))
    return {name: (cases[name], scores[name]) for name in cases}


@pytest.mark.parametrize("name", ["pissa-base", "zero3", "zero2-resumed"])
def test_engine_scores_the_family_as_lm_evals_cli(cli_scores, name):
    """The training ranks' MMLU scores of DoRA + rsLoRA + PiSSA (ZeRO-3) and DoRA + OLoRA (ZeRO-2, across the
    resume) equal lm-eval's CLI on the saved adapter on the original base, request by request (1e-4); and step 0 of
    the PiSSA run, scored with the adapters as initialised (the residual plus the principal part), is the original
    base model's score."""
    from tests import lm_eval_cli

    result_dir, cli = cli_scores[name]
    summary = json.loads((result_dir / "mmlu.json").read_text())
    diff = lm_eval_cli.largest_difference(lm_eval_cli.engine_requests(result_dir), cli)
    print(f"{name}: largest log-likelihood difference {diff:.2g} over {len(cli.requests)} questions")
    assert diff < 1e-4
    assert summary["acc"] == pytest.approx(cli.acc, abs=1e-12)
    assert summary["model"]["adapters"] == ("as initialised" if name == "pissa-base" else "trained")


def test_the_resumed_start_scored_the_checkpoint_the_stop_left_unscored(resumed_run):
    """SIGTERM in step 3: step-3 was saved as the run stopped, unscored; the resumed start scored it first."""
    out, _, stdout = resumed_run
    assert stdout.index("resumed from step-3") < stdout.index("MMLU, step-3: acc") < stdout.index("step      4/")
    assert [json.loads(x)["step"] for x in (out / "mmlu.jsonl").read_text().splitlines()] == [0, 3, STEPS]
