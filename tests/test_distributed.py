"""Real multi-process runs through the ``deepspeed`` launcher on CPU (gloo): the code path a cluster runs.

Each configuration runs once per session (``_run``) and several tests read its outputs.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from pipeline.optim.schedule import multiplier
from tests.conftest import (
    ALL_PARTITIONED,
    ENGINE_SCORING,
    ds_config,
    held_out_loss,
    read_metrics,
    run_train,
    trained_after,
    write_once,
)

pytestmark = pytest.mark.launcher



def instruction_file() -> Path:
    """The bundled instruction tasks alone (the bundled file also holds multiple-choice items, whose 2 loss tokens
    make a 6-step loss curve hinge on which kind each batch draws): one file per content, under the temp dir."""
    from pipeline.data.builtin import generate_dataset

    return write_once("loraplus-tests-instructions", ".jsonl",
                      "".join(json.dumps(r) + "\n" for r in generate_dataset()))


# The shipped default's 1e-3 suits 150 steps from the tiny base; over these 6 steps (warmup 2, lr_B 16x) it
# overshoots the well-pretrained base (step 3 loss 4.05 from 2.16, val 2.25 -> 2.37), so the checks of learning
# would hinge on noise. 2e-4 learns steadily (val 2.25 -> 1.81 on the zero0 ws1 ga2 run).
LR = 2e-4
STEPS = 6
WARMUP = 2
# Same global batch of 4 samples everywhere: 2 ranks x 2, or 1 rank x 2 x grad_accum 2.
COMMON = [f"optim.lr={LR}", f"train.max_steps={STEPS}", f"schedule.warmup_steps={WARMUP}", "seed=7",
          "train.micro_batch_size=2", f"data.path={instruction_file()}"]

_RUNS: dict[str, tuple[Path, str]] = {}

# The stage runs are scored on MMLU by the training ranks (ENGINE_SCORING), each checkpoint's score compared with
# lm-eval's CLI below; the equivalence of the stages holds with it (scoring disturbs no training:
# tests/test_engine_scoring.py).
ENGINE_SCORED = ("zero0", "zero1", "zero2", "zero3", "zero0_ws1_ga2", "zero3-constant", "zero3_offload-constant")


def _run(tmp_root: Path, key: str, args: list[str], nprocs: int) -> tuple[Path, str]:
    """Run once per session; return (output_dir, stdout)."""
    if key not in _RUNS:
        out = tmp_root / key
        proc = run_train([f"output_dir={out}", *args, *(ENGINE_SCORING if key in ENGINE_SCORED else [])], nprocs=nprocs)
        _RUNS[key] = (out, proc.stdout + proc.stderr)
    return _RUNS[key]


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def val_file(root: Path) -> Path:
    """21 held-out samples (an odd count: the two ranks get unequal shares of the validation rows)."""
    path = root / "val.jsonl"
    if not path.exists():
        from pipeline.data.builtin import generate_dataset

        path.write_text("".join(json.dumps(r) + "\n" for r in generate_dataset(21, seed=9)))
    return path


def zero_run(root: Path, stage: str) -> tuple[Path, str]:
    if stage == "zero0_ws1_ga2":  # plain `python launch/train.py`: a world of one process
        return _run(root, stage, [*COMMON, "--deepspeed_config", ds_config("zero0"),
                                  "train.grad_accum=2"], nprocs=0)
    extra = [f"data.val_path={val_file(root)}", "train.eval_every=3"] if stage in ("zero2", "zero3") else []
    return _run(root, stage, [*COMMON, "--deepspeed_config", ds_config(stage), *extra], nprocs=2)


# ----------------------------------------------------------------------------------------------------------
# ZeRO equivalence


def test_zero_stages_give_the_same_losses(runs_root):
    reference = read_metrics(zero_run(runs_root, "zero0")[0])
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert reference[-1]["loss"] < reference[0]["loss"], "training did not reduce the loss"
    for stage in ("zero1", "zero2", "zero3", "zero0_ws1_ga2"):
        rows = read_metrics(zero_run(runs_root, stage)[0])
        assert len(rows) == STEPS, stage
        # Measured largest differences from ZeRO-0 over the 6 steps: 1.5e-7 (ZeRO-1, 2), 2.9e-7 (ZeRO-3 with every
        # parameter partitioned; 1.6e-5 when the shipped threshold kept every tiny tensor whole).
        for ref, row in zip(reference, rows, strict=True):
            assert row["loss"] == pytest.approx(ref["loss"], abs=1e-5), f"{stage} step {row['step']}"
            # The global batch is the same, so are its token counts (summed over ranks).
            assert row["tokens"] == ref["tokens"] and row["label_tokens"] == ref["label_tokens"], stage
            # DeepSpeed's norm (ZeRO 1-3) and ours (ZeRO-0 keeps none) measure the same gradient.
            assert row["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), f"{stage} step {row['step']}"
    assert all(r["grad_norm"] > 0 for r in reference)


def test_validation_loss_is_the_same_under_zero2_and_zero3(runs_root):
    """ZeRO-3 gathers parameters collectively: with unequal shares of the validation rows, every rank still runs
    the same forwards (else the job would hang), and the loss over all ranks equals ZeRO-2's."""
    rows = {stage: [json.loads(x) for x in (zero_run(runs_root, stage)[0] / "val.jsonl").read_text().splitlines()]
            for stage in ("zero2", "zero3")}
    assert [r["step"] for r in rows["zero2"]] == [r["step"] for r in rows["zero3"]] == [0, 3, STEPS]
    for a, b in zip(rows["zero2"], rows["zero3"]):  # measured 1.3e-7 apart
        assert a["val_tokens"] == b["val_tokens"] > 0 and a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert rows["zero3"][-1]["val_loss"] < rows["zero3"][0]["val_loss"]


def test_zero3_partitions_frozen_weights_at_load(runs_root):
    """ZeRO-3 partitions the base weights at load, and (with the tests' persistence threshold 0) keeps no tensor
    whole after ``deepspeed.initialize``: every tiny-model ZeRO-3 run of the suite gathers collectively. The shipped
    JSON's threshold would keep every tiny tensor whole, which the line reports."""
    _, log = zero_run(runs_root, "zero3")
    held, total = (int(x.replace(",", "")) for x in
                   re.search(r"frozen base weights held on rank 0: ([\d,]+) of ([\d,]+)", log).groups())
    assert held <= total // 2 + 1024, f"rank 0 holds {held} of {total} frozen elements: not partitioned"
    assert ALL_PARTITIONED.search(log), log[-3000:]
    _, log0 = zero_run(runs_root, "zero2")
    held2, total2 = (int(x.replace(",", "")) for x in
                     re.search(r"frozen base weights held on rank 0: ([\d,]+) of ([\d,]+)", log0).groups())
    assert held2 == total2  # the check can tell the difference


def test_gradient_checkpointing_under_zero3_changes_no_loss(runs_root):
    """Recomputing activations (non-reentrant, frozen inputs) must give the same losses, under ZeRO-3."""
    reference = read_metrics(zero_run(runs_root, "zero3")[0])
    out, log = _run(runs_root, "zero3-gc", [*COMMON, "--deepspeed_config", ds_config("zero3"),
                                            "model.gradient_checkpointing=true"], nprocs=2)
    assert ALL_PARTITIONED.search(log), log[-3000:]
    rows = read_metrics(out)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], abs=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]


# ----------------------------------------------------------------------------------------------------------
# LoRA+ ratio held at every step, for every schedule, under ZeRO 1/2/3 and offload; the constant-schedule runs
# train in bf16 (the GPU recipes' precision, run on CPU by train.precision=bf16) and serve the bf16 tests below.

BF16_STAGES = ("zero1", "zero2", "zero3", "zero3_offload")
RATIO_CASES = [(stage, sched) for stage in BF16_STAGES for sched in ("constant", "linear", "cosine")] + [
    ("zero0", "linear")]
DORA_MAGNITUDE = 2.0  # the linear-schedule runs train DoRA too: its magnitudes' own lr, held at every stage


def bf16_run(root: Path, stage: str) -> tuple[Path, str]:
    """A 6-step bf16 run at world size 2, checkpointed at steps 3 and 6 (constant schedule after warmup)."""
    return _run(root, f"{stage}-constant", [*COMMON, "--deepspeed_config", ds_config(stage),
                                            "schedule.name=constant", "train.precision=bf16", "train.save_every=3"],
                nprocs=2)


@pytest.mark.parametrize("stage,sched", RATIO_CASES)
def test_lr_ratio_held_every_step(runs_root, stage, sched):
    ratio = 4.0 if sched == "linear" else 16.0  # not only the default lambda
    if sched == "cosine" and stage != "zero3_offload":
        out, log = zero_run(runs_root, stage)  # the equivalence runs are cosine with ratio 16
    elif sched == "constant":
        out, log = bf16_run(runs_root, stage)
    else:
        dora = ["lora.use_dora=true", f"optim.dora_magnitude_ratio={DORA_MAGNITUDE}"] if sched == "linear" else []
        out, log = _run(runs_root, f"{stage}-{sched}",
                        [*COMMON, "--deepspeed_config", ds_config(stage), f"schedule.name={sched}",
                         f"optim.loraplus_ratio={ratio}", *dora], nprocs=2)
    if stage.startswith("zero3"):  # the ratio held with every parameter partitioned
        assert ALL_PARTITIONED.search(log), log[-3000:]
    rows = read_metrics(out)
    assert len(rows) == STEPS
    for row in rows:
        lrs = row["lr_groups"]
        assert set(lrs) == {"lora_A", "lora_B"} | ({"magnitude"} if sched == "linear" else set()), lrs
        assert lrs["lora_B"] / lrs["lora_A"] == pytest.approx(ratio, rel=1e-6), f"step {row['step']}"
        if sched == "linear":
            assert lrs["magnitude"] / lrs["lora_A"] == pytest.approx(DORA_MAGNITUDE, rel=1e-6), f"step {row['step']}"
        # ...and the schedule itself is applied to each group's own base lr.
        expected = LR * multiplier(sched, row["step"] - 1, WARMUP, STEPS)
        assert lrs["lora_A"] == pytest.approx(expected, rel=1e-6), f"step {row['step']}"
        assert math.isfinite(row["loss"]) and row["grad_norm"] is not None


# ----------------------------------------------------------------------------------------------------------
# bf16


def test_bf16_runs_as_recorded_and_zero_stages_agree(runs_root):
    """train.precision=bf16 on CPU: the start line and deepspeed_config.json say bf16 with fp32 gradient
    accumulation and reduction; the four stages' losses agree within bf16 noise, and training learns."""
    losses = {}
    for stage in BF16_STAGES:
        out, log = bf16_run(runs_root, stage)
        assert f"ZeRO-{3 if 'zero3' in stage else stage[-1]}, optimizer offload" in log and ", bf16, optimizer" in log
        ds = json.loads((out / "deepspeed_config.json").read_text())
        assert ds["bf16"]["enabled"] is True and "fp16" not in ds
        assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
        state = json.loads((out / "checkpoints" / "step-6" / "trainer_state.json").read_text())
        assert state["precision"] == "bf16"
        losses[stage] = [r["loss"] for r in read_metrics(out)]
        assert losses[stage][-1] < losses[stage][0], stage
    # Step 1 puts the same weights through the same bf16 forward on every stage: equal losses, and not the fp32
    # run's (2.1621 against 2.1583 on the tiny base), which shows bf16 is really in effect.
    fp32_first = read_metrics(zero_run(runs_root, "zero0")[0])[0]["loss"]
    for stage in BF16_STAGES:
        assert losses[stage][0] == pytest.approx(losses["zero1"][0], abs=1e-6), stage
    assert abs(losses["zero1"][0] - fp32_first) > 1e-3, (losses["zero1"][0], fp32_first)
    # ZeRO-3's linear layers compute the bf16 weight gradient in another order (8.6e-3 apart, relative, on one
    # micro-batch: see tests/grad_accum_probe.py), and after 6 Adam steps that moves the loss by up to a few 1e-3.
    spread = max(abs(a - b) for stage in BF16_STAGES for a, b in zip(losses[stage], losses["zero1"]))
    print(f"bf16: largest loss difference between ZeRO stages over {STEPS} steps: {spread:.3g}")
    assert spread < 2e-2, losses
    # ZeRO-1/2 compute the same bf16 forward and backward and differ only in the order of the fp32 reduction; its
    # last-bit differences can carry an fp32 master weight across a bf16 rounding boundary, so later losses agree
    # to well within bf16's resolution (2^-8 relative), not bit for bit (measured: equal to 1e-6 for 5 steps,
    # 3.3e-4 apart at step 6).
    for a, b in zip(losses["zero1"], losses["zero2"]):
        assert abs(a - b) <= 2 ** -8 * abs(a), (losses["zero1"], losses["zero2"])


def test_bf16_gradients_accumulate_exactly():
    """8 micro-batches in bf16: the gradient DeepSpeed accumulates, under the config launch/train.py builds, equals
    the float64 sum of the 8 micro-batch gradients (fp32 accumulation and reduction); DeepSpeed's defaults (bf16
    accumulation, bf16 reduction) are measurably off, which shows the probe can tell."""
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "tests" / "grad_accum_probe.py")], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    print("relative gradient error after 8 bf16 micro-batches:", errors)
    for stage in ("zero1", "zero2", "zero3"):
        assert errors[stage] < 1e-6, (stage, errors)
    assert errors["zero2-bf16-accum"] > 1e-3 and errors["zero1-bf16-reduce"] > 1e-3, errors


def _resume(runs_root: Path, tmp_path: Path, stage: str, nprocs: int, *extra: str):
    """The bf16 run of ``stage`` as it stood after step 3, resumed to step 6 on ``nprocs`` ranks."""
    import shutil

    ref, _ = bf16_run(runs_root, stage)
    out = tmp_path / f"{stage}-resumed"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "step-6")
    (out / "checkpoints" / "latest").write_text("step-3\n")
    args = [f"output_dir={out}", *COMMON, "--deepspeed_config", ds_config(stage),
            "schedule.name=constant", "train.precision=bf16", "train.save_every=3", *extra]
    proc = run_train(args, nprocs=nprocs)
    assert "resumed from step-3" in proc.stdout, proc.stdout[-2000:]
    return *trained_after(read_metrics(out), read_metrics(ref), 3), proc.stdout


def test_bf16_exact_resume_zero1(runs_root, tmp_path):
    """ZeRO-1 in bf16 is DeepSpeed's BF16_Optimizer (fp32 accumulation): resumed from its step-3 checkpoint on the
    same 2 ranks (a copy of the run without step 6), steps 4-6 repeat the uninterrupted run's losses exactly."""
    rows, ref, _ = _resume(runs_root, tmp_path, "zero1", 2)
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], abs=1e-6)


@pytest.mark.parametrize("stage", ["zero1", "zero3"])
def test_bf16_resume_on_another_world_size(runs_root, tmp_path, stage):
    """Saved on 2 ranks, resumed on 1 through DeepSpeed's universal checkpoint: both groups' lrs and every Adam
    step come back (a lost step or a B group at A's lr would move the loss by far more than bf16 noise)."""
    rows, ref, log = _resume(runs_root, tmp_path, stage, 1)
    assert "loaded on 1 through DeepSpeed's universal checkpoint" in log
    assert [r["step"] for r in rows] == [4, 5, 6]  # only the steps trained on 1 rank are compared
    assert all(r["lr_groups"]["lora_B"] / r["lr_groups"]["lora_A"] == pytest.approx(16.0) for r in rows)
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, ref, strict=True))
    print(f"bf16 {stage}: resumed on 1 rank, largest loss difference {diff:.3g}")
    assert diff < 1e-4  # measured 0: the same micro-batches, summed in fp32 either way


def test_bf16_checkpoint_exports_and_scores_on_mmlu(runs_root, tmp_path):
    """A bf16-trained ZeRO-3 checkpoint: exported as an adapter and merged (the merged model reproduces base +
    adapter), and scored on MMLU by the watcher."""
    import subprocess
    import sys

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.conftest import REPO

    out, _ = bf16_run(runs_root, "zero3")
    ckpt = out / "checkpoints" / "step-6"
    export = [sys.executable, str(REPO / "launch" / "export.py"), "--checkpoint", str(ckpt)]
    subprocess.run([*export, "--out", str(tmp_path / "adapter")], check=True, capture_output=True)
    subprocess.run([*export, "--out", str(tmp_path / "merged"), "--merge"], check=True, capture_output=True)
    base_dir = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "adapter"))
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits
        torch.testing.assert_close(merged, tuned.eval()(ids).logits, rtol=0, atol=1e-4)
    assert float((merged - plain).abs().max()) > 1e-3  # the adapter trained

    import shutil

    scored = tmp_path / "scored"  # a copy with the last checkpoint only: one scoring pass is enough here
    shutil.copytree(out, scored)
    shutil.rmtree(scored / "checkpoints" / "step-3")
    (scored / "mmlu.jsonl").unlink()  # the engine's scores (ENGINE: another setting, which the watcher leaves)
    watch = [sys.executable, str(REPO / "eval" / "watch.py"), "--run", str(scored), "--once", "--mmlu-data",
             "sample", "--limit", "1", "--batch-size", "16", "--no-base"]
    proc = subprocess.run(watch, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (scored / "mmlu.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6] and 0 <= rows[0]["acc"] <= 1


# ----------------------------------------------------------------------------------------------------------
# MMLU on the training engine, every stage: lm-eval's CLI on the same checkpoint, request by request

ENGINE_CASES = {  # run key -> (run, dtype of lm-eval's CLI, tolerance on one request's log-likelihood)
    "zero0": (zero_run, "zero0", "float32", 1e-4), "zero1": (zero_run, "zero1", "float32", 1e-4),
    "zero2": (zero_run, "zero2", "float32", 1e-4), "zero3": (zero_run, "zero3", "float32", 1e-4),
    "zero0_ws1_ga2": (zero_run, "zero0_ws1_ga2", "float32", 1e-4),
    # bf16: both compute the logits by a bf16 matmul, batched differently (a logit may come out one unit in the
    # last place apart: 2^-4 in [8, 16)); lm-eval's HFLM then rounds its log_softmax to bf16 (half a unit: 2^-6 at
    # 4-8) where the engine keeps fp32. Two units of a logit: 0.125; measured 0.067 and 0.075 (0.053 on another run)
    "zero3-constant": (bf16_run, "zero3", "bfloat16", 0.125),
    "zero3_offload-constant": (bf16_run, "zero3_offload", "bfloat16", 0.125),
}


@pytest.fixture(scope="module")
def engine_vs_cli(runs_root, tmp_path_factory) -> dict:
    """Each ENGINE_CASES run's last checkpoint scored by lm-eval's CLI (two at a time): key -> (result dir, CLI)."""
    from tests import lm_eval_cli

    ckpts = {key: run(runs_root, stage)[0] / "checkpoints" / f"step-{STEPS}"
             for key, (run, stage, _, _) in ENGINE_CASES.items()}
    jobs = {key: lm_eval_cli.Job(Path(json.loads((ckpt / "mmlu.json").read_text())["model"]["base"]),
                                 ckpt / "adapter", 0, 2, ENGINE_CASES[key][2]) for key, ckpt in ckpts.items()}
    scores = lm_eval_cli.score_all(jobs, tmp_path_factory.mktemp("engine-cli"))
    return {key: (ckpts[key], scores[key]) for key in ckpts}


@pytest.mark.parametrize("key", list(ENGINE_CASES))
def test_engine_scores_are_lm_evals_cli_scores(engine_vs_cli, key):
    """ZeRO 0-3 (every parameter partitioned), world size 1 and 2, bf16, ZeRO-3 with offload: the score the training
    ranks gave the last checkpoint is lm-eval's CLI score of the saved adapter on the base model: every request's
    log-likelihood within the tolerance (fp32 1e-4, measured 3.1-3.8e-6; bf16 0.125, see ENGINE_CASES), the same acc
    and stderr (bf16: answers may differ only on questions whose two likeliest choices are that close)."""
    from tests import lm_eval_cli

    ckpt, cli = engine_vs_cli[key]
    tol = ENGINE_CASES[key][3]
    summary = json.loads((ckpt / "mmlu.json").read_text())
    diff = lm_eval_cli.largest_difference(lm_eval_cli.engine_requests(ckpt), cli)
    print(f"{key}: {len(cli.requests)} questions, largest log-likelihood difference {diff:.2g}")
    assert diff < tol
    assert summary["runner"] == "engine" and summary["ranks"] == (1 if key == "zero0_ws1_ga2" else 2)
    if tol < 1e-3:
        assert summary["acc"] == pytest.approx(cli.acc, abs=1e-12) and \
            summary["acc_stderr"] == pytest.approx(cli.acc_stderr, abs=1e-12)
    else:  # bf16: an answer may differ only where lm-eval's own top two choices are closer than the tolerance
        flips = round(abs(summary["acc"] - cli.acc) * len(cli.requests))
        assert flips <= lm_eval_cli.near_ties(cli, tol), (summary["acc"], cli.acc)


# ----------------------------------------------------------------------------------------------------------
# Adapters saved under ZeRO-3


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_zero3_adapter_loads_with_peft_and_reproduces_logits(runs_root, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out3, _ = zero_run(runs_root, "zero3")
    out0, _ = zero_run(runs_root, "zero0")
    adapter3 = out3 / "checkpoints" / f"step-{STEPS}" / "adapter"
    adapter0 = out0 / "checkpoints" / f"step-{STEPS}" / "adapter"
    config = json.loads((adapter3 / "adapter_config.json").read_text())
    base_path = Path(config["base_model_name_or_path"])
    assert base_path.is_absolute() and (base_path / "config.json").is_file(), config["base_model_name_or_path"]

    # Gathered, not the empty partitions ZeRO-3 holds per rank, and equal to the un-partitioned ZeRO-0 run.
    w3, w0 = load_file(adapter3 / "adapter_model.safetensors"), load_file(adapter0 / "adapter_model.safetensors")
    assert w3.keys() == w0.keys() and len(w3) == 28
    for k in w3:
        assert w3[k].numel() > 0 and w3[k].shape == w0[k].shape, k
        # Same training up to float noise, which Adam's normalised update amplifies (seen: 4e-5 after 6 steps
        # with updates of ~1e-2); empty or un-gathered tensors would differ by the weights themselves.
        torch.testing.assert_close(w3[k], w0[k], rtol=0, atol=2e-4)
    assert any(v.abs().sum() > 0 for k, v in w3.items() if "lora_B" in k), "lora_B never trained"

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    base_logits = _logits(base, ids)
    tuned = PeftModel.from_pretrained(base, adapter3).eval()
    tuned_logits = _logits(tuned, ids)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4), "adapter changes nothing"

    # The trained model, independently: DeepSpeed's own fp32 master weights from the ZeRO-3 engine checkpoint.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    master = get_fp32_state_dict_from_zero_checkpoint(str(out3 / "checkpoints" / f"step-{STEPS}"), tag="deepspeed",
                                                      exclude_frozen_parameters=True)
    assert master and all("lora_" in k for k in master)
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                      adapter0).eval()
    lora = {n: p.shape for n, p in fresh.named_parameters() if "lora_" in n}
    assert len(lora) == 28 and {k: v.shape for k, v in master.items()} == lora  # every LoRA tensor, whole, once
    loaded = fresh.load_state_dict(master, strict=False)  # strict about the LoRA tensors (above); the base is frozen
    assert not loaded.unexpected_keys and not any("lora_" in k for k in loaded.missing_keys)
    torch.testing.assert_close(tuned_logits, _logits(fresh, ids), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The embedded default, end to end


def test_embedded_default_end_to_end(tmp_path):
    """The README's main command as it is (2 ranks, every default), with both trackers on: its checkpoints, the
    base model and each checkpoint scored on the bundled MMLU sample, checkpoints/best and the base-vs-best
    verdict, the best above the base by more than the difference's stderr and well above chance; TensorBoard (read
    by its own loader) and a W&B offline run hold every step, lambda between the groups' lrs, and the scores at
    their checkpoints' steps; export --best exports the best."""
    import subprocess
    import sys

    from pipeline.config import make_config
    from tests.conftest import REPO, tensorboard_scalars, wandb_history, wandb_records

    default = make_config()
    steps, every, ratio = default.train.max_steps, default.train.save_every, default.optim.loraplus_ratio
    out = tmp_path / "default"
    proc = run_train([f"output_dir={out}", "eval.mmlu.every_checkpoint=auto", "logging.tensorboard=true",
                      "logging.wandb=true"], nprocs=2, env={"WANDB_MODE": "offline"})
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert {"step", "loss", "lr_groups", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"} <= r.keys()
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert sum(r["loss"] for r in rows[-3:]) / 3 < rows[0]["loss"], "loss did not fall"
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
    saved = list(range(every, steps + 1, every)) + ([] if steps % every == 0 else [steps])
    assert len(saved) >= 3
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == sorted(f"step-{s}" for s in saved)
    assert (out / "checkpoints" / "latest").read_text() == f"step-{steps}\n"
    for name in ckpts:
        adapter = out / "checkpoints" / name / "adapter"
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        assert any((out / "checkpoints" / name / "deepspeed").iterdir())
    cfg = make_config(out / "config.yaml")  # the resolved config reads back, with the real model and data paths
    assert cfg.train.max_steps == steps and Path(cfg.model.name_or_path).is_dir() and Path(cfg.data.path).is_file()
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == 8 * 1 * 2 and ds["zero_optimization"]["stage"] == 2
    assert "LoRA+ param groups" in proc.stdout and "Traceback" not in proc.stderr

    # MMLU: the base model as step 0 and every checkpoint; the best clearly above the base
    scores = {r["step"]: r for r in map(json.loads, (out / "mmlu.jsonl").read_text().splitlines())}
    assert sorted(scores) == [0, *saved]
    base = scores[0]
    best = max((r for r in scores.values() if r["step"] > 0), key=lambda r: (r["acc"], -r["step"]))
    assert (out / "checkpoints" / "best").read_text() == f"step-{best['step']}\n"
    table = proc.stdout[proc.stdout.index("# MMLU by checkpoint"):]
    assert "| 0 (base model) |" in table and f"| {best['step']} **best** |" in table
    se = math.hypot(best["acc_stderr"], base["acc_stderr"])
    assert f"{best['acc'] - base['acc']:+.4f} over the base model" in table and f"stderr is {se:.4f}" in table
    # the curve climbs: the base near chance (1/4), the best well above it and above the base by more than the
    # difference's stderr (README: 0.2588 -> 0.4649, stderr of the difference 0.0451)
    assert base["acc"] < 0.33 and best["acc"] > 0.38, (base["acc"], best["acc"])
    assert best["acc"] - base["acc"] > se and "the difference is larger than its stderr" in table
    for png in ("mmlu.png", "loss.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG"), png

    # TensorBoard, through its own reader: every step, lambda at every step, the scores at their steps
    tb = tensorboard_scalars(out / "tensorboard")
    assert sorted(tb["train/loss"]) == list(range(1, steps + 1))
    for r in rows:
        assert tb["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        lr_a, lr_b = tb["train/lr/lora_A"][r["step"]], tb["train/lr/lora_B"][r["step"]]
        assert lr_b == pytest.approx(ratio * lr_a, rel=1e-6) and lr_a == pytest.approx(r["lr_groups"]["lora_A"])
    for key in ("train/grad_norm", "train/tokens_per_s", "train/mem_peak_gb"):
        assert sorted(tb[key]) == list(range(1, steps + 1)), key
    assert {s: round(v, 4) for s, v in tb["eval/mmlu/acc"].items()} == {s: round(r["acc"], 4)
                                                                       for s, r in scores.items()}
    assert sorted(tb["eval/mmlu/stem"]) == sorted(scores)

    # W&B offline: the same history, in the files `wandb sync` would upload; the config logged once
    history = wandb_history(out / "wandb")
    logged = {h["step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert sorted(logged) == list(range(1, steps + 1))
    assert all(logged[r["step"]] == pytest.approx(r["loss"]) for r in rows)
    assert {h["step"]: h["eval/mmlu/acc"] for h in history if "eval/mmlu/acc" in h} == {
        s: pytest.approx(r["acc"]) for s, r in scores.items()}
    runs = [r.run for f in (out / "wandb").glob("offline-run-*/run-*.wandb") for r in wandb_records(f)
            if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 1 and runs[0].run_id == json.loads((out / "trackers.json").read_text())["wandb_id"]
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    assert config["optim"]["loraplus_ratio"] == ratio and config["train"]["save_every"] == every

    # export --best: the checkpoint checkpoints/best names
    export = [sys.executable, str(REPO / "launch" / "export.py"), "--checkpoint"]
    done = subprocess.run([*export, str(out), "--best", "--out", str(tmp_path / "best")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    chosen = out / "checkpoints" / f"step-{best['step']}" / "adapter" / "adapter_model.safetensors"
    assert (tmp_path / "best" / "adapter_model.safetensors").read_bytes() == chosen.read_bytes()
    (tmp_path / "nobest" / "checkpoints").mkdir(parents=True)
    refused = subprocess.run([*export, str(tmp_path / "nobest"), "--best", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "has no checkpoints/best" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "x").exists()


def test_zero3_embedding_adapter_from_a_relative_model_path(runs_root, tiny_model_dir, tmp_path):
    """Under ZeRO-3 with nothing kept whole (the tests' persistence threshold 0, as for a 7B embedding), an adapter
    on the embedding too saves gathered and loads with plain PEFT; a relative model path is recorded absolute."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.conftest import REPO

    relative = tiny_model_dir.relative_to(REPO)  # the launcher runs with the repo as working directory
    out, log = _run(runs_root, "zero3-embed", [*COMMON, "--deepspeed_config", ds_config("zero3"),
                                             f"model.name_or_path={relative}",
                                             "lora.target_modules=[q_proj,v_proj,embed_tokens]"], nprocs=2)
    assert ALL_PARTITIONED.search(log), log[-3000:]
    adapter = out / "checkpoints" / f"step-{STEPS}" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_embedding_A" in k for k in weights) and all(v.numel() > 0 for v in weights.values())
    rows = read_metrics(out)
    assert set(rows[0]["lr_groups"]) == {"lora_A", "lora_B", "lora_embedding"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    loaded = dict(model.named_parameters())
    for k, v in weights.items():  # every saved tensor landed in the model, at full size
        name = next(n for n in loaded if n.replace(".default", "").endswith(k.split("base_model.model.", 1)[1]))
        torch.testing.assert_close(loaded[name].detach(), v)


def test_chat_format_packed_from_parquet_with_validation(runs_root, tmp_path, tiny_model_dir):
    """The other data paths through the launcher: chat messages, read from parquet, packed; and a held-out
    validation file, evaluated at step 0, every train.eval_every steps and at the end over both ranks."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from pipeline.config import DataConfig
    from pipeline.data.builtin import generate_dataset
    from pipeline.data.prepared import prepare
    from pipeline.model.load import load_tokenizer

    def chat(records):
        return [{"messages": [{"role": "user", "content": f"{r['instruction']} {r['input']}".strip()},
                              {"role": "assistant", "content": r["output"]}]} for r in records]

    path, val_path = tmp_path / "chat.parquet", tmp_path / "val.parquet"
    pq.write_table(pa.Table.from_pylist(chat(generate_dataset(300, seed=5))), path)
    pq.write_table(pa.Table.from_pylist(chat(generate_dataset(37, seed=6))), val_path)  # 37: ranks get unequal shares
    seq_len = 64
    out, log = _run(runs_root, "chat-packed", [*COMMON, f"data.path={path}", "data.format=chat", "data.packing=true",
                                               f"train.seq_len={seq_len}", f"data.val_path={val_path}",
                                               "train.eval_every=4"], nprocs=2)
    assert "packed into" in log
    metrics = read_metrics(out)
    # (few label tokens per step, so the loss is too noisy here to test learning; other tests do that)
    assert len(metrics) == STEPS and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in metrics)
    for r in metrics:  # 2 ranks x 2 rows of at most seq_len, filled by bin packing: little padding
        assert 2 * seq_len < r["tokens"] <= 2 * 2 * seq_len and 0 < r["label_tokens"] < r["tokens"]

    val = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [0, 4, STEPS]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    # Step 0 is the base model (LoRA's B starts at zero): its loss over every validation document, each alone and
    # unpacked, token-weighted, must be what two ranks computed on packed rows.
    tok = load_tokenizer(str(tiny_model_dir))
    rows = prepare(DataConfig(path=str(val_path), format="chat", cache_dir=str(tmp_path / "c")), tok,
                   str(tiny_model_dir), seq_len).train
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    loss, tokens = held_out_loss(model, rows)
    assert val[0]["val_tokens"] == tokens == val[-1]["val_tokens"]
    assert val[0]["val_loss"] == pytest.approx(loss, abs=1e-4)


def test_cpu_ranks_share_the_cores(monkeypatch):
    from pipeline.distributed import cpu_threads_per_rank

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert cpu_threads_per_rank() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_SIZE", str(cores * 4))  # more ranks than cores: still one thread each
    assert cpu_threads_per_rank() == 1
    monkeypatch.delenv("LOCAL_SIZE")
    assert cpu_threads_per_rank() == cores  # one process: every core
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    assert cpu_threads_per_rank() == 3


def test_gpu_index_with_all_or_one_visible_gpu():
    from pipeline.distributed import gpu_index
    from pipeline.errors import UserError

    assert gpu_index(3, 8) == 3  # the deepspeed launcher: every rank sees the node's GPUs
    assert gpu_index(3, 1) == 0  # one GPU bound per task (SLURM --gpus-per-task=1): its cuda:0
    with pytest.raises(UserError, match="local rank 4 sees 2 GPU"):
        gpu_index(4, 2)


def test_universal_load_gives_each_adam_step_its_own_tensor_on_the_right_device():
    """What DeepSpeed's universal load leaves (one shared CPU tensor, or a number) is repaired: one float32 step per
    parameter, on the parameter's device for fused/capturable AdamW (a CUDA kernel cannot read a host pointer),
    on the CPU otherwise. The meta device stands in for a GPU."""
    from pipeline.distributed import place_adam_steps

    for fused, zero3 in ((True, False), (False, False), (True, True)):
        params = [torch.nn.Parameter(torch.zeros(2, device="meta")), torch.nn.Parameter(torch.zeros(3, device="meta"))]
        opt = torch.optim.SGD(params, lr=0.1)  # any optimizer: only param_groups, defaults and state are read
        opt.param_groups[0]["fused"] = opt.defaults["fused"] = fused
        if zero3:  # between steps ZeRO-3 leaves its groups without params: the state is what is repaired
            opt.param_groups[0]["params"] = []
        shared = torch.tensor(5.0, dtype=torch.float64)
        opt.state[params[0]] = {"step": shared}
        opt.state[params[1]] = {"step": 5}
        place_adam_steps(opt)
        steps = [opt.state[p]["step"] for p in params]
        assert steps[0] is not steps[1] and steps[0] is not shared
        assert all(s.dtype == torch.float32 and s.device.type == ("meta" if fused else "cpu") for s in steps)
        if not fused:
            assert [float(s) for s in steps] == [5.0, 5.0]


def test_gpu_ranks_share_the_host_cores_and_pick_their_gpu(monkeypatch):
    """init() on a GPU node, with CUDA and the process group stubbed: each rank still takes cores / ranks host
    threads (DeepSpeedCPUAdam steps on them under optimizer offload, through torch's OpenMP runtime), and its GPU
    by LOCAL_RANK among those it sees."""
    import deepspeed
    import torch.distributed

    from pipeline import distributed as dist
    from pipeline.distributed import comm

    picked = []
    monkeypatch.setattr(comm, "select_accelerator", lambda: True)  # where init() looks it up
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    before = torch.get_num_threads()
    try:
        info = dist.init()
        assert torch.get_num_threads() == dist.cpu_threads_per_rank() == max(1, len(os.sched_getaffinity(0)) // 2)
    finally:
        torch.set_num_threads(before)
    assert info.on_gpu and info.device == torch.device("cuda", 1) and picked == [torch.device("cuda", 1)]
