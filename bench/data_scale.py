#!/usr/bin/env python
"""Data at scale: cache build time, time to first step and per-rank memory on a cold and a warm cache.

    python bench/data_scale.py                       # 100k and 1M generated instruction samples (~25 min)
    python bench/data_scale.py --quick               # 2,000 samples, no baseline (CI: that it works)

For each dataset size it measures, on this machine:
- the cache build of ``launch/prepare_data.py`` at ``data.num_proc`` 1 and 2 (wall time, tokens/s);
- ``deepspeed --num_gpus 2 launch/train.py`` (2 ranks, ZeRO-2, 2 steps) on a cold cache (it builds) and a warm one
  (it reads): the time from the launcher's start to the first step's metrics row, and each rank's peak RSS
  (``VmHWM`` of the two rank processes, read by the ranks themselves; ``LORAPLUS_BENCH_RSS``);
- the same start through the code before the cache (``--baseline-rev``, a git worktree of that commit), at
  the sizes it can hold in memory (``--baseline-max``).
Results: ``bench/results/data_scale.json`` and ``.md``, the table that ``bench/README.md`` quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.data.builtin import _example  # noqa: E402  (the bundled set's generator)
from pipeline.distributed import remove_shm_segments  # noqa: E402


def generate(path: Path, n: int, per_sample: int, seed: int = 0) -> None:
    """``n`` instruction samples, each ``per_sample`` of the bundled set's tasks run together (the tiny tokenizer
    makes about 27 tokens of each)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = max(1, int(rng.gauss(per_sample, per_sample / 4)))
            parts = [_example(rng) for _ in range(k)]
            rec = {"instruction": " Then: ".join(p["instruction"] for p in parts),
                   "input": " | ".join(p["input"] for p in parts),
                   "output": " ".join(p["output"] for p in parts)}
            f.write(json.dumps(rec) + "\n")


FULL = [("100k", 100_000, 34), ("1M", 1_000_000, 8)]  # name, samples, tasks per sample (~27 tokens each)
QUICK = [("2k", 2_000, 34)]


def ranks_of(launcher) -> list:
    """The rank processes under a ``deepspeed`` launcher: those started with ``--local_rank`` whose parent was not
    (a rank's forked workers, e.g. ``datasets.map``'s, share its command line)."""
    def is_rank(p) -> bool:
        try:
            return any(a.startswith("--local_rank") for a in p.cmdline())
        except Exception:
            return False

    try:
        kids = launcher.children(recursive=True)
    except Exception:
        return []
    return [p for p in kids if is_rank(p) and not is_rank(p.parent())]


def hwm_gib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        return None
    return None


def start(repo: Path, data: Path, out: Path, cache: Path, extra: list[str], timeout: float) -> dict:
    """One ``deepspeed --num_gpus 2 launch/train.py`` start: seconds to the first metrics row, each rank's peak RSS
    by then, and the wall time of the whole (2-step) run."""
    import psutil

    shutil.rmtree(out, ignore_errors=True)
    port = random.randint(20000, 40000)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port),
           str(repo / "launch" / "train.py"), f"output_dir={out}", f"data.path={data}", "train.max_steps=2",
           "train.seq_len=2048", "train.micro_batch_size=2", "eval.mmlu.every_checkpoint=false", *extra]
    if cache:
        cmd.append(f"data.cache_dir={cache}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    launcher = psutil.Process(proc.pid)
    metrics = out / "metrics.jsonl"
    first, rss, peak = None, {}, {}
    while proc.poll() is None and time.time() - t0 < timeout:
        for p in ranks_of(launcher):
            v = hwm_gib(p.pid)
            if v is not None:
                peak[p.pid] = max(peak.get(p.pid, 0.0), v)
        if first is None and metrics.is_file() and metrics.read_text().strip():
            first = json.loads(metrics.read_text().splitlines()[0])["time"] - t0
            rss = dict(peak)
        time.sleep(0.05)
    timed_out = proc.poll() is None
    if timed_out:
        os.killpg(proc.pid, 9)
        proc.wait()
    remove_shm_segments(port)  # the loader before the cache (an old checkout) leaves DeepSpeed's shm segments
    if timed_out:
        raise SystemExit(f"timed out: {' '.join(cmd)}; see {out.with_suffix('.log')}")
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {out.with_suffix('.log')}")
    text = out.with_suffix(".log").read_text()
    return {"first_step_s": round(first, 2), "rss_gib": sorted(round(v, 3) for v in rss.values()),
            "wall_s": round(time.time() - t0, 1), "tokenised": "data: tokenising" in text}


def build(data: Path, cache: Path, num_proc: int) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "prepare_data.py"), f"data.path={data}",
                           "train.seq_len=2048", f"data.cache_dir={cache}", f"data.num_proc={num_proc}"],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"prepare_data failed:\n{proc.stderr[-3000:]}")
    wall = time.time() - t0
    report = next(line for line in proc.stdout.splitlines() if line.startswith("data: ") and "tokens from" in line)
    tokens = int(report.split(" samples, ")[1].split(" tokens")[0].replace(",", ""))
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    return {"num_proc": num_proc, "build_s": round(wall, 1), "tokens": tokens,
            "tokens_per_s": round(tokens / wall), "cache_gib": round(size / 2 ** 30, 3)}


def baseline_tree(rev: str, where: Path) -> Path:
    if not (where / "launch" / "train.py").is_file():
        shutil.rmtree(where, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=REPO, check=True,
                       capture_output=True)
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (CI)")
    ap.add_argument("--work", default=str(REPO / "bench" / ".scratch" / "data_scale"), help="scratch directory")
    ap.add_argument("--baseline-rev", default="82727ef", help="the commit before the data cache")
    ap.add_argument("--baseline-max", type=int, default=100_000, help="largest size run through the baseline")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "data_scale"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if args.quick else FULL
    timeout = 600 if args.quick else 3600
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "sizes": {}}
    base = None if args.quick else baseline_tree(args.baseline_rev, work / "baseline")

    from pipeline.data.builtin import BUNDLED_DATA

    bundled_cache = work / "cache-bundled"
    build(BUNDLED_DATA, bundled_cache, 1)
    results["bundled"] = {"warm": start(REPO, BUNDLED_DATA, work / "run", bundled_cache, [], timeout)}
    if base:
        results["bundled"]["before"] = start(base, BUNDLED_DATA, work / "run", None, [], timeout)
    print(json.dumps(results["bundled"]), flush=True)
    for name, n, per in sizes:
        data = work / f"gen-{name}.jsonl"
        if not data.is_file():
            t0 = time.time()
            generate(data.with_suffix(".tmp"), n, per)
            data.with_suffix(".tmp").rename(data)
            print(f"generated {name} in {time.time() - t0:.0f} s", flush=True)
        row: dict = {"samples": n, "file_gib": round(data.stat().st_size / 2 ** 30, 3)}
        row["builds"] = [build(data, work / f"cache-{name}", k) for k in (1, 2)]
        print(name, json.dumps(row["builds"]), flush=True)
        cache = work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        row["cold"] = start(REPO, data, work / "run", cache, [], timeout)
        row["warm"] = start(REPO, data, work / "run", cache, [], timeout)
        if base and n <= args.baseline_max:
            row["before"] = start(base, data, work / "run", None, [], timeout)
        print(name, json.dumps({k: row[k] for k in ("cold", "warm", "before") if k in row}), flush=True)
        results["sizes"][name] = row
        shutil.rmtree(cache, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(results))
    print(table(results))


def table(r: dict) -> str:
    def rss(x):
        return " / ".join(f"{v:.2f}" for v in x["rss_gib"])

    b = r["bundled"]["warm"]
    lines = [f"Measured {r['date']} on {r['machine']} (2 CPU ranks, ZeRO-2, tiny model, seq 2048, micro-batch 2).", "",
             "| data | start | first step (s) | x bundled | per-rank peak RSS (GiB) | vs bundled (GiB) |",
             "|---|---|---:|---:|---|---:|"]

    def add(name, kind, x):
        lines.append(f"| {name} | {kind} | {x['first_step_s']:.1f} | {x['first_step_s'] / b['first_step_s']:.2f} | "
                     f"{rss(x)} | {max(x['rss_gib']) - max(b['rss_gib']):+.2f} |")

    add("bundled 2,000", "warm cache", b)
    if "before" in r["bundled"]:
        add("bundled 2,000", "before the cache", r["bundled"]["before"])
    for name, row in r["sizes"].items():
        for kind, label in (("cold", "cold cache (builds it)"), ("warm", "warm cache"), ("before", "before the cache")):
            if kind in row:
                add(f"{name} ({row['samples']:,} samples)", label, row[kind])
    lines += ["", "| data | tokens | file (GiB) | cache (GiB) | build, num_proc 1 (s) | build, num_proc 2 (s) | "
                  "tokens/s at 2 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in r["sizes"].items():
        one, two = row["builds"]
        lines.append(f"| {name} | {one['tokens']:,} | {row['file_gib']:.2f} | {two['cache_gib']:.2f} | "
                     f"{one['build_s']:.1f} | {two['build_s']:.1f} | {two['tokens_per_s']:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
