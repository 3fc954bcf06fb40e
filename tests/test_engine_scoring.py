"""MMLU on the live training engine (``eval.mmlu.runner=engine``) through the real launcher at world size 2, ZeRO-3
with every parameter partitioned, 5-shot on the bundled sample (one question a subject: one rank runs lm-eval and
the other serves its forwards, the split a many-GPU job meets on small subjects):

- a run scored at steps 0, 5 and 10 against the same run unscored: the same losses, lrs, gradient norms and
  validation losses, bit for bit, and the same final adapter, byte for byte (dropout on: the RNG streams too);
- every request's log-likelihood equal to lm-eval's own CLI (``lm_eval --model hf``, ``peft=`` the saved
  adapter) on the same checkpoint, and the base model (step 0) equal to the CLI on the base alone;
- faults: a SIGTERM while step 5 is scored stops the run (exit 143, the checkpoint saved, no score recorded); the
  next start scores step 5 first, then trains on; a rank SIGKILLed while step 10 is scored ends the job at once;
  the restart, with nothing left to train, scores step 10. Every score recorded once, for its step, and the losses
  of the uninterrupted run.

The other stages, offload, bf16, world size 1, two nodes and the LoRA family score through the engine in
tests/test_distributed.py, tests/test_multinode.py and tests/test_lora_family.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests import lm_eval_cli
from tests.conftest import ds_config, read_metrics, run_train

pytestmark = pytest.mark.launcher

STEPS, EVERY = 10, 5
COMMON = [f"train.max_steps={STEPS}", f"train.save_every={EVERY}", "lora.dropout=0.1", "seed=3",
          "train.micro_batch_size=2", "data.val_fraction=0.01", f"train.eval_every={EVERY}",
          "--deepspeed_config", ds_config("zero3")]
SCORED = ["eval.mmlu.every_checkpoint=true", "eval.mmlu.runner=engine", "eval.mmlu.num_fewshot=5",
          "eval.mmlu.limit=1", "eval.mmlu.log_samples=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """name -> (output_dir, the stdout of each start)."""
    root = tmp_path_factory.mktemp("engine")
    done = {}
    for name, extra in (("scored", SCORED), ("unscored", ["eval.mmlu.every_checkpoint=false"])):
        out = root / name
        done[name] = out, [run_train([f"output_dir={out}", *COMMON, *extra], nprocs=2).stdout]
    # Faults: SIGTERM while step 5 is scored; resumed, rank 1 SIGKILLed while step 10 is scored; restarted.
    out, logs = root / "faults", []
    args = [f"output_dir={out}", *COMMON, *SCORED]
    for fault in ("sigterm-scoring@5", "kill-scoring@10/1", ""):
        began = time.time()
        proc = run_train(args, nprocs=2, check=not fault, env={"LORAPLUS_FAULT": fault})
        logs.append(proc.stdout + f"\n[exit {proc.returncode} after {time.time() - began:.1f} s]")
    done["faults"] = out, logs
    return done


def _steps_of(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "mmlu.jsonl").read_text().splitlines())]


def test_a_scored_run_is_the_unscored_run(runs):
    """Scoring at steps 0, 5 and 10 changes nothing of the training: eval mode and back, no gradient, the RNG
    streams put back, the partitions left as they were."""
    scored, unscored = read_metrics(runs["scored"][0]), read_metrics(runs["unscored"][0])
    assert [r["step"] for r in scored] == [r["step"] for r in unscored] == list(range(1, STEPS + 1))
    for a, b in zip(scored, unscored):
        assert (a["loss"], a["lr_groups"], a["grad_norm"]) == (b["loss"], b["lr_groups"], b["grad_norm"]), a["step"]
    val = [[json.loads(x)["val_loss"] for x in (out / "val.jsonl").read_text().splitlines()]
           for out in (runs["scored"][0], runs["unscored"][0])]
    assert val[0] == val[1] and len(val[0]) == 3
    adapter = Path("checkpoints") / f"step-{STEPS}" / "adapter" / "adapter_model.safetensors"
    assert (runs["scored"][0] / adapter).read_bytes() == (runs["unscored"][0] / adapter).read_bytes()
    assert _steps_of(runs["scored"][0]) == [0, EVERY, STEPS]
    pauses = [json.loads(x) for x in (runs["scored"][0] / "metrics.jsonl").read_text().splitlines()
              if '"event"' in x]
    assert [(p["step"], p["event"]) for p in pauses] == [(0, "mmlu"), (EVERY, "mmlu"), (STEPS, "mmlu")]
    assert all(p["pause_s"] > 0 and p["forwards_per_rank"] > 0 for p in pauses)
    log = runs["scored"][1][0]
    assert "MMLU, the base model (step 0): acc" in log and f"MMLU, step-{STEPS}: acc" in log
    assert (runs["scored"][0] / "mmlu.png").read_bytes().startswith(b"\x89PNG")
    assert (runs["scored"][0] / "checkpoints" / "best").is_file()
    assert "| 0 (base model) |" in log  # the end-of-run table


@pytest.fixture(scope="module")
def cli_scores(runs, tmp_path_factory):
    """lm-eval's CLI on the scored run's base model (no adapter) and on its step-10 checkpoint, side by side."""
    out = runs["scored"][0]
    base = Path(json.loads((out / "base" / "mmlu.json").read_text())["model"]["base"])
    jobs = {str(step): lm_eval_cli.Job(base, adapter, 5, 1)
            for step, adapter in ((0, None), (STEPS, out / "checkpoints" / f"step-{STEPS}" / "adapter"))}
    return {int(name): score for name, score in
            lm_eval_cli.score_all(jobs, tmp_path_factory.mktemp("engine-cli")).items()}


@pytest.mark.parametrize("step", [0, STEPS])
def test_every_request_is_lm_evals_own(runs, cli_scores, step):
    """The engine's log-likelihood of every request within 1e-4 of lm-eval's CLI (fp32; measured 2e-6), and the
    same acc and stderr: step 0 against the base model alone (the engine disabled the adapters), step 10 against the
    base with the checkpoint's adapter."""
    out = runs["scored"][0]
    result_dir = out / "base" if step == 0 else out / "checkpoints" / f"step-{step}"
    summary = json.loads((result_dir / "mmlu.json").read_text())
    cli = cli_scores[step]
    diff = lm_eval_cli.largest_difference(lm_eval_cli.engine_requests(result_dir), cli)
    print(f"step {step}: {len(cli.requests)} questions, largest log-likelihood difference {diff:.2g}")
    assert diff < 1e-4
    assert summary["acc"] == cli.acc  # lm-eval's own aggregation, on rank 0
    assert summary["acc_stderr"] == (cli.acc_stderr if isinstance(cli.acc_stderr, float) else None)
    assert summary["runner"] == "engine" and summary["ranks"] == 2 and summary["lm_eval_ranks"] == 1
    assert summary["model"]["adapters"] == ("disabled" if step == 0 else "trained")


def test_a_stop_while_scoring_and_a_rank_lost_while_scoring(runs):
    """SIGTERM in the score of step 5: exit 143 with step-5 saved and unscored; the next start scores step-5 before
    it trains step 6. A rank SIGKILLed in the score of step 10: the job ends at once; the restart has nothing to
    train and scores step 10. Each score once, for its step; the uninterrupted run's losses."""
    out, (first, second, third) = runs["faults"]
    assert "[exit 143" in first and "step-5 is not scored (stopping); the next start scores it first" in first
    assert "stopped by SIGTERM after step 5, checkpoint saved" in first
    assert "MMLU, step-5" not in first
    assert second.index("resumed from step-5") < second.index("MMLU, step-5: acc") < second.index("step      6/")
    assert "MMLU, step-10" not in second and "[exit 0" not in second
    seconds = float(second.rsplit("after ", 1)[1].split(" s]")[0])
    assert seconds < 120, seconds  # the lost rank ended the job, it did not wait out a timeout
    assert "loading step-10 only to score it on MMLU" in third and "MMLU, step-10: acc" in third
    assert "step      " not in third.split("loading step-10", 1)[1]  # no step trained
    assert _steps_of(out) == [0, EVERY, STEPS]  # each once: the base was not scored again on the restarts
    rows, ref = read_metrics(out), read_metrics(runs["unscored"][0])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], abs=1e-6)  # exact resumes
    cli = json.loads((runs["scored"][0] / "checkpoints" / f"step-{STEPS}" / "mmlu.json").read_text())
    assert json.loads((out / "checkpoints" / f"step-{STEPS}" / "mmlu.json").read_text())["acc"] == cli["acc"]
