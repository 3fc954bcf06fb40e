#!/usr/bin/env python
"""The CPU scorer's peak memory: MMLU 5-shot on long prompts, with the batch sized to a memory budget.

    python bench/score_memory.py               # calibration + 4 scoring runs (~20 min on 2 cores)
    python bench/score_memory.py --cases smollm2-long --limit 1 --no-calibrate     # one run
    python bench/score_memory.py --quick       # the 128k-vocab model 0-shot on the bundled sample: the bench runs

lm-eval keeps [batch, tokens, vocab] logits and their log_softmax; ``eval/mmlu.py --batch-size auto`` on CPU sizes
each batch to ``--memory-gb`` (``pipeline/eval/score.py``, ``MemoryBudgetHFLM``). This measures it:

- **calibration**: two batches of forward + lm-eval's ``log_softmax`` in a row (lm-eval holds one batch's output
  while it computes the next) at a few [batch, tokens] shapes, each in a child process of its own, the rise of its
  peak resident memory per token against ``TokenCost``'s formula (before its margin);
- **scoring**: ``eval/mmlu.py`` in a child process, its peak RSS from ``os.wait4`` (``ru_maxrss``): SmolLM2-135M
  (49,152 vocab) and a random 2-layer Llama with Llama-3's 128,256 vocab and SmolLM2's tokenizer, 5-shot on a
  long-prompt stand-in of MMLU, at ``--memory-gb 4``; and SmolLM2 0-shot on the bundled sample at the old fixed
  batch of 32 against the budget (the only place a fixed 32 is safe to run here: short prompts).

The long stand-in is the bundled sample with MMLU's three long subjects (high_school_european_history, _us_history,
_world_history) replaced by generated questions on passages of about 600 tokens, as in the real ones: 5-shot
prompts of about 3,600 tokens (SmolLM2's tokenizer). What a fixed batch of 32 would hold on it is estimated from
the formula, not run.
Results: ``bench/results/score_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data import builtin  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GIB = 2 ** 30
LONG_SUBJECTS = ("high_school_european_history", "high_school_us_history", "high_school_world_history")
CASES = {  # name: (model, data, shots, eval/mmlu.py options)
    "smollm2-long": ("smollm2", "long", 5, ["--batch-size", "auto", "--memory-gb", "4"]),
    "vocab128k-long": ("vocab128k", "long", 5, ["--batch-size", "auto", "--memory-gb", "4"]),
    "smollm2-sample-fixed32": ("smollm2", "sample", 0, ["--batch-size", "32"]),
    "smollm2-sample-budget": ("smollm2", "sample", 0, ["--batch-size", "auto", "--memory-gb", "4"]),
    "vocab128k-sample": ("vocab128k", "sample", 0, ["--batch-size", "auto", "--memory-gb", "2"]),  # --quick
}
DEFAULT_CASES = ("smollm2-long", "vocab128k-long", "smollm2-sample-fixed32", "smollm2-sample-budget")
CALIBRATION = {"smollm2": [(1, 2000), (2, 1000)], "vocab128k": [(1, 3000), (2, 1500)],
               "deep512": [(1, 2000), (4, 1000)]}  # deep512: 30 layers of SmolLM2's width, a 512 vocab (KV-heavy)


# ----------------------------------------------------------------------------------------------------------
# Models and data


def model_dir(name: str, work: Path) -> Path:
    """A directory of its own for each model (``eval/mmlu.py`` writes ``mmlu.json`` into it): SmolLM2 as links to
    ``pipeline.model.gguf.ensure_smollm2``'s files; the others random, with SmolLM2's tokenizer."""
    from pipeline.model.gguf import ensure_smollm2

    smol = ensure_smollm2()
    out = work / name
    if out.is_dir():
        return out
    out.mkdir(parents=True)
    if name == "smollm2":
        for f in smol.iterdir():
            (out / f.name).symlink_to(f)
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"vocab128k": {"vocab_size": 128256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2},
             "deep512": {"vocab_size": 512, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                         "num_attention_heads": 9, "num_key_value_heads": 3}}[name]
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=2, tie_word_embeddings=False)).save_pretrained(out)
    for f in smol.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


WORDS = ("assembly", "council", "merchants", "peasants", "clergy", "king", "parliament", "treaty", "charter", "reform",
         "taxes", "grain", "harbour", "colony", "empire", "republic", "revolution", "army", "navy", "bankers", "guilds",
         "artisans", "province", "frontier", "railway", "factory", "workers", "press", "pamphlet", "sermon",
         "petition", "decree", "tariff", "alliance", "congress", "senate", "governor", "delegates", "settlers",
         "plantation", "commerce", "liberty", "order", "crown", "nobility", "estates", "court", "ministry", "cabinet",
         "ambassador")
VERBS = ("debated", "rejected", "demanded", "praised", "feared", "opposed", "defended", "abolished", "proclaimed",
         "restored", "questioned", "financed", "resisted", "negotiated", "denounced", "welcomed")
PLACES = ("Paris", "London", "Vienna", "Boston", "Philadelphia", "Madrid", "Lisbon", "Delhi", "Canton", "Naples",
          "Amsterdam", "Geneva", "Prague", "Warsaw", "Lagos", "Lima")


def passage(rng: random.Random, sentences: int) -> str:
    """Source-text-like prose: sentences of period words, places and years."""
    out = []
    for _ in range(sentences):
        a, b, c = rng.sample(WORDS, 3)
        out.append(f"In {rng.randint(1500, 1950)} the {a} of {rng.choice(PLACES)} {rng.choice(VERBS)} the {b}, "
                   f"for the {c} had {rng.choice(VERBS)} the {rng.choice(WORDS)} and the {rng.choice(WORDS)} "
                   f"{rng.choice(VERBS)} what the {rng.choice(WORDS)} of {rng.choice(PLACES)} once held.")
    return " ".join(out)


def long_question(rng: random.Random) -> dict:
    text = passage(rng, 16)
    choices = [f"The {rng.choice(WORDS)} {rng.choice(VERBS)} the {rng.choice(WORDS)} of {rng.choice(PLACES)}"
               for _ in range(4)]
    return {"question": f"This question refers to the following information.\n{text}\nThe passage above is best "
                        f"understood as evidence of which of the following?", "choices": choices,
            "answer": rng.randrange(4)}


def long_standin(out: Path) -> Path:
    """The bundled sample (57 subjects, 5 dev / 1 validation / 4 test) with the three long subjects' questions
    replaced by passage questions, in the hub layout (``pipeline.data.builtin.write_hub_layout``)."""

    rows = builtin.sample_rows()
    rng = random.Random(0)
    for subject in LONG_SUBJECTS:
        rows[subject] = {split: [long_question(rng) for _ in rows[subject][split]] for split in rows[subject]}
    builtin.write_hub_layout(rows, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Measuring


def peak_of(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float, int]:
    """Run ``cmd`` as a child process; (exit code, wall seconds, its peak resident memory in bytes, from
    ``os.wait4``'s ``ru_maxrss``: this child's own, not the largest of every child so far)."""
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - started, usage.ru_maxrss * 1024


def calibrate_child(model: Path, batch: int, tokens: int) -> None:
    """In a child of its own (no allocator history): the rise of peak RSS per token over two batches of
    ``out = log_softmax(model(x).logits)`` in a row (lm-eval's loglikelihood step: it holds one batch's ``out``
    while it computes the next), against ``TokenCost``. Prints one JSON line."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from pipeline.eval.score import TokenCost, resident_bytes

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for p in m.parameters():  # into anonymous memory: weights mapped from the file could be evicted and read again
        p.data = p.data.clone()  # while measuring (the machine is shared), which would count as the batch's
    cost = TokenCost.of(m.config, 4)
    with torch.no_grad():
        m(torch.ones(1, 64, dtype=torch.long))  # thread pools up
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = resident_bytes()
    with torch.no_grad():
        for _ in range(2):  # the first batch's `out` is held until the second's is computed, as in lm-eval
            out = F.log_softmax(m(torch.ones(batch, tokens, dtype=torch.long)).logits, dim=-1)
        del out
    peak = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    per_token = (peak - base) / (batch * tokens)
    print(json.dumps({"batch": batch, "tokens": tokens, "measured_per_token": round(per_token),
                      "formula_per_token": cost.formula, "ratio": round(per_token / cost.formula, 3),
                      "with_margin": cost.per_token}), flush=True)


def calibrate(name: str, work: Path) -> list[dict]:
    rows = []
    for batch, tokens in CALIBRATION[name]:
        cmd = [sys.executable, __file__, "--calibrate-child", str(model_dir(name, work)), str(batch), str(tokens)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"calibration of {name} failed:\n{proc.stderr[-3000:]}")
        rows += [{"model": name, **json.loads(line)} for line in proc.stdout.splitlines() if line.startswith("{")]
    return rows


BATCH_LINE = re.compile(r"MMLU batch (\d+) for requests of ([\d,]+) tokens")
RESIDENT = re.compile(r"([\d.]+) GiB resident before the first batch")


def score_case(name: str, work: Path, limit: int) -> dict:
    model, data, shots, options = CASES[name]
    mdir = model_dir(model, work)
    for f in ("mmlu.json", "mmlu_lm_eval.json"):
        (mdir / f).unlink(missing_ok=True)
    data_arg = "sample" if data == "sample" else str(long_standin(work / "mmlu_long"))
    cmd = [sys.executable, str(REPO / "eval" / "mmlu.py"), "--checkpoint", str(mdir), "--mmlu-data", data_arg,
           "--num-fewshot", str(shots), "--limit", str(limit), "--device", "cpu", *options]
    log = work / f"{name}.log"
    rc, wall, peak = peak_of(cmd, log, {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"})
    text = log.read_text()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {rc}:\n{text[-3000:]}")
    summary = json.loads((mdir / "mmlu.json").read_text())
    config = json.loads((mdir / "mmlu_lm_eval.json").read_text())["config"]
    plan = [(int(b), int(t.replace(",", ""))) for b, t in BATCH_LINE.findall(text)]
    from transformers import AutoConfig

    from pipeline.eval.score import TokenCost

    cfg = AutoConfig.from_pretrained(mdir)
    return {"case": name, "model": model, "vocab": cfg.vocab_size, "data": data, "num_fewshot": shots,
            "limit": limit, "options": " ".join(options), "peak_rss_gib": round(peak / GIB, 3),
            "wall_s": round(wall, 1), "acc": summary["acc"], "lm_eval_batch_sizes": config["batch_sizes"],
            "batches": [{"rows": b, "longest_tokens": t} for b, t in plan],
            "resident_before_first_batch_gib": float(RESIDENT.findall(text)[0]) if RESIDENT.findall(text) else None,
            "per_token_bytes": TokenCost.of(cfg, 4).formula,
            "warnings": [x[x.index("warning: MMLU"):] for x in text.splitlines() if "warning: MMLU" in x],
            "command": " ".join(["python", "eval/mmlu.py", "--checkpoint", f"<{model}>", "--mmlu-data",
                                 "sample" if data == "sample" else "<long stand-in>", *cmd[6:]])}


def fixed_estimate(r: dict, rows: int = 32) -> dict:
    """What a fixed batch of ``rows`` would add on ``r``'s data: ``rows`` requests padded to the longest, at
    ``TokenCost``'s formula (no margin): an estimate, from the formula, not a measurement."""
    longest = max(b["longest_tokens"] for b in r["batches"])
    logits = rows * longest * r["per_token_bytes"]
    return {"case": r["case"], "rows": rows, "longest_tokens": longest,
            "logits_gib": round(logits / GIB, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--limit", type=int, default=2, help="questions per subject (default 2: 6 long prompts)")
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--quick", action="store_true", help="--cases vocab128k-sample --limit 1 --no-calibrate (~1 min)")
    p.add_argument("--calibrate-child", nargs=3, metavar=("MODEL", "BATCH", "TOKENS"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "score_memory"))
    args = p.parse_args()
    if args.calibrate_child:
        calibrate_child(Path(args.calibrate_child[0]), int(args.calibrate_child[1]), int(args.calibrate_child[2]))
        return
    if args.quick:
        args.cases, args.limit, args.no_calibrate = "vocab128k-sample", 1, True
    started = time.perf_counter()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    calibration, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.no_calibrate:
            for name in CALIBRATION:
                for row in calibrate(name, work):
                    print(json.dumps(row), flush=True)
                    calibration.append(row)
        for name in cases:
            r = score_case(name, work, args.limit)
            print(json.dumps(r), flush=True)
            runs.append(r)
    estimates = [fixed_estimate(r) for r in runs if r["data"] == "long"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    header = (f"python bench/score_memory.py --cases {','.join(cases)} --limit {args.limit}"
              f"{' --no-calibrate' if args.no_calibrate else ''} — {time.strftime('%Y-%m-%d')}, {machine}, "
              f"{(time.perf_counter() - started) / 60:.1f} min")
    lines = [header, ""]
    if calibration:
        lines += ["| model | batch x tokens | measured bytes/token | formula | measured / formula |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {c['model']} | {c['batch']} x {c['tokens']:,} | {c['measured_per_token']:,} | "
                  f"{c['formula_per_token']:,} | {c['ratio']:.3f} |" for c in calibration]
        lines.append("")
    lines += ["| case | vocab | shots | options | peak RSS (GiB) | batches (rows x longest tokens) | acc | wall (s) |",
              "|---|---:|---:|---|---:|---|---:|---:|"]
    for r in runs:
        plan = ", ".join(f"{b['rows']} x {b['longest_tokens']:,}" for b in r["batches"]) or "fixed"
        lines.append(f"| {r['case']} | {r['vocab']:,} | {r['num_fewshot']} | `{r['options']}` | "
                     f"{r['peak_rss_gib']:.2f} | {plan} | {r['acc']:.4f} | {r['wall_s']} |")
    lines.append("")
    for e in estimates:
        lines.append(f"- {e['case']}, a fixed batch of {e['rows']} instead (estimate from the formula, not run): "
                     f"{e['rows']} x {e['longest_tokens']:,} tokens x the formula's bytes a token (the logits, their "
                     f"log_softmax, the previous batch's) = {e['logits_gib']} GiB on top of the model.")
    Path(args.out + ".json").write_text(json.dumps({"command": header, "calibration": calibration, "runs": runs,
                                                    "fixed_batch_estimates": estimates}, indent=1) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
