#!/usr/bin/env python
"""The loss's memory on a large vocabulary: the chunked loss (``train.loss_chunk``, the default) against the
full-logits loss (``train.loss_chunk=0``), same run otherwise.

    python bench/loss_memory.py            # 3 cases x 2 losses, 4 steps each (~12 min on 2 cores)

The shape of issue 13: a 2-layer width-64 Llama with Llama-3's 128,256-token vocabulary (``model.random_init``),
4 packed rows of 1024 tokens a step, one process, ZeRO-2. Cases: the bundled instruction data in fp32 and in bf16
(19% of its packed tokens carry loss: the chunked loss computes logits for those only), and the same text with every
token labelled (``data.format=text``, fp32: the chunks then cover every position). Per run: ``mem_peak_gb`` (the
training peak the loop records, ``pipeline/observe/memory.py``), the losses, and the step time. The model is tiny so that
nearly all of the peak is the loss. Results: ``bench/results/loss_memory.json`` and ``.md``, quoted in
``bench/README.md``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
SHAPE = ["model.random_init=true", "model.shape.hidden_size=64", "model.shape.num_hidden_layers=2",
         "model.shape.num_attention_heads=4", "model.shape.num_key_value_heads=2", "model.shape.intermediate_size=128",
         "model.shape.vocab_size=128256", "model.shape.max_position_embeddings=2048"]
RUN = ["train.micro_batch_size=4", "train.seq_len=1024", "data.packing=true", "eval.mmlu.every_checkpoint=false",
       "optim.lr=1e-3", "seed=3"]


CASES = [("instruction", "fp32"), ("instruction", "bf16"), ("text", "fp32")]


def text_copy(work: Path) -> Path:
    """The bundled samples as plain text (every token labelled)."""
    from pipeline.data.builtin import BUNDLED_DATA

    path = work / "text.jsonl"
    with open(BUNDLED_DATA) as src, open(path, "w") as dst:
        for line in src:
            r = json.loads(line)
            dst.write(json.dumps({"text": f"{r['instruction']} {r['input']} {r['output']}"}) + "\n")
    return path


def one_run(work: Path, data: str, precision: str, chunk: int, steps: int) -> dict:
    out = work / f"{data}-{precision}-{chunk}"
    extra = [f"data.path={text_copy(work)}", "data.format=text"] if data == "text" else []
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--overwrite", f"output_dir={out}", *SHAPE, *RUN,
           *extra, f"train.max_steps={steps}", f"train.precision={precision}", f"train.loss_chunk={chunk}",
           "train.save_every=0"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
    return {"data": data, "precision": precision, "loss_chunk": chunk, "label_tokens": rows[0]["label_tokens"],
            "mem_peak_gb": max(r["mem_peak_gb"] for r in rows), "losses": [r["loss"] for r in rows],
            "tokens_per_step": rows[0]["tokens"],
            "median_step_s": round(median(times), 3) if times else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cases", default=",".join(f"{d}:{p}" for d, p in CASES), help="data:precision,...")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "loss_memory"))
    args = p.parse_args()
    cases = [tuple(c.split(":")) for c in args.cases.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for data, precision in cases:
            for chunk in (1024, 0):
                r = one_run(Path(tmp), data, precision, chunk, args.steps)
                print(json.dumps(r), flush=True)
                results.append(r)
    lines = ["| data (label tokens / step) | precision | loss | mem_peak_gb | median step (s) | losses |",
             "|---|---|---|---:|---:|---|"]
    for r in results:
        kind = f"chunked ({r['loss_chunk']} tokens)" if r["loss_chunk"] else "full logits"
        lines.append(f"| {r['data']} ({r['label_tokens']:,} of {r['tokens_per_step']:,}) | {r['precision']} | {kind} | "
                     f"{r['mem_peak_gb']:.2f} | {r['median_step_s']} | {', '.join(f'{x:.5f}' for x in r['losses'])} |")
    lines.append("")
    for data, precision in cases:
        a, b = (next(r for r in results if (r["data"], r["precision"], r["loss_chunk"]) == (data, precision, c))
                for c in (1024, 0))
        diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        lines.append(f"- {data}, {precision}: largest loss difference chunked vs full {diff:.2e}; peak "
                     f"{a['mem_peak_gb']:.2f} vs {b['mem_peak_gb']:.2f} GiB; step {a['median_step_s']} vs "
                     f"{b['median_step_s']} s.")
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
