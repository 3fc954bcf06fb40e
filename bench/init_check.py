#!/usr/bin/env python
"""PiSSA and OLoRA on a real model under ZeRO-3: train through the launcher, then check in plain PEFT that the saved
adapter, loaded onto the original base, is the model that was trained.

    python launch/import_gguf.py --smollm2          # once
    python bench/init_check.py [--inits pissa,olora] [--steps 4] [--nprocs 2] [key=value ...]

Each init is one run of ``deepspeed --num_gpus NPROCS launch/train.py --config launch/configs/smollm2-135m.yaml``
under ``deepspeed_configs/zero3.json`` with ``lora.init_lora_weights=INIT`` and a held-out split
(``data.val_fraction``), scored at the last step by the training loop. Then the checkpoint's adapter (converted
for the original base) is loaded by ``PeftModel.from_pretrained`` onto the unmodified SmolLM2 and the same
held-out samples are scored again, one process, no DeepSpeed. Reported per init: both validation losses and
their difference, the adapter's rank, the run's wall time and its line that the ranks hold the same factors.
``OUT.json``, ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def held_out(model_dir: str, val_fraction: float, seq_len: int):
    from pipeline.config import DataConfig
    from pipeline.data.builtin import BUNDLED_DATA
    from pipeline.data.prepared import prepare
    from pipeline.model.load import load_tokenizer

    tok = load_tokenizer(model_dir)
    return prepare(DataConfig(path=str(BUNDLED_DATA), val_fraction=val_fraction), tok, model_dir, seq_len,
                   announce=False).val


def peft_loss(model_dir: str, adapter: Path, rows) -> tuple[float, int]:
    """The token-weighted next-token loss over ``rows``, each alone, of the original base with ``adapter``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.data.formats import IGNORE_INDEX

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapter).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            ids, labels = (torch.tensor(x, dtype=torch.long)[None] for x in (rows[i].input_ids, rows[i].labels))
            logits = model(input_ids=ids).logits
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:],
                                                             ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((labels[0, 1:] != IGNORE_INDEX).sum())
    return total / tokens, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2 where --smollm2 builds it)")
    p.add_argument("--inits", default="pissa,olora")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--val_fraction", type=float, default=0.01)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "init_check_smollm2"))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    if args.model is None:
        from pipeline.model.gguf import smollm2_default_dir

        args.model = str(smollm2_default_dir())
    from pipeline.distributed import remove_shm_segments

    rows = held_out(args.model, args.val_fraction, 256)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for init in args.inits.split(","):
            out, port = Path(tmp) / init, random.randint(20000, 40000)
            cmd = ["deepspeed", "--num_gpus", str(args.nprocs), "--master_port", str(port),
                   str(REPO / "launch" / "train.py"), "--config", str(REPO / "launch" / "configs" / "smollm2-135m.yaml"),
                   "--deepspeed_config", str(REPO / "deepspeed_configs" / "zero3.json"), f"output_dir={out}",
                   f"model.name_or_path={args.model}", f"lora.init_lora_weights={init}",
                   f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", "train.save_every=0",
                   f"data.val_fraction={args.val_fraction}", "eval.mmlu.every_checkpoint=false", *args.overrides]
            clock = time.time()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "DS_ACCELERATOR": "cpu"})
            wall = time.time() - clock
            remove_shm_segments(str(port))
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            agreed = re.search(r"lora\.init_lora_weights=\S+: .*", proc.stdout)
            val = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()][-1]
            adapter = out / "checkpoints" / f"step-{args.steps}" / "adapter"
            loss, tokens = peft_loss(args.model, adapter, rows)
            config = json.loads((adapter / "adapter_config.json").read_text())
            results.append({"init": init, "trained_val_loss": val["val_loss"], "peft_val_loss": loss,
                            "abs_diff": abs(loss - val["val_loss"]), "val_tokens": tokens,
                            "loop_val_tokens": val["val_tokens"], "adapter_r": config["r"],
                            "ranks_line": agreed.group(0) if agreed else None, "wall_s": round(wall, 1)})
            print(json.dumps(results[-1]), flush=True)
    lines = [f"# PiSSA/OLoRA on {Path(args.model).name} under ZeRO-3, {args.nprocs} ranks, {args.steps} steps", "",
             "| init | val loss, trained (ZeRO-3 ranks) | val loss, PEFT on the original base | difference | "
             "adapter r | run wall (s) |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['init']} | {r['trained_val_loss']:.6f} | {r['peft_val_loss']:.6f} | {r['abs_diff']:.1e} | "
                     f"{r['adapter_r']} | {r['wall_s']} |")
    lines += [""] + [f"- `{r['ranks_line']}`" for r in results]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
