"""The benchmarks' quick modes: each bench runs end to end, and what it reports is checked where it can be
(the speed-ups and ratios themselves are for bench/README.md, not for a test on a shared 2-core machine)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def bench(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, (f"bench/{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc


def test_convergence_quick(tmp_path):
    out = tmp_path / "convergence"
    bench("convergence.py", "--quick", "--out", str(out))
    res = json.loads(out.with_suffix(".json").read_text())
    (width, w), = res["widths"].items()
    assert set(w["methods"]) == {"1.0", "16.0"}
    for m in w["methods"].values():
        (losses,) = m["losses"]
        assert len(losses) == res["config"]["steps"] and all(math.isfinite(x) for x in losses)
        assert losses[-1] < losses[0]  # the fine-tune learns
        assert 1 <= m["steps_to_target"] <= res["config"]["steps"]
    assert w["methods"]["1.0"]["speedup"] == 1.0
    assert "| 128 | LoRA+ (lambda 16) |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_overhead_quick_same_math_as_the_hf_trainer(tmp_path):
    """Ours and the HF Trainer + PEFT's LoRA+ optimizer, 2 ranks, ZeRO-2, the same batches: the same losses step
    for step (fp32 on CPU; the only differences are summation order), and the baseline kept lr_B = 16 x lr_A."""
    out = tmp_path / "overhead"
    bench("overhead.py", "--quick", "--out", str(out), "optim.lr=1e-3")
    res = json.loads(out.with_suffix(".json").read_text())
    s = res["summary"]
    ours, base = (next(r for r in res["runs"] if r["side"] == side) for side in ("ours", "baseline"))
    assert len(ours["losses"]) == len(base["losses"]) == res["steps"]
    assert ours["losses"][-1] != ours["losses"][0]  # training moved the loss (the comparison is not vacuous)
    assert s["max_loss_diff"] < 1e-4, (ours["losses"], base["losses"])
    assert s["baseline_lr_sets"] == [[1e-3, 1.6e-2]]
    assert s["ours_lr_sets"] == [[1e-3, 1.6e-2]]
    for side in ("ours", "baseline"):
        assert s[side]["median_step_s"] > 0 and s[side]["first_step_s"] > 1 and s[side]["peak_gb"] > 0.05
    assert "| median step time |" in out.with_suffix(".md").read_text()


def test_gpu_throughput_smoke_runs_on_cpu(tmp_path):
    """The GPU bench's machinery (launch, parse, table) on a small shape on a CPU rank, both sides."""
    out = tmp_path / "gpu_throughput"
    bench("gpu_throughput.py", "--smoke", "--zero", "3", "--ckpt", "on", "--mb", "2", "--sides", "ours", "baseline",
          "--out", str(out))
    rows = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["side"], r["status"]) for r in rows] == [("ours", "ok"), ("baseline", "ok")], \
        "\n".join(f"{r['side']}: {r['status']}\n{r.get('detail', '')}" for r in rows)
    assert all(r["tokens_per_s_per_gpu"] > 0 and r["seq"] == 128 and r["zero"] == 3 for r in rows)
    table = out.with_suffix(".md").read_text()
    assert "| smoke | 128 | on | 3 | 2 | ours |" in table and "| smoke | 128 | on | 3 | 2 | baseline |" in table


def test_gpu_throughput_refuses_the_full_sweep_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_throughput.py"), "--out",
                           str(tmp_path / "g")], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0 and "no CUDA GPU here" in proc.stderr and "Traceback" not in proc.stderr


def test_data_scale_quick(tmp_path):
    """The data bench end to end at 2,000 generated samples: two builds, a cold start that tokenises and a warm
    one that does not, per-rank memory of both ranks."""
    out = tmp_path / "ds"
    bench("data_scale.py", "--quick", "--work", str(tmp_path / "work"), "--out", str(out))
    r = json.loads(out.with_suffix(".json").read_text())
    row = r["sizes"]["2k"]
    assert [b["num_proc"] for b in row["builds"]] == [1, 2]
    assert row["builds"][0]["tokens"] == row["builds"][1]["tokens"] > 2000 * 100  # ~27 tokens a task, 34 tasks
    assert row["cold"]["tokenised"] and not row["warm"]["tokenised"] and not r["bundled"]["warm"]["tokenised"]
    for start in (row["cold"], row["warm"], r["bundled"]["warm"]):
        assert start["first_step_s"] > 0 and len(start["rss_gib"]) == 2 and all(0 < v < 8 for v in start["rss_gib"])
    assert "| 2k (2,000 samples) | warm cache |" in out.with_suffix(".md").read_text()


def test_toy_gradients_equal_autograd():
    """bench/toy.py writes the toy's gradients out by hand; one GD step of it equals autograd's."""
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    import toy

    width, ea, eb = 16, torch.tensor([0.01, 0.3]), torch.tensor([0.2, 0.05])
    x, y, xt, yt, w_in, w_out, a0, b0 = toy.draw(3, width)
    h, ht = torch.relu(x @ w_in.T), torch.relu(xt @ w_in.T)
    expect = []
    for k in range(2):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        loss = ((torch.relu(h @ a.T @ b.T) @ w_out[0] - y) ** 2).mean()
        ga, gb = torch.autograd.grad(loss, (a, b))
        a1, b1 = a - ea[k] * ga, b - eb[k] * gb
        expect.append(float(((torch.relu(ht @ a1.T @ b1.T) @ w_out[0] - yt) ** 2).mean()))
    got = toy.train_grid(3, width, ea.double(), eb.double(), 1, "gd", (1,), 8)[1]
    assert got.tolist() == pytest.approx(expect, rel=1e-4)
    assert got[0] != got[1]


def test_toy_quick(tmp_path):
    out = tmp_path / "toy"
    bench("toy.py", "--quick", "--out", str(out))
    r = json.loads(out.with_suffix(".json").read_text())
    for steps in ("steps_10", "steps_200"):
        best = r["part1"][steps]
        assert best["test_loss"] <= best["equal"]["test_loss"] and best["ratio"] == pytest.approx(
            best["eta_B"] / best["eta_A"])
    assert (tmp_path / "toy_heatmap.png").stat().st_size > 10_000
    p3 = r["part3"]  # per seed: the optimum, where eta_B diverges at its eta_A, and the paper's point
    assert [x["seed"] for x in p3["seeds"]] == [0, 1, 2]
    for x in p3["seeds"]:
        assert x["eta_A"] in p3["axis_a"] and x["eta_B"] in p3["axis_b"] and math.isfinite(x["best_test_loss"])
        assert x["best_test_loss"] == min(min(row) for row in x["test_loss"])
        assert x["edge_eta_B_at_best_eta_A"] is None or x["edge_eta_B_at_best_eta_A"] > x["eta_B"]
        assert x["edge_eta_A_at_best_eta_B"] is None or x["edge_eta_A_at_best_eta_B"] > x["eta_A"]
        assert x["largest_training_eta_A"] >= x["eta_A"]
    p4 = r["part4"]  # DoRA: a row per (width, lambda, magnitude ratio), each at its best lr_A
    assert {(x["lambda"], x["magnitude_ratio"]) for x in p4["rows"]} == {
        (lam, m) for lam in (1.0, 16.0) for m in p4["magnitude_ratios"]}
    assert all(math.isfinite(x["test_loss"]) and x["lr_A"] in p4["lr_grid"] for x in p4["rows"])


def test_family_quick(tmp_path, tiny_model_dir):
    """bench/family.py end to end, on the tiny model (the bench's own model is SmolLM2): a curve per method from
    step 0, and steps to the LoRA target computed from them."""
    out = tmp_path / "family"
    bench("family.py", "--quick", "--model", str(tiny_model_dir), "--out", str(out))
    r = json.loads(out.with_suffix(".json").read_text())
    rows = {x["method"]: x for x in r["rows"]}
    assert set(rows) == {"LoRA", "DoRA+LoRA+ l16"} and r["target_from"] == "LoRA"
    assert rows["LoRA"]["final_mean"] == pytest.approx(r["target"])
    for x in rows.values():
        assert list(x["curve"]) == ["0", "2", "4"] or list(x["curve"]) == [0, 2, 4]
    assert (tmp_path / "family.png").stat().st_size > 10_000


def test_score_engine_quick(tmp_path):
    """bench/score_engine.py on the tiny model: the engine and the background process score the same checkpoint of
    the same run to the same requests (the runs train identically), and the bench reports each score's cost and
    every process's peak memory."""
    out = tmp_path / "score_engine"
    bench("score_engine.py", "--quick", "--out", str(out), "--runs", str(tmp_path / "runs"))
    res = json.loads(out.with_suffix(".json").read_text())
    engine, process = res["runs"]["engine-ws2"], res["runs"]["process-ws2"]
    assert {"rank 0", "rank 1"} <= engine["peak_rss_gib"].keys() and "scorer" in process["peak_rss_gib"]
    assert all(engine["scores"][s]["pause_s"] > 0 for s in ("0", "2"))
    for step, cmp in res["comparisons"]["engine-ws2 vs process-ws2"].items():
        assert cmp["same_acc"] and cmp["largest_loglik_difference"] < 1e-4, (step, cmp)
    assert "largest difference" in out.with_suffix(".md").read_text()
