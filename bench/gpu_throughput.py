#!/usr/bin/env python
"""Training throughput on one GPU: Llama-3-8B shape, LoRA r=16 on every linear layer, ours against the HF Trainer.

    python bench/gpu_throughput.py                       # the full sweep (one GPU; see bench/README.md)
    python bench/gpu_throughput.py --seq 4096 --zero 2   # a part of it (results accumulate)
    python bench/gpu_throughput.py --smoke               # a small shape on CPU ranks: checks that the bench works
    python bench/gpu_throughput.py --table               # rewrite the table from the results so far

Each configuration is one launch (``deepspeed --num_gpus 1``) of ``launch/train.py`` (ours) or
``bench/hf_trainer_baseline.py`` (HF Trainer + DeepSpeed + PEFT ``create_loraplus_optimizer``), on the recipe
``launch/configs/llama3-8b.yaml`` with ``model.random_init=true`` (random weights of the published shape: no
download), bf16, packed rows of synthetic text (padding only in an epoch's last, shorter row), constant lr. The sweep covers sequence length x
gradient checkpointing x ZeRO stage x side, and for each the micro-batch sizes in ascending order until one runs
out of memory.

Per configuration: tokens/s per GPU and MFU (median over the steps after ``--warmup``; model FLOPs per token
from ``pipeline/observe/flops.py``, peak from the GPU's name), and the peak allocator memory. One JSON row per launch is
appended to ``bench/results/gpu_throughput.jsonl`` (so the sweep can be run in parts, within a time limit per
command), and ``gpu_throughput.md`` is rewritten from the newest row of each configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.distributed import remove_shm_segments  # noqa: E402
from pipeline.observe.flops import PEAK_TFLOPS  # noqa: E402

# ours: the default chunked loss (train.loss_chunk); ours-full: the same with the full-logits loss (loss_chunk=0).
SIDES = {"ours": REPO / "launch" / "train.py", "ours-full": REPO / "launch" / "train.py",
         "baseline": REPO / "bench" / "hf_trainer_baseline.py"}
RESULTS = REPO / "bench" / "results" / "gpu_throughput"
# --smoke: a shape small enough for CPU ranks (the recipe's other settings stay).
SMOKE_SHAPE = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 256, "vocab_size": 512, "max_position_embeddings": 512, "rope_theta": 10000.0}
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED")
# ZeRO-3 near the memory limit survives by flushing the allocator's cache every step: slow, and worth a flag.
NEAR_OOM = "pytorch allocator cache flushes"
ABORT_AT_EXIT = "terminate called"


def synthetic_text(path: Path, tokens: int, seed: int = 0) -> None:
    """Lines of made-up words, about ``tokens`` tokens in all: rows are packed, so the content does not matter."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(2000)]
    with path.open("w") as f:
        for _ in range(max(1, tokens // 200)):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(100))}) + "\n")


def launch(side: str, conf: dict, args, work: Path, data: Path) -> dict:
    """One configuration; returns its result row (``status``: ok, oom or failed)."""
    out = work / f"{side}-run"
    shutil.rmtree(out, ignore_errors=True)
    over = [f"output_dir={out}", "model.random_init=true", f"data.path={data}", "data.format=text",
            "data.packing=true", f"train.seq_len={conf['seq']}", f"train.micro_batch_size={conf['mb']}",
            "train.grad_accum=1", f"train.max_steps={args.steps}", "train.save_every=0",
            f"model.gradient_checkpointing={str(conf['ckpt']).lower()}", "schedule.name=constant",
            "schedule.warmup_steps=0", "lora.dropout=0", "eval.mmlu.every_checkpoint=false"]
    if args.smoke:
        over += [f"model.shape.{k}={v}" for k, v in SMOKE_SHAPE.items()]
    if side == "ours-full":
        over.append("train.loss_chunk=0")
    port = random.randint(20000, 40000)
    cmd = ["deepspeed", "--num_gpus", str(args.nprocs), "--master_port", str(port),
           str(SIDES[side]), "--config", str(args.recipe), "--deepspeed_config",
           f"deepspeed_configs/zero{conf['zero']}.json", *over]
    if side != "baseline":
        cmd.append("--overwrite")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    # A session of its own, so that a timeout stops the launcher and its ranks (killing the launcher alone would
    # leave a rank holding the GPU, and every later configuration would run out of memory).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=args.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                text, _ = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = None
    remove_shm_segments(port)  # the baseline's ranks leave DeepSpeed's CPU shm segments behind
    row = {**conf, "side": side, "date": date.today().isoformat(), "device": args.device, "steps": args.steps,
           "warmup": args.warmup, "launch_s": round(time.time() - started, 1), "smoke": args.smoke}
    metrics = out / ("baseline_metrics.jsonl" if side == "baseline" else "metrics.jsonl")
    done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    if rc != 0 and done == args.steps and ABORT_AT_EXIT in text:
        # Every step done and recorded, then the process aborted on its way out (seen about once in 60 CPU runs;
        # README "Not yet"). The figures are whole: keep them, and say so in the row.
        row["abort_at_exit"] = True
        rc = 0
    if rc != 0:
        oom = any(m in text for m in OOM_MARKERS)
        (work / f"{side}-seq{conf['seq']}-ckpt{int(conf['ckpt'])}-zero{conf['zero']}-mb{conf['mb']}-failed.log"
         ).write_text(text)
        return {**row, "status": "oom" if oom else ("timeout" if rc is None else "failed"),
                "detail": "" if oom else text[-1500:]}
    # Both sides time a step the same way: from the end of the previous step to the end of this one.
    if side != "baseline":
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        # The loop's own mfu times the step alone; FLOPs per step = mfu x peak x ranks x that time.
        flops = [r["mfu"] * args.peak * 1e12 * args.nprocs * r["tokens"] / r["tokens_per_s"] if r.get("mfu") else None
                 for r in rows]
    else:
        rows = [json.loads(x) for x in (out / "baseline_metrics.jsonl").read_text().splitlines()]
        flops = [r["model_flops"] for r in rows]
    dts = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    rows, flops = rows[1:], flops[1:]  # the first step has no start of its own
    keep = slice(args.warmup, None) if len(rows) > args.warmup else slice(None)
    tps = statistics.median(r["tokens"] / dt for r, dt in zip(rows[keep], dts[keep])) / args.nprocs
    mfu = None
    if args.peak and all(f is not None for f in flops):
        mfu = statistics.median(f / dt for f, dt in zip(flops[keep], dts[keep])) / (args.peak * 1e12 * args.nprocs)
    peak_gb = rows[-1]["mem_peak_gb"]
    return {**row, "status": "ok", "tokens_per_s_per_gpu": round(tps, 1), "mfu": round(mfu, 4) if mfu else None,
            "peak_gb": peak_gb, "near_oom": NEAR_OOM in text}


def key(r: dict) -> tuple:
    return (r["smoke"], r["seq"], r["ckpt"], r["zero"], r["mb"], r["side"])


def write_table(path: Path) -> str:
    """The newest row of each configuration, as a markdown table (GPU rows first, smoke rows apart)."""
    newest: dict[tuple, dict] = {}
    if path.with_suffix(".jsonl").is_file():
        for line in path.with_suffix(".jsonl").read_text().splitlines():
            r = json.loads(line)
            newest[key(r)] = r
    lines = ["| shape | seq | grad. ckpt | ZeRO | micro-batch | side | tokens/s/GPU | MFU | peak GiB | device, date |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---|"]
    for r in sorted(newest.values(), key=key):
        if r["status"] == "ok":
            flag = " (allocator flushes: near OOM)" if r.get("near_oom") else ""
            cells = [f"{r['tokens_per_s_per_gpu']:,.0f}{flag}", f"{r['mfu'] * 100:.1f}%" if r.get("mfu") else "-",
                     f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "-"]
        else:
            cells = [r["status"], "", ""]
        lines.append(f"| {'smoke' if r['smoke'] else 'Llama-3-8B'} | {r['seq']} | {'on' if r['ckpt'] else 'off'} | "
                     f"{r['zero']} | {r['mb']} | {r['side']} | {' | '.join(cells)} | {r['device']}, {r['date']} |")
    md = "\n".join(lines)
    path.with_suffix(".md").write_text(md + "\n")
    return md


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--mb", type=int, nargs="+", default=[1, 2, 4, 8], help="micro-batch sizes, ascending")
    p.add_argument("--ckpt", choices=["on", "off"], nargs="+", default=["on", "off"], help="gradient checkpointing")
    p.add_argument("--zero", type=int, choices=[2, 3], nargs="+", default=[2, 3])
    p.add_argument("--sides", choices=list(SIDES), nargs="+", default=list(SIDES))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    p.add_argument("--recipe", type=Path, default=REPO / "launch" / "configs" / "llama3-8b.yaml")
    p.add_argument("--smoke", action="store_true", help="a small shape, on CPU ranks when there is no GPU")
    p.add_argument("--table", action="store_true", help="only rewrite the table from the results so far")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.table:
        print(write_table(args.out))
        return
    # The GPU's name from a child process: CUDA is never initialised here, so every launch has the whole GPU.
    probe = subprocess.run([sys.executable, "-c", "import torch; torch.cuda.is_available() and "
                            "print(torch.cuda.get_device_name())"], capture_output=True, text=True, check=True)
    gpu_name = probe.stdout.strip() if os.environ.get("DS_ACCELERATOR", "cuda") == "cuda" else ""
    on_gpu = bool(gpu_name)
    if not on_gpu and not args.smoke:
        raise SystemExit("gpu_throughput: no CUDA GPU here; --smoke runs a small shape on CPU ranks instead")
    if args.smoke:
        args.seq = [s for s in args.seq if s <= SMOKE_SHAPE["max_position_embeddings"]] or [128]
        args.mb, args.steps, args.warmup = args.mb[:2], min(args.steps, 4), min(args.warmup, 1)
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    args.nprocs = 1
    args.device = gpu_name or "CPU"
    # Dense bf16 TFLOP/s by name (pipeline/observe/flops.py's table), or None: CPU, or a GPU not in the table.
    args.peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name.upper()), None) if on_gpu else None
    work = args.out.parent / (args.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    data = work / "text.jsonl"
    synthetic_text(data, tokens=max(args.seq) * max(args.mb) * 4)
    with args.out.with_suffix(".jsonl").open("a") as results:
        for seq in args.seq:
            for ckpt in (c == "on" for c in args.ckpt):
                for zero in args.zero:
                    for side in args.sides:
                        for mb in sorted(args.mb):
                            conf = {"seq": seq, "ckpt": ckpt, "zero": zero, "mb": mb}
                            row = launch(side, conf, args, work, data)
                            results.write(json.dumps(row) + "\n")
                            results.flush()
                            shown = row["status"]
                            if row["status"] == "ok":
                                mfu = f"{row['mfu'] * 100:.1f}%" if row["mfu"] else "-"
                                shown = (f"{row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, MFU {mfu}, "
                                         f"peak {row['peak_gb']} GiB")
                            print(f"seq {seq} ckpt {'on' if ckpt else 'off'} ZeRO-{zero} mb {mb} {side}: {shown} "
                                  f"({row['launch_s']:.0f} s)", flush=True)
                            if row["status"] == "failed":
                                print(row["detail"], file=sys.stderr)
                            if row["status"] != "ok":
                                break  # larger micro-batches would fail the same way
    if not any(work.glob("*-failed.log")):  # keep the logs of failed launches
        shutil.rmtree(work, ignore_errors=True)
    print(write_table(args.out))


if __name__ == "__main__":
    main()
