#!/usr/bin/env python
"""LoRA, LoRA+, DoRA and DoRA with LoRA+ on a real model (SmolLM2-135M-Instruct): validation curves at each
method's best lr, over seeds, and the steps each takes to reach LoRA's final validation loss.

    python launch/import_gguf.py --smollm2          # once: the model as a safetensors directory
    python bench/family.py [--steps 40] [--seeds 0,1,2] [--workers 2] [--out bench/results/family_smollm2]
    python bench/family.py --quick                  # 2 methods, 1 lr, 1 seed, 4 steps: that it runs

Methods (``METHODS``): LoRA (lambda 1), LoRA+ lambda 4 and 16, DoRA (lambda 1), DoRA with LoRA+ (lambda 16) and
its magnitudes at ``--magnitude_ratios`` times lr_A. Each method runs its lr grid (lr_A) on the first seed; the
lr with the lowest final validation loss then runs on every seed. For DoRA with LoRA+, the magnitude ratio is
searched the same way: each ratio at each lr of the grid on the first seed.

Same data (the bundled tiny-instruct set through ``pipeline.data.prepared``: 48 held-out samples, the rest shuffled
by seed), same steps, same schedule (cosine, 5 warmup steps), r 16, alpha 32, fp32, AdamW (0.9, 0.999), clip 1.0.
The adapters and their param groups are the pipeline's own (``pipeline.model.lora.add_lora``,
``pipeline.optim.loraplus.param_groups``); the loop is a plain one process torch loop, no DeepSpeed (the engine's
numerics were compared with the HF Trainer's in ``bench/overhead.py``): this is about the methods, and one process
per run lets ``--workers`` runs share the machine.

Reported: per method, its grid (final validation loss on seed 0), its best lr, the validation loss at every
``--eval_every`` steps (mean and spread over seeds), and the steps to LoRA's final validation loss (mean over
seeds; linear interpolation between evaluations, so the resolution is ``--eval_every`` steps; "never" when the
mean curve does not reach it). ``OUT.json``, ``OUT.md``, ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SMOLLM2 = Path.home() / ".cache" / "loraplus" / "models" / "smollm2-135m-instruct"
LOW, HIGH = (3e-5, 1e-4, 3e-4), (1e-4, 3e-4, 1e-3)


@dataclass(frozen=True)
class Method:
    name: str
    ratio: float  # lambda = lr_B / lr_A
    dora: bool
    grid: tuple[float, ...]  # lr_A
    magnitude_ratio: float = 1.0


# lambda 1 needs a larger lr_A than lambda 16 for the same lr_B (the sweep in bench/README.md "A recipe for a real
# model" put lambda 16's best at 1e-4 of 3e-5..1e-3): each grid is three points around where it was expected to
# win; the table says when a best lies on a grid's edge.
METHODS = (Method("LoRA", 1.0, False, HIGH), Method("LoRA+ l4", 4.0, False, HIGH),
           Method("LoRA+ l16", 16.0, False, LOW), Method("DoRA", 1.0, True, HIGH),
           Method("DoRA+LoRA+ l16", 16.0, True, LOW))


@dataclass(frozen=True)
class Spec:
    method: Method
    lr: float
    seed: int
    steps: int
    micro: int
    eval_every: int
    n_val: int
    model: str
    threads: int


def _batch(rows, idx, pad_id):
    import torch

    from pipeline.data.formats import IGNORE_INDEX

    width = max(len(rows[i].input_ids) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for j, i in enumerate(idx):
        n = len(rows[i].input_ids)
        ids[j, :n] = torch.tensor(rows[i].input_ids)
        labels[j, :n] = torch.tensor(rows[i].labels)
        mask[j, :n] = 1
    return ids, labels, mask


def _loss_sum(model, ids, labels, mask):
    """Summed next-token loss over label tokens, and their count."""
    import torch

    from pipeline.data.formats import IGNORE_INDEX

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((target != IGNORE_INDEX).sum())


def _data(model_dir: str, n_val: int):
    from pipeline.config import DataConfig
    from pipeline.data.builtin import BUNDLED_DATA
    from pipeline.data.prepared import prepare
    from pipeline.model.load import load_tokenizer

    tok = load_tokenizer(model_dir)
    rows = prepare(DataConfig(path=str(BUNDLED_DATA)), tok, model_dir, 256, announce=False).train
    order = list(range(len(rows)))
    random.Random(1234).shuffle(order)  # the same held-out samples for every run, whatever its seed
    return rows, order[n_val:], order[:n_val], tok.pad_token_id


def run_one(spec: Spec) -> dict:
    """Train one (method, lr, seed) and return its validation curve."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.config import LoraConfig
    from pipeline.model.lora import add_lora
    from pipeline.optim import loraplus, schedule

    torch.set_num_threads(spec.threads)
    rows, train, val, pad_id = _data(spec.model, spec.n_val)
    m = spec.method
    model = AutoModelForCausalLM.from_pretrained(spec.model, dtype=torch.float32)
    model = add_lora(model, LoraConfig(r=16, alpha=32.0, use_dora=m.dora), spec.seed)
    rates = loraplus.LoraPlusRates(spec.lr, m.ratio, 1e-6, 0.0, m.magnitude_ratio)
    groups = loraplus.param_groups(model.named_parameters(), rates)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")} for g in groups],
                            betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.lr_lambda("cosine", 5, spec.steps, 0.0))
    order = list(train)
    random.Random(spec.seed).shuffle(order)
    trainable = [p for g in groups for p in g["params"]]

    def validate() -> float:
        model.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for k in range(0, len(val), 16):
                s, n = _loss_sum(model, *_batch(rows, val[k:k + 16], pad_id))
                total, tokens = total + float(s), tokens + n
        model.train()
        return total / tokens

    curve, losses, start = {0: validate()}, [], time.time()
    for step in range(1, spec.steps + 1):
        idx = [order[(step - 1) * spec.micro + j] for j in range(spec.micro)]
        s, n = _loss_sum(model, *_batch(rows, idx, pad_id))
        loss = s / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % spec.eval_every == 0 or step == spec.steps:
            curve[step] = validate()
            if not math.isfinite(curve[step]):
                break
    return {"method": m.name, "lr": spec.lr, "magnitude_ratio": m.magnitude_ratio, "seed": spec.seed,
            "val": curve, "train_loss": losses, "seconds": round(time.time() - start, 1)}


def steps_to(curve: dict[int, float], target: float) -> float | None:
    """First step at which the curve reaches ``target`` (linear between evaluations), or None."""
    points = sorted(curve.items())
    if points[0][1] <= target:
        return points[0][0]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v1 <= target:  # v0 > target here
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None


def mean_curve(runs: list[dict]) -> dict[int, float]:
    steps = sorted(set.intersection(*(set(int(k) for k in r["val"]) for r in runs)))
    return {s: sum(r["val"][s] if s in r["val"] else r["val"][str(s)] for r in runs) / len(runs) for s in steps}


def _final(run: dict) -> float:
    v = run["val"][max(run["val"], key=int)]
    return v if math.isfinite(v) else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SMOLLM2))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--eval_every", type=int, default=5)
    ap.add_argument("--n_val", type=int, default=48)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--magnitude_ratios", default="1,16")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated method names (default: all)")
    ap.add_argument("--grid", default="", help="comma-separated lr_A values replacing every method's grid")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="run nothing: summarise the runs these result files recorded (a grid extended, seeds "
                         "added), the grid's seed being the first of --seeds")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "family_smollm2"))
    args = ap.parse_args()
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"error: no model at {args.model}; build SmolLM2 with: python launch/import_gguf.py --smollm2")
    seeds = [int(s) for s in args.seeds.split(",")]
    mag_ratios = [float(x) for x in args.magnitude_ratios.split(",")]
    methods = [m for m in METHODS if not args.only or m.name in args.only.split(",")]
    if args.grid:
        methods = [Method(m.name, m.ratio, m.dora, tuple(float(x) for x in args.grid.split(",")), m.magnitude_ratio)
                   for m in methods]
    if args.quick:
        methods = [Method("LoRA", 1.0, False, (3e-4,)), Method("DoRA+LoRA+ l16", 16.0, True, (1e-4,))]
        args.steps, args.eval_every, args.n_val, seeds, mag_ratios = 4, 2, 8, [0], [1.0]
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    if args.merge:
        runs = [r for f in args.merge for d in [json.loads(Path(f).read_text())] for r in d["grid"] + d["seeds_runs"]]
        methods = [m for m in methods if any(r["method"] == m.name for r in runs)]
        report = summarise(methods, runs, seeds[0])
        report["setup"] = {**json.loads(Path(args.merge[0]).read_text())["setup"], "merged_from": args.merge,
                           "seeds": sorted({r["seed"] for r in runs})}
        write(report, [r for r in runs if r["seed"] == seeds[0]], [r for r in runs if r["seed"] != seeds[0]],
              Path(args.out))
        return

    def spec(m: Method, lr: float, seed: int) -> Spec:
        return Spec(m, lr, seed, args.steps, args.micro, args.eval_every, args.n_val, args.model, threads)

    def variants(m: Method) -> list[Method]:
        if not m.dora or m.ratio == 1.0:
            return [m]
        return [Method(m.name, m.ratio, m.dora, m.grid, r) for r in mag_ratios]

    clock = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        grid_specs = [spec(v, lr, seeds[0]) for m in methods for v in variants(m) for lr in m.grid]
        grid = list(pool.map(run_one, grid_specs))
        for r in grid:
            print(f"grid  {r['method']:16s} lr_A {r['lr']:.0e} mag {r['magnitude_ratio']:g}  final val "
                  f"{_final(r):.4f}  ({r['seconds']} s)", flush=True)
        chosen = {m.name: best_of_grid(m, grid, seeds[0]) for m in methods}
        seed_specs = [spec(Method(m.name, m.ratio, m.dora, m.grid, chosen[m.name][1]), chosen[m.name][0], s)
                      for m in methods for s in seeds[1:]]
        more = list(pool.map(run_one, seed_specs))
    for r in more:
        print(f"seed  {r['method']:16s} seed {r['seed']} final val {_final(r):.4f}  ({r['seconds']} s)", flush=True)
    report = summarise(methods, grid + more, seeds[0])
    report["setup"] = {**{k: v for k, v in vars(args).items() if k != "out"}, "seeds": seeds,
                       "magnitude_ratios": mag_ratios, "date": date.today().isoformat(), "threads_per_run": threads,
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores", "wall_s": round(time.time() - clock),
                       "methods": [asdict(m) for m in methods]}
    write(report, grid, more, Path(args.out))


def write(report: dict, grid: list[dict], more: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**report, "grid": grid, "seeds_runs": more}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {out}.json, .md, .png")


def best_of_grid(m: Method, runs: list[dict], grid_seed: int) -> tuple[float, float]:
    """(lr_A, magnitude ratio) of ``m``'s lowest final validation loss on the grid's seed."""
    top = min((r for r in runs if r["method"] == m.name and r["seed"] == grid_seed), key=_final)
    return top["lr"], top["magnitude_ratio"]


def summarise(methods, runs: list[dict], grid_seed: int) -> dict:
    """Each method at its best lr (and magnitude ratio) on the grid's seed, over every seed run there; the target
    is the first method's (LoRA's) mean final validation loss."""
    chosen, by_method = {}, {}
    for m in methods:
        chosen[m.name] = best_of_grid(m, runs, grid_seed)
        lr, mag = chosen[m.name]
        by_method[m.name] = sorted((r for r in runs if r["method"] == m.name and r["lr"] == lr
                                    and r["magnitude_ratio"] == mag), key=lambda r: r["seed"])
    lora = methods[0].name
    target = sum(_final(r) for r in by_method[lora]) / len(by_method[lora])
    rows = []
    for m in methods:
        lr, mag = chosen[m.name]
        mine = by_method[m.name]
        curve = mean_curve(mine)
        finals = [_final(r) for r in mine]
        mean = sum(finals) / len(finals)
        sd = math.sqrt(sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) if len(finals) > 1 else 0.0
        per_seed = [steps_to({int(k): v for k, v in r["val"].items()}, target) for r in mine]
        tried = [r for r in runs if r["method"] == m.name and r["seed"] == grid_seed]
        lrs = sorted({r["lr"] for r in tried})
        gridline = {f"{r['lr']:.0e}" + (f" m{r['magnitude_ratio']:g}" if m.dora and m.ratio != 1 else ""): _final(r)
                    for r in sorted(tried, key=lambda r: (r["magnitude_ratio"], r["lr"]))}
        rows.append({"method": m.name, "lambda": m.ratio, "dora": m.dora, "lr_A": lr,
                     "magnitude_ratio": mag if m.dora else None, "edge": len(lrs) > 1 and lr in (lrs[0], lrs[-1]),
                     "grid": gridline, "curve": curve, "final_mean": mean, "final_sd": sd,
                     "steps_to_target": steps_to(curve, target), "steps_to_target_per_seed": per_seed,
                     "seeds": [r["seed"] for r in mine]})
    return {"target": target, "target_from": lora, "rows": rows}


def markdown(report: dict) -> str:
    s = report.get("setup", {})
    lines = [f"# The LoRA family on SmolLM2-135M: {s.get('steps')} steps of {s.get('micro')} samples, "
             f"seeds {s.get('seeds')}", "",
             f"Target: {report['target_from']}'s final validation loss, mean over seeds: {report['target']:.4f}", "",
             "| method | lambda | lr_A (best of grid) | magnitude lr / lr_A | final val (mean ± sd) | steps to target "
             "(mean curve) | per seed | grid, seed 0: final val |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        st = "never" if r["steps_to_target"] is None else f"{r['steps_to_target']:.1f}"
        per = ", ".join("never" if x is None else f"{x:.1f}" for x in r["steps_to_target_per_seed"])
        grid = "; ".join(f"{k}: {v:.4f}" for k, v in r["grid"].items())
        mag = "" if r["magnitude_ratio"] is None else f"{r['magnitude_ratio']:g}"
        edge = " (grid edge)" if r["edge"] else ""
        lines.append(f"| {r['method']} | {r['lambda']:g} | {r['lr_A']:.0e}{edge} | {mag} | {r['final_mean']:.4f} ± "
                     f"{r['final_sd']:.4f} | {st} | {per} | {grid} |")
    lines += ["", "Validation loss (mean over seeds) at each evaluation:", "",
              "| method | " + " | ".join(f"@{k}" for k in report["rows"][0]["curve"]) + " |",
              "|---|" + "---|" * len(report["rows"][0]["curve"])]
    for r in report["rows"]:
        lines.append(f"| {r['method']} | " + " | ".join(f"{v:.4f}" for v in r["curve"].values()) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        xs, ys = zip(*sorted((int(k), v) for k, v in r["curve"].items()))
        ax.plot(xs, ys, marker="o", ms=3, label=f"{r['method']} (lr_A {r['lr_A']:.0e})")
    ax.axhline(report["target"], color="grey", ls="--", lw=1, label="LoRA's final")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title("SmolLM2-135M: the LoRA family at each method's best lr")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
