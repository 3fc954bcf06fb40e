"""MMLU scoring with lm-evaluation-harness, offline, on the bundled sample: parity with lm-eval's own CLI,
adapter vs merged model, the watcher (restart, a scorer stopped half-way), scoring during training, and bad input.

One training run serves the module (a scoring pass costs ~30 s on 2 cores): rank 0's background
``eval/watch.py --once`` scores each of its checkpoints while it trains, with the setting (data, shots, limit) that
``QUICK`` gives eval/mmlu.py and eval/watch.py here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.data import builtin
from pipeline.eval import mmlu
from tests.conftest import REPO, read_metrics, run_train

EVAL = [sys.executable, str(REPO / "eval" / "mmlu.py")]
WATCH = [sys.executable, str(REPO / "eval" / "watch.py")]
QUICK = ["--mmlu-data", "sample", "--limit", "2", "--batch-size", "16", "--device", "cpu"]
OFFLINE_VARS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
OFFLINE = {**os.environ, **OFFLINE_VARS}


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=OFFLINE)


def error_line(proc) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


#: The in-training scorer's setting: the same data, shots and question limit as ``QUICK`` (so a watcher run with
#: ``QUICK`` finds every checkpoint already scored), and the defaults otherwise: device cpu, batch size auto (sized
#: to the memory budget, ``eval.mmlu.memory_gb: auto``), so that its scores, set against lm-eval's CLI at a fixed
#: batch of 16, check the budget-sized batches too.
SCORE_IN_TRAINING = ["eval.mmlu.every_checkpoint=true", "eval.mmlu.runner=process", "eval.mmlu.limit=2",
                     "eval.mmlu.num_fewshot=5"]
#: A budget a little above what eval/mmlu.py holds before its first batch on the tiny model (about 0.5 GiB): batches
#: smaller than lm-eval's cap of 64, growing as the requests get shorter (``scored_elsewhere``'s merged-model score).
SMALL_BUDGET = ["--batch-size", "auto", "--memory-gb", "0.65"]
TRAIN_ARGS = ["train.save_every=1", "--deepspeed_config", "deepspeed_configs/zero0.json", "data.val_fraction=0.05",
              "train.eval_every=1"]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, installed) -> tuple[Path, str]:
    """A 2-step run with a checkpoint and a validation loss at every step (one rank, ZeRO-0), each checkpoint
    scored on MMLU while it trains; (output_dir, stdout). It runs as a user of the built wheel would: the
    ``loraplus-train`` command of the wheel installed alone into an empty directory, from a directory outside the
    checkout, with the recipe's DeepSpeed JSON found in the installed package."""
    out = tmp_path_factory.mktemp("mmlu") / "run"
    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=installed.cwd,
                           env=installed.env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(installed.site), where
    cmd = [installed.command("loraplus-train"), "--num_gpus", "1", "--master_port", str(random.randint(20000, 40000)),
           f"output_dir={out}", *TRAIN_ARGS, *SCORE_IN_TRAINING, "train.max_steps=2"]
    proc = subprocess.run(cmd, cwd=installed.cwd, env={**installed.env, **OFFLINE_VARS}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "pipeline.cli.train" in proc.stderr + proc.stdout  # the launcher ran the installed module
    return out, proc.stdout


@pytest.fixture(scope="module")
def run_dir(scored_run) -> Path:
    return scored_run[0]


def copy_checkpoint(run_dir: Path, step: int, dest: Path) -> Path:
    shutil.copytree(run_dir / "checkpoints" / f"step-{step}", dest)
    for f in ("mmlu.json", "mmlu_lm_eval.json"):
        (dest / f).unlink(missing_ok=True)
    return dest


# ----------------------------------------------------------------------------------------------------------
# The data, and when training scores


def test_every_checkpoint_auto_means_the_tiny_default_only():
    from pipeline.config import make_config
    from pipeline.eval.scorer import enabled

    auto = make_config().eval.mmlu
    assert auto.every_checkpoint == "auto" and enabled(auto, True) and not enabled(auto, False)
    on = make_config(None, ["eval.mmlu.every_checkpoint=true"]).eval.mmlu
    off = make_config(None, ["eval.mmlu.every_checkpoint=false"]).eval.mmlu
    assert enabled(on, False) and not enabled(off, True)
    for recipe in (REPO / "launch" / "configs").glob("llama*.yaml"):
        assert make_config(recipe).eval.mmlu.every_checkpoint == "false", recipe.name


def test_bundled_sample_is_what_the_generator_writes():
    import pyarrow.parquet as pq

    rows = builtin.sample_rows()
    assert len(rows) == 57 == len(builtin.subjects())
    for subject, splits in rows.items():
        for split, expected in splits.items():
            table = pq.read_table(builtin.SAMPLE / subject / f"{split}-00000-of-00001.parquet").to_pylist()
            assert [{k: r[k] for k in ("question", "choices", "answer")} for r in table] == expected


def test_csv_release_layout_is_converted(tmp_path):
    data = tmp_path / "data"
    for subject, splits in builtin.sample_rows().items():
        for split, folder in (("dev", "dev"), ("test", "test")):
            (data / folder).mkdir(parents=True, exist_ok=True)
            with open(data / folder / f"{subject}_{folder}.csv", "w", newline="") as f:
                import csv

                w = csv.writer(f)
                for r in splits[split]:
                    w.writerow([r["question"], *r["choices"], "ABCD"[r["answer"]]])
    hub = mmlu.resolve(str(tmp_path), 5, tmp_path / "cache")
    import pyarrow.parquet as pq

    got = pq.read_table(hub / "anatomy" / "test-00000-of-00001.parquet").to_pylist()
    assert [r["answer"] for r in got] == [r["answer"] for r in builtin.sample_rows()["anatomy"]["test"]]


# ----------------------------------------------------------------------------------------------------------
# Scores are lm-eval's


@dataclass
class Scored:
    """lm-eval's own CLI on the step-2 adapter, and eval/mmlu.py on its merged export (see ``scored_elsewhere``)."""

    cli: subprocess.CompletedProcess
    cli_results: Path  # lm-eval's --output_path
    merged: Path  # the merged model directory
    merged_eval: subprocess.CompletedProcess
    merged_env: dict  # the environment eval/mmlu.py ran in


@pytest.fixture(scope="module")
def scored_elsewhere(run_dir, tmp_path_factory) -> Scored:
    """The step-2 checkpoint scored twice more with ``QUICK``'s setting: (1) by ``python -m lm_eval`` on the adapter
    (base + peft=), with lm-eval's built-in ``mmlu`` pointed at the bundled sample; (2) exported with
    launch/export.py --merge and scored by eval/mmlu.py with no HF_*_OFFLINE in the environment and an unreachable
    hub (eval/mmlu.py must set offline mode itself), its batches sized to ``SMALL_BUDGET``. The two run side by
    side: each keeps about one core busy."""
    from tests import lm_eval_cli

    root = tmp_path_factory.mktemp("scored")
    adapter = run_dir / "checkpoints" / "step-2" / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    cli_cmd = lm_eval_cli.command(Path(base), adapter, root, 5, 2, dtype="auto")
    cli = lm_eval_cli.start(cli_cmd, root)
    try:
        merged = root / "merged"
        subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), "--checkpoint", str(adapter.parent),
                        "--out", str(merged), "--merge"], check=True, capture_output=True)
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there
        merged_eval = subprocess.run(EVAL + ["--checkpoint", str(merged), *QUICK, *SMALL_BUDGET], cwd=REPO,
                                     capture_output=True, text=True, timeout=600, env=env)
        cli.wait(timeout=600)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    done = subprocess.CompletedProcess(cli_cmd, cli.returncode, (root / "cli.out").read_text(),
                                       (root / "cli.err").read_text())
    return Scored(done, root / "results", merged, merged_eval, env)


def test_same_acc_as_lm_eval_cli_and_merged_equals_adapter(run_dir, scored_elsewhere):
    """The score the in-training scorer (eval/watch.py) wrote for step-2 is lm-eval's CLI score of the same
    adapter, and eval/mmlu.py gives the merged model the same score."""
    ckpt = run_dir / "checkpoints" / "step-2"
    ours = json.loads((ckpt / "mmlu.json").read_text())
    assert len(ours["subjects"]) == 57 and set(ours["categories"]) == {"stem", "humanities", "social_sciences",
                                                                       "other"}
    assert ours["num_fewshot"] == 5 and ours["limit"] == 2 and ours["lm_eval_version"]
    assert ours["model"]["step"] == 2 and ours["model"]["adapter"] == str((ckpt / "adapter").resolve())
    assert (ckpt / "mmlu_lm_eval.json").is_file()

    cli = scored_elsewhere.cli
    assert cli.returncode == 0, cli.stderr[-3000:]
    [results] = list(scored_elsewhere.cli_results.rglob("results_*.json"))
    theirs = json.loads(results.read_text())["results"]["mmlu"]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_stderr,none"] == ours["acc_stderr"]

    merged_dir, proc = scored_elsewhere.merged, scored_elsewhere.merged_eval
    assert proc.returncode == 0, proc.stderr[-3000:]
    as_merged = json.loads((merged_dir / "mmlu.json").read_text())
    assert as_merged["acc"] == ours["acc"] and as_merged["subjects"] == ours["subjects"]
    assert as_merged["model"]["step"] == 0 and as_merged["model"]["adapter"] is None

    # The tiny model scores near chance either way, so check the model lm-eval scores with directly: with
    # peft= it is base + adapter (equal to the merged model), not the base.
    import torch
    from lm_eval.models.huggingface import HFLM

    adapter = ckpt / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    ids = torch.randint(3, 500, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {name: HFLM(pretrained=path, device="cpu", batch_size=1, **extra).model(ids).logits
                  for name, path, extra in (("base", base, {}), ("peft", base, {"peft": str(adapter)}),
                                            ("merged", str(merged_dir), {}))}
    assert float((logits["peft"] - logits["merged"]).abs().max()) < 1e-4
    assert float((logits["peft"] - logits["base"]).abs().max()) > 1e-3


def test_cpu_batch_sized_to_the_memory_budget_scores_the_same(run_dir, scored_elsewhere):
    """On CPU, ``--batch-size auto`` sizes lm-eval's batches to ``--memory-gb``. The in-training scorer (budget auto:
    half the machine's available memory) put the tiny model's requests in batches of 64, lm-eval's cap; the merged
    model's score in ``scored_elsewhere`` (``SMALL_BUDGET``) had smaller batches, growing as the requests got
    shorter. Both score what a fixed batch scores, to the last digit: lm-eval's CLI at batch 16 (the parity test
    above compares all three)."""
    ours = json.loads((run_dir / "checkpoints" / "step-2" / "mmlu.json").read_text())
    in_training = json.loads((run_dir / "checkpoints" / "step-2" / "mmlu_lm_eval.json").read_text())["config"]
    assert in_training["batch_size"] == "auto" and in_training["batch_sizes"] == [64]
    assert "MMLU batch 64 for requests of " in (run_dir / "mmlu.log").read_text()

    proc, merged = scored_elsewhere.merged_eval, scored_elsewhere.merged
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [int(x.split()[x.split().index("batch") + 1]) for x in proc.stdout.splitlines() if "MMLU batch" in x]
    sizes = json.loads((merged / "mmlu_lm_eval.json").read_text())["config"]["batch_sizes"]
    assert sizes == said and sizes == sorted(sizes) and max(sizes) < 64, proc.stdout[-3000:]
    budgeted = json.loads((merged / "mmlu.json").read_text())
    assert (budgeted["acc"], budgeted["acc_stderr"], budgeted["subjects"]) == \
        (ours["acc"], ours["acc_stderr"], ours["subjects"])


def test_offline_without_being_told(scored_elsewhere):
    """No HF_*_OFFLINE in the environment and an unreachable hub: eval/mmlu.py sets offline mode itself (its
    scoring of the merged model in ``scored_elsewhere``)."""
    env, proc = scored_elsewhere.merged_env, scored_elsewhere.merged_eval
    assert not {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"} & set(env) and env["HF_ENDPOINT"] == "http://127.0.0.1:9"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (scored_elsewhere.merged / "mmlu.json").is_file()


# ----------------------------------------------------------------------------------------------------------
# Scoring during training, and the watcher


def test_training_scores_each_checkpoint_once_and_prints_the_table(scored_run, tmp_path):
    """The base model (step 0) and each checkpoint are scored once, while the run trains (rank 0's background
    eval/watch.py --once); with a held-out set, the table and the plot carry the validation loss of each scored
    step; checkpoints/best names the best; a resumed run appends to val.jsonl from its checkpoint on, and trackers
    that fail there (TensorBoard's directory is a file, W&B's server unreachable) are a warning line each."""
    out, stdout = scored_run
    assert "# MMLU by checkpoint" in stdout and "Best checkpoint: **step-" in stdout
    rows = [json.loads(line) for line in (out / "mmlu.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows) == [0, 1, 2] and len(read_metrics(out)) == 2
    assert (out / "base" / "mmlu.json").is_file() and "| 0 (base model) |" in stdout
    assert all(0 <= r["acc"] <= 1 and set(r) >= {"acc_stderr", "stem", "humanities", "social_sciences", "other"}
               for r in rows)
    val = {r["step"]: r["val_loss"] for r in map(json.loads, (out / "val.jsonl").read_text().splitlines())}
    assert sorted(val) == [0, 1, 2] and val[2] < val[0]
    table = stdout[stdout.index("# MMLU by checkpoint"):]
    assert "val loss |" in table.splitlines()[2]
    for step in (1, 2):
        line = next(x for x in table.splitlines() if x.startswith(f"| {step} "))
        assert line.rstrip(" |").endswith(f"{val[step]:.4f}"), line
    png = (out / "mmlu.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    import matplotlib.image

    assert matplotlib.image.imread(out / "mmlu.png").shape[2] in (3, 4)
    best = max((r for r in rows if r["step"] > 0), key=lambda r: (r["acc"], -r["step"]))
    assert f"Best checkpoint: **step-{best['step']}**" in (out / "mmlu.md").read_text()
    assert (out / "checkpoints" / "best").read_text() == f"step-{best['step']}\n"
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")

    # a row past the checkpoint (as a run stopped between evaluation and save would leave) is recomputed; on a
    # copy, as the other tests read the run
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    with open(resumed / "val.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "val_loss": 9.0, "val_tokens": 1}) + "\n")
    (resumed / "tensorboard").write_text("not a directory")
    unreachable = {"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
                   "WANDB_INIT_TIMEOUT": "5"}
    proc = run_train([f"output_dir={resumed}", *TRAIN_ARGS, "train.max_steps=3", "eval.mmlu.every_checkpoint=false",
                      "logging.tensorboard=true", "logging.wandb=true"], env=unreachable)
    for name in ("TensorBoard", "W&B"):
        warned = [x for x in proc.stdout.splitlines() if x.startswith(f"warning: {name} logging is off for this run")]
        assert len(warned) == 1 and "metrics.jsonl is unaffected" in warned[0], proc.stdout[-3000:]
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3] and "Traceback" not in proc.stderr
    steps = [json.loads(line)["step"] for line in (resumed / "val.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    assert json.loads((resumed / "val.jsonl").read_text().splitlines()[-1])["val_loss"] < 9.0


def test_watcher_never_scores_a_checkpoint_twice(run_dir):
    """eval/watch.py on a run whose checkpoints the in-training scorer (the same script, the same setting) has
    scored: it scores nothing again, and a scorer stopped between mmlu.json and mmlu.jsonl has its rows recorded,
    still without scoring."""
    stamps = {p: p.stat().st_mtime_ns for p in [*run_dir.glob("checkpoints/step-*/mmlu.json"),
                                                   run_dir / "base" / "mmlu.json"]}
    assert len(stamps) == 3
    again = run(WATCH + ["--run", str(run_dir), "--once", *QUICK])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "# MMLU by checkpoint" in again.stdout
    assert [json.loads(x)["step"] for x in (run_dir / "mmlu.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # A scorer stopped between mmlu.json and mmlu.jsonl: the next pass records the row without scoring again.
    lines = (run_dir / "mmlu.jsonl").read_text().splitlines()
    (run_dir / "mmlu.jsonl").write_text("".join(line + "\n" for line in lines[:1]))
    again = run(WATCH + ["--run", str(run_dir), "--once", *QUICK])
    assert again.returncode == 0 and sorted(r["step"] for r in (json.loads(x) for x in
                                            (run_dir / "mmlu.jsonl").read_text().splitlines())) == [0, 1, 2]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no mmlu.json


def test_no_data_fails_at_once_and_says_how_to_get_it(run_dir, tmp_path):
    ckpt = copy_checkpoint(run_dir, 1, tmp_path / "step-1")
    t0 = time.monotonic()
    proc = run(EVAL + ["--checkpoint", str(ckpt)], timeout=120)
    line = error_line(proc)
    assert "no MMLU data" in line and "huggingface-cli download cais/mmlu" in line and "--mmlu-data" in line
    assert time.monotonic() - t0 < 60 and not (ckpt / "mmlu.json").exists()


def test_checkpoint_without_adapter(run_dir, tmp_path):
    ckpt = copy_checkpoint(run_dir, 1, tmp_path / "step-1")
    shutil.rmtree(ckpt / "adapter")
    line = error_line(run(EVAL + ["--checkpoint", str(ckpt), *QUICK]))
    assert "has no adapter" in line and not (ckpt / "mmlu.json").exists()


def test_adapter_for_a_different_base(run_dir, tmp_path, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, other / f.name)
    ckpt = copy_checkpoint(run_dir, 1, tmp_path / "step-1")
    line = error_line(run(EVAL + ["--checkpoint", str(ckpt), "--base", str(other), *QUICK]))
    assert "does not fit the base model" in line and not (ckpt / "mmlu.json").exists()


def _broken_copy(tmp_path: Path, how: str) -> Path:
    data = tmp_path / "mmlu"
    shutil.copytree(builtin.SAMPLE, data)
    if how == "missing subject":
        shutil.rmtree(data / "virology")
    else:
        rows = builtin.sample_rows()
        rows["anatomy"]["test"][1]["answer"] = 7
        builtin.write_hub_layout({"anatomy": rows["anatomy"]}, tmp_path / "one")
        shutil.copy(tmp_path / "one" / "anatomy" / "test-00000-of-00001.parquet",
                    data / "anatomy" / "test-00000-of-00001.parquet")
    return data


@pytest.mark.parametrize("how,needle", [("missing subject", "subject 'virology' has no dev split"),
                                        ("malformed row", "anatomy/test-00000-of-00001.parquet row 1: 'answer'")])
def test_bad_mmlu_directory(run_dir, tmp_path, how, needle):
    ckpt = copy_checkpoint(run_dir, 1, tmp_path / "step-1")
    data = _broken_copy(tmp_path, how)
    line = error_line(run(EVAL + ["--checkpoint", str(ckpt), "--mmlu-data", str(data), "--limit", "1"]))
    assert needle in line and not (ckpt / "mmlu.json").exists()


def test_scorer_gets_its_own_gpu_or_none(monkeypatch):
    """The background scorer never inherits the training GPUs: cuda:N is GPU N of the node as the launcher lists
    them, seen by the scorer as its only GPU; cpu hides every GPU."""
    from pipeline.errors import UserError
    from pipeline.eval.scorer import check_device, scorer_env

    env, device = scorer_env("cuda:2", {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "RANK": "0", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and device == "cuda:0" and "RANK" not in env and env["PATH"] == "/bin"
    env, device = scorer_env("cuda:1", {})
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and device == "cuda:0"
    env, device = scorer_env("cpu", {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "" and device == "cpu"

    check_device("cpu", on_gpu=False, active=True)
    check_device("cuda:9", on_gpu=False, active=False)  # not scoring: nothing to check
    with pytest.raises(UserError, match="trains on CPU"):
        check_device("cuda:0", on_gpu=False, active=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    check_device("cuda:1", on_gpu=True, active=True)
    with pytest.raises(UserError, match=r"has 2 GPU\(s\) \(cuda:0..cuda:1\)"):
        check_device("cuda:2", on_gpu=True, active=True)


def test_a_rewritten_local_copy_gets_its_own_datasets_cache(tmp_path, monkeypatch):
    """Offline, ``datasets`` caches a local directory under its name alone and kept scoring the first copy of a
    rewritten sample; the scorer's cache is keyed by the files, so a changed file is a new cache, and lm-eval is
    told to use it (``dataset_kwargs.cache_dir`` in the group it scores)."""
    import shutil

    import yaml

    from pipeline.eval.score import datasets_cache, group_yaml

    monkeypatch.setenv("LORAPLUS_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "mmlu_sample"
    shutil.copytree(builtin.SAMPLE, copy)
    first = datasets_cache(copy)
    assert datasets_cache(copy) == first and first.parent == tmp_path / "cache" / "mmlu-datasets"
    rows = builtin.sample_rows()
    rows["anatomy"]["test"][0] = dict(rows["anatomy"]["test"][0], answer=(rows["anatomy"]["test"][0]["answer"] + 1) % 4)
    builtin.write_hub_layout(rows, copy)
    assert datasets_cache(copy) != first
    group = yaml.safe_load(group_yaml(copy, datasets_cache(copy)))
    assert group["task"][0]["dataset_kwargs"] == {"cache_dir": str(datasets_cache(copy))}
    assert group["task"][0]["dataset_path"] == str(copy)
