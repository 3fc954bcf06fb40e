#!/usr/bin/env python
"""LoRA+ against LoRA at growing width: steps to a target loss, final loss, speed-up (the paper's claim, small).

    python bench/convergence.py [--quick] [--out bench/results/convergence]

For each width (128, 256, 512 by default) a 4-layer Llama is pre-trained briefly on one synthetic language (a
Markov chain over made-up words), so that LoRA adapts a trained model and not noise. It is then fine-tuned on
another chain over the same words through the pipeline itself (``launch/train.py``: the DeepSpeed engine, the
LoRA+ groups, one process), with LoRA (lambda = 1) and LoRA+ (lambda = 4, 16), each at the best lr of a small grid
(chosen on seed 0 by final loss), then over 3 seeds at that lr.

Reported, per width: the target (LoRA's final smoothed loss, mean over seeds), each method's steps to reach it
(smoothed loss, mean over seeds; a seed that never reaches it counts as the full run), final loss and the speed-up
(LoRA's steps / the method's). Written to ``OUT.json``, ``OUT.md`` (the table) and ``OUT.png`` (loss curves per
width, and speed-up against width).

``--quick`` (CI): one width, one lr, one seed, few steps; it checks that the bench runs, not the speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ABORTS_AT_EXIT: list[str] = []
N_WORDS = 48
SEQ_WORDS = 24  # words per sample
MAX_LR_B = 0.1  # grid points with a larger lr_B are not run (see run())


def words(rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out: set[str] = set()
    while len(out) < N_WORDS:
        out.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 5))))
    return sorted(out)


def chain(seed: int, branching: int = 3) -> list[list[int]]:
    """A Markov chain over word indices: each word has ``branching`` possible successors."""
    rng = random.Random(seed)
    return [rng.sample(range(N_WORDS), branching) for _ in range(N_WORDS)]


def sample_texts(vocab: list[str], transitions: list[list[int]], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        w = rng.randrange(N_WORDS)
        seq = [w]
        for _ in range(SEQ_WORDS - 1):
            w = rng.choice(transitions[w])
            seq.append(w)
        texts.append(" ".join(vocab[i] for i in seq))
    return texts


def pretrain(width: int, texts: list[str], steps: int, out: Path) -> Path:
    """A 4-layer Llama of this width, trained (all weights) on the first language; saved as a model directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.model.tiny import ensure_tiny_model

    tiny = ensure_tiny_model()
    tok = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=width, num_hidden_layers=4, num_attention_heads=max(2, width // 64),
                         num_key_value_heads=max(2, width // 64), intermediate_size=int(width * 8 / 3) // 16 * 16,
                         vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    ids = [tok(t + tok.eos_token)["input_ids"] for t in texts]
    length = max(len(i) for i in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch_ids = torch.tensor([i + [pad] * (length - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ids), (16,), generator=g)
        labels = batch_ids[idx].masked_fill(mask[idx] == 0, -100)
        loss = model(input_ids=batch_ids[idx], attention_mask=mask[idx], labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def finetune(model_dir: Path, data: Path, out: Path, ratio: float, lr: float, seed: int,
             steps: int, threads: int = 0) -> list[float] | None:
    """One fine-tune through launch/train.py (one process, DeepSpeed ZeRO-0); the per-step losses, or None when
    the run diverged (the pipeline stops after 10 non-finite steps in a row). ``threads``: torch's intra-op
    threads for this process (0: torch's default)."""
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), f"output_dir={out}", "--overwrite",
           "--deepspeed_config", "deepspeed_configs/zero0.json", f"model.name_or_path={model_dir}",
           f"data.path={data}", "data.format=text", f"optim.lr={lr}", f"optim.loraplus_ratio={ratio}",
           f"seed={seed}", f"train.max_steps={steps}", "train.micro_batch_size=8", "train.seq_len=128",
           "schedule.name=constant", "lora.r=8", "lora.alpha=16", "eval.mmlu.every_checkpoint=false",
           "train.save_every=0"]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, check=False)
    if proc.returncode == 1 and "non-finite" in proc.stderr:
        return None  # diverged at this lr: out of the grid's running
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    if proc.returncode != 0:
        # Seen once in about 50 runs: every step done and saved, then "terminate called without an active
        # exception" as the process exits (an abort in a native thread's teardown). The losses are whole, so the
        # run counts; the abort is counted in the results and reported.
        if len(rows) == steps and "terminate called" in proc.stderr:
            ABORTS_AT_EXIT.append(" ".join(cmd[2:]))
        else:
            raise SystemExit(f"bench: a fine-tune failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return [r["loss"] if r["loss"] is not None else math.nan for r in rows]


def smooth(losses: list[float], k: int = 10) -> list[float]:
    return [sum(losses[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(losses))]


def _final(losses: list[float] | None) -> float:
    """Final smoothed loss; inf for a diverged run or one ending in NaN."""
    if not losses:
        return math.inf
    value = smooth(losses)[-1]
    return value if math.isfinite(value) else math.inf


def steps_to(losses: list[float], target: float) -> int:
    s = smooth(losses)
    return next((i + 1 for i, v in enumerate(s) if v <= target), len(s))


def run(args) -> dict:
    rng = random.Random(1234)
    vocab = words(rng)
    pre_texts = sample_texts(vocab, chain(1), 600, seed=1)
    task_texts = sample_texts(vocab, chain(2), 600, seed=2)
    work = args.out.parent / (args.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    data = work / "task.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in task_texts))
    results = {"widths": {}, "config": vars(args) | {"out": str(args.out)}}
    for width in args.widths:
        t0 = time.perf_counter()
        model_dir = pretrain(width, pre_texts, args.pretrain_steps, work / f"base-{width}")
        print(f"width {width}: pre-trained in {time.perf_counter() - t0:.0f} s", flush=True)
        jobs = ThreadPoolExecutor(args.jobs)  # independent fine-tunes side by side, one thread each by default
        slot = iter(range(10 ** 6))

        def tune(ratio: float, lr: float, seed: int) -> list[float] | None:
            return finetune(model_dir, data, work / f"run-{next(slot)}", ratio, lr, seed, args.steps, args.threads)

        # The grid, on seed 0. Points whose lr_B = lambda x lr_A exceeds MAX_LR_B are left out: in the first full
        # run every such point diverged (final loss at chance, bench/README.md), so they cost time and decide nothing.
        points = [(ratio, lr) for ratio in args.ratios for lr in args.lrs if ratio * lr <= MAX_LR_B]
        grid: dict[float, dict[float, list[float] | None]] = {ratio: {} for ratio in args.ratios}
        for (ratio, lr), losses in zip(points, jobs.map(lambda pt: tune(pt[0], pt[1], 0), points)):
            grid[ratio][lr] = losses
            print(f"  lambda {ratio:g} lr {lr:g}: " + (f"final {_final(losses):.4f}" if losses else "diverged"),
                  flush=True)
        best = {}
        for ratio in args.ratios:
            best[ratio] = min(grid[ratio], key=lambda lr: _final(grid[ratio][lr]))
            if math.isinf(_final(grid[ratio][best[ratio]])):
                raise SystemExit(f"bench: every lr of the grid diverged at width {width}, lambda {ratio:g}")
        more = [(ratio, s) for ratio in args.ratios for s in range(1, args.seeds)]
        seeded = dict(zip(more, jobs.map(lambda rs: tune(rs[0], best[rs[0]], rs[1]), more)))
        jobs.shutdown()
        per_method = {}
        for ratio in args.ratios:
            runs = [grid[ratio][best[ratio]]] + [seeded[(ratio, s)] for s in range(1, args.seeds)]
            if any(r is None for r in runs):
                raise SystemExit(f"bench: width {width}, lambda {ratio:g}, lr {best[ratio]:g} diverged on another seed")
            finals = {str(k): _final(v) for k, v in grid[ratio].items()}
            lrs = sorted(grid[ratio])
            per_method[ratio] = {"lr": best[ratio], "losses": runs, "lr_at_grid_edge": best[ratio] in (lrs[0], lrs[-1]),
                                 "grid_final": {k: (v if math.isfinite(v) else None) for k, v in finals.items()}}
        base = per_method[1.0] if 1.0 in per_method else next(iter(per_method.values()))
        target = sum(smooth(r)[-1] for r in base["losses"]) / len(base["losses"])
        for ratio, m in per_method.items():
            m["steps_to_target"] = sum(steps_to(r, target) for r in m["losses"]) / len(m["losses"])
            m["final"] = sum(smooth(r)[-1] for r in m["losses"]) / len(m["losses"])
        for ratio, m in per_method.items():
            m["speedup"] = base["steps_to_target"] / m["steps_to_target"]
        results["widths"][width] = {"target": target, "methods": {str(k): v for k, v in per_method.items()},
                                    "seconds": time.perf_counter() - t0}
        print(f"width {width}: target {target:.4f}; " + ", ".join(
            f"lambda {k:g}: {m['steps_to_target']:.0f} steps (x{m['speedup']:.2f}), final {m['final']:.4f}"
            for k, m in per_method.items()), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return results


def table(results: dict) -> str:
    lines = ["| width | method | lr_A (best of grid) | steps to target | speed-up vs LoRA | final loss |",
             "|---:|---|---:|---:|---:|---:|"]
    for width, w in results["widths"].items():
        for k, m in w["methods"].items():
            name = "LoRA" if float(k) == 1.0 else f"LoRA+ (lambda {float(k):g})"
            edge = " (grid edge)" if m.get("lr_at_grid_edge") else ""
            lines.append(f"| {width} | {name} | {m['lr']:g}{edge} | {m['steps_to_target']:.1f} | x{m['speedup']:.2f} | "
                         f"{m['final']:.4f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = list(results["widths"])
    fig, axes = plt.subplots(1, len(widths) + 1, figsize=(4.2 * (len(widths) + 1), 3.6))
    for ax, width in zip(axes, widths):
        w = results["widths"][width]
        for k, m in w["methods"].items():
            mean = [sum(v) / len(v) for v in zip(*(smooth(r) for r in m["losses"]))]
            ax.plot(range(1, len(mean) + 1), mean, label=("LoRA" if float(k) == 1.0 else f"LoRA+ λ={float(k):g}"))
        ax.axhline(w["target"], color="grey", lw=0.8, ls="--")
        ax.set_title(f"width {width}")
        ax.set_xlabel("step")
        ax.set_ylabel("smoothed loss (mean of seeds)")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for k in next(iter(results["widths"].values()))["methods"]:
        ax.plot([int(x) for x in widths], [results["widths"][x]["methods"][k]["speedup"] for x in widths], marker="o",
                label=("LoRA" if float(k) == 1.0 else f"LoRA+ λ={float(k):g}"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("speed-up to LoRA's final loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one width, lr, seed; few steps (CI)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "convergence")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                   help="fine-tunes run side by side (default: one per core, up to 8)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs)  # torch threads per fine-tune
    if args.quick:
        args.widths, args.ratios, args.lrs, args.seeds, args.steps, args.pretrain_steps = \
            [128], [1.0, 16.0], [1e-3], 1, 12, 30
    else:
        args.widths, args.ratios, args.lrs, args.seeds, args.steps, args.pretrain_steps = \
            [128, 256, 512], [1.0, 4.0, 16.0], [2.5e-4, 1e-3, 4e-3, 1.6e-2], 3, 80, 300
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run(args)
    results["date"] = date.today().isoformat()
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    results["seconds"] = time.perf_counter() - started
    results["command"] = "python bench/convergence.py" + (" --quick" if args.quick else "")
    results["aborts_at_exit"] = ABORTS_AT_EXIT
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    md = table(results)
    args.out.with_suffix(".md").write_text(
        f"{md}\n\n{results['command']} — {results['date']}, {results['machine']}, {results['seconds'] / 60:.1f} min\n")
    plot(results, args.out.with_suffix(".png"))
    print(md)
    print(f"wrote {args.out}.json, .md, .png in {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
