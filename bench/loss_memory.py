#!/usr/bin/env python
"""The loss's memory on a large vocabulary: the chunked loss (``train.loss_chunk``, the default) against the
full-logits loss (``train.loss_chunk=0``), same run otherwise.

    python bench/loss_memory.py            # fp32 and bf16, 4 steps each (~4 min on 2 cores)

The shape of issue 13: a 2-layer width-64 Llama with Llama-3's 128,256-token vocabulary (``model.random_init``),
4 packed rows of 1024 tokens a step, one process, ZeRO-2. Per run: ``mem_peak_gb`` (the training peak the loop
records, ``pipeline/memory.py``), the losses, and the step time. The model is tiny so that nearly all of the peak
is the loss. Results: ``bench/results/loss_memory.json`` and ``.md``, quoted in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parent.parent
SHAPE = ["model.random_init=true", "model.shape.hidden_size=64", "model.shape.num_hidden_layers=2",
         "model.shape.num_attention_heads=4", "model.shape.num_key_value_heads=2", "model.shape.intermediate_size=128",
         "model.shape.vocab_size=128256", "model.shape.max_position_embeddings=2048"]
RUN = ["train.micro_batch_size=4", "train.seq_len=1024", "data.packing=true", "eval.mmlu.every_checkpoint=false",
       "optim.lr=1e-3", "seed=3"]


def one_run(work: Path, precision: str, chunk: int, steps: int) -> dict:
    out = work / f"{precision}-{chunk}"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--overwrite", f"output_dir={out}", *SHAPE, *RUN,
           f"train.max_steps={steps}", f"train.precision={precision}", f"train.loss_chunk={chunk}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
    return {"precision": precision, "loss_chunk": chunk, "mem_peak_gb": max(r["mem_peak_gb"] for r in rows),
            "losses": [r["loss"] for r in rows], "tokens_per_step": rows[0]["tokens"],
            "median_step_s": round(median(times), 3) if times else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "loss_memory"))
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            for chunk in (1024, 0):
                r = one_run(Path(tmp), precision, chunk, args.steps)
                print(json.dumps(r), flush=True)
                results.append(r)
    lines = ["| precision | loss | mem_peak_gb | median step (s) | losses |", "|---|---|---|---|---|"]
    for r in results:
        kind = f"chunked ({r['loss_chunk']} tokens)" if r["loss_chunk"] else "full logits"
        lines.append(f"| {r['precision']} | {kind} | {r['mem_peak_gb']:.2f} | {r['median_step_s']} | "
                     f"{', '.join(f'{x:.5f}' for x in r['losses'])} |")
    for precision in args.precisions.split(","):
        a, b = (next(r for r in results if r["precision"] == precision and r["loss_chunk"] == c) for c in (1024, 0))
        diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        lines.append(f"\n{precision}: largest loss difference chunked vs full {diff:.2e}; peak "
                     f"{a['mem_peak_gb']:.2f} vs {b['mem_peak_gb']:.2f} GiB.")
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
