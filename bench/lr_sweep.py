#!/usr/bin/env python
"""A learning-rate sweep on a real model: the evidence behind a recipe's ``optim.lr``.

    python bench/lr_sweep.py --model DIR [--lrs 3e-5,1e-4,3e-4,1e-3] [--ratio 16] [--steps 40] [--nprocs 2]
                             [--out PATH] [key=value ...]

Each lr is one run of ``deepspeed launch/train.py`` (ZeRO-2 fp32 by default, the recipe's other settings from
``--config``, ``key=value`` overrides to every run) with a held-out validation split (``data.val_fraction``) scored
at step 0, every ``--steps/4`` steps and at the end. Reported per lr: the validation loss at each evaluation, the
largest training loss of the first steps against the first (a jump means the lr is past the stability edge), and
the final validation loss; the lowest final validation loss wins. Written to ``OUT.json`` and ``OUT.md``.

Default: SmolLM2-135M-Instruct on the bundled data (``launch/configs/smollm2-135m.yaml``):
``python launch/import_gguf.py --smollm2`` builds it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def one_run(work: Path, lr: float, args, extra: list[str]) -> dict:
    out = work / f"lr-{lr:g}"
    port = random.randint(20000, 40000)
    cmd = ["deepspeed", "--num_gpus", str(args.nprocs), "--master_port", str(port), str(REPO / "launch" / "train.py"),
           "--config", args.config, "--deepspeed_config", args.deepspeed_config, "--overwrite", f"output_dir={out}",
           f"model.name_or_path={args.model}", f"optim.lr={lr}", f"optim.loraplus_ratio={args.ratio}",
           f"train.max_steps={args.steps}", f"train.eval_every={max(1, args.steps // 4)}", "train.save_every=0",
           "data.val_fraction=0.02", "eval.mmlu.every_checkpoint=false", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    from pipeline.distributed import remove_shm_segments

    remove_shm_segments(str(port))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    return {"lr_A": lr, "lr_B": lr * args.ratio, "train_loss": losses,
            "first_jump": round(max(losses[1:6]) / losses[0], 3), "val": {v["step"]: v["val_loss"] for v in val},
            "final_val": val[-1]["val_loss"], "tokens_per_s": rows[-1].get("tokens_per_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2 where --smollm2 builds it)")
    p.add_argument("--config", default=str(REPO / "launch" / "configs" / "smollm2-135m.yaml"))
    p.add_argument("--deepspeed_config", default=str(REPO / "deepspeed_configs" / "zero2.json"))
    p.add_argument("--lrs", default="3e-5,1e-4,3e-4,1e-3")
    p.add_argument("--ratio", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "lr_sweep_smollm2"))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.model is None:
        from pipeline.model.gguf import smollm2_default_dir

        args.model = str(smollm2_default_dir())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in (float(x) for x in args.lrs.split(",")):
            results.append(one_run(Path(tmp), lr, args, args.overrides))
            r = results[-1]
            print(f"lr_A {lr:.0e} lr_B {r['lr_B']:.1e}: val {r['val']}  first-steps jump x{r['first_jump']}",
                  flush=True)
    best = min(results, key=lambda r: r["final_val"])
    steps = sorted({s for r in results for s in r["val"]}, key=int)
    lines = [f"# lr sweep: {Path(args.model).name}, lambda {args.ratio:g}, {args.steps} steps, "
             f"{args.nprocs} ranks, {Path(args.deepspeed_config).name}", "",
             "| lr_A | lr_B | " + " | ".join(f"val @{s}" for s in steps) + " | max loss steps 2-6 / step 1 |",
             "|---|---|" + "---|" * len(steps) + "---|"]
    for r in results:
        mark = " **best**" if r is best else ""
        lines.append(f"| {r['lr_A']:.0e}{mark} | {r['lr_B']:.1e} | "
                     + " | ".join(f"{r['val'][s]:.4f}" for s in steps) + f" | {r['first_jump']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
