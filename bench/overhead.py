#!/usr/bin/env python
"""The pipeline against the baseline users would otherwise run: HF Trainer + DeepSpeed + PEFT's LoRA+ optimizer.

    python bench/overhead.py [--quick] [--steps N] [--rounds R] [--warmup W] [--nprocs P]
        [--deepspeed_config JSON] [--out PATH] [key=value ...]

Both sides get the same model, data, recipe, DeepSpeed JSON (``--deepspeed_config``, ZeRO-2 by default), LoRA+
groups and per-rank batches, launched the same way (``deepspeed --num_gpus P``, 2 ranks by default; on a machine
without a GPU, CPU ranks over gloo): ours is ``launch/train.py``, the baseline ``bench/hf_trainer_baseline.py``.
``key=value`` arguments go to both (e.g. ``model.name_or_path=/path/to/weights``); the default is the embedded tiny
Llama and the bundled data, constant lr, LoRA dropout 0 (so both runs can match step for step). CPU ranks get
``OMP_NUM_THREADS`` = cores / ranks unless it is set. The precision is resolved alike on both sides
(``train.precision``, default ``auto``: the JSON's on GPU, fp32 on CPU); ``train.precision=bf16`` runs both in bf16.
Under ZeRO-3 the second step carries DeepSpeed's one-time walk of its recorded module trace (about a minute for
SmolLM2 with LoRA on 2 CPU cores, on both sides; bench/README.md), so keep ``--warmup`` at 2 or more there.

Measured in one run, alternating the order over ``--rounds`` rounds:

- **step time**: the wall time from one optimizer step's end to the next, as each side records it (ours in
  ``metrics.jsonl``, the baseline in a Trainer callback); the median over every step after the first ``warmup``
  of every round. The ratio is ours / baseline: below 1 means ours is faster. Also per round (each round runs
  the two sides back to back, so a pair shares the machine's load of the moment) and the median of those
  ratios. Each run records the 1-minute load average at its start and end (``os.getloadavg``).
- **CPU time a step** (CPU ranks): the CPU seconds that the run's processes (launcher and ranks) used between the
  same step ends, read from ``/proc`` twice a second; the median as above. Other jobs on a shared machine stretch
  the wall time of a step far more than its CPU time, so there this ratio is the steadier one.
- **time to first step**: from starting the launcher to the end of step 1 (imports, model load, engine set-up).
- **peak memory**: on CPU the largest resident set of any process of the run (``getrusage`` of the waited-for
  launcher and its ranks); on GPU the busiest rank's allocator peak during training.
- **same math**: the largest difference between the two sides' per-step losses, and the lr of each LoRA+ group
  that the baseline's optimizer held at every step.

Written to ``OUT.json``, ``OUT.md`` and ``OUT.png`` (step times and losses, both sides).
``--quick`` (CI): 1 round of a few steps; it checks that the bench works, not the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.distributed import remove_shm_segments  # noqa: E402

SIDES = {"ours": REPO / "launch" / "train.py", "baseline": REPO / "bench" / "hf_trainer_baseline.py"}
DEFAULTS = ["schedule.name=constant", "schedule.warmup_steps=0", "lora.dropout=0", "eval.mmlu.every_checkpoint=false",
            "train.save_every=0"]  # a checkpoint at the end only, on both sides


def tree_cpu_s(root: int) -> float | None:
    """CPU seconds (user + system) used so far by process ``root`` and its descendants, read from ``/proc``: each live
    process's own time plus that of its children it has already waited for. None without ``/proc``."""
    parent: dict[int, int] = {}
    times: dict[int, float] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue  # gone meanwhile
        parent[int(name)] = int(fields[1])
        times[int(name)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime, in clock ticks
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in times and pid not in tree:
            tree.add(pid)
            todo += [c for c, pp in parent.items() if pp == pid]
    return sum(times[p] for p in tree) / os.sysconf("SC_CLK_TCK") if tree else None


def measured(cmd: list[str], env: dict, log: Path) -> tuple[int, float, float, list[tuple[float, float]]]:
    """Run ``cmd`` in a fresh child of this interpreter (so ``RUSAGE_CHILDREN`` covers that run alone), reading the
    CPU time of its process tree twice a second meanwhile.

    Returns:
        The exit status, the Unix time it started, the largest resident set (GiB) of any of its processes, and
        (Unix time, CPU seconds so far) samples of its processes together (empty without ``/proc``).
    """
    probe = ("import json, resource, subprocess, sys, time; t = time.time(); "
             "rc = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], 'w'), stderr=subprocess.STDOUT); "
             "print(json.dumps([rc, t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")
    proc = subprocess.Popen([sys.executable, "-c", probe, str(log), *cmd], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            cpu = tree_cpu_s(proc.pid)
            if cpu is not None:
                samples.append((time.time(), cpu))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, stdout, stderr)
    rc, started, maxrss_kib = json.loads(stdout.strip().splitlines()[-1])
    return rc, started, maxrss_kib / 2 ** 20, samples


def cpu_between(samples: list[tuple[float, float]], times: list[float]) -> list[float] | None:
    """CPU seconds used between consecutive ``times`` (Unix), interpolated linearly between the samples; None where
    the samples do not cover them."""
    if len(samples) < 2 or not samples[0][0] <= times[0] or not times[-1] <= samples[-1][0]:
        return None
    ts, cs = [t for t, _ in samples], [c for _, c in samples]

    def at(t: float) -> float:
        i = max(1, min(len(ts) - 1, next(k for k, x in enumerate(ts) if x >= t)))
        return cs[i - 1] + (cs[i] - cs[i - 1]) * (t - ts[i - 1]) / max(ts[i] - ts[i - 1], 1e-9)

    cum = [at(t) for t in times]
    return [b - a for a, b in itertools.pairwise(cum)]


def one_run(side: str, args, extra: list[str], work: Path, env: dict, on_gpu: bool) -> dict:
    out = work / side
    shutil.rmtree(out, ignore_errors=True)
    port = random.randint(20000, 40000)
    cmd = ["deepspeed", "--num_gpus", str(args.nprocs), "--master_port", str(port), str(SIDES[side]),
           f"output_dir={out}", "--deepspeed_config", args.deepspeed_config, f"train.max_steps={args.steps}",
           *DEFAULTS, *extra]
    if side == "ours":
        cmd.append("--overwrite")
    log = work / f"{side}.log"
    load_before = os.getloadavg()[0]
    rc, started, rss_gb, cpu_samples = measured(cmd, env, log)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # 1-minute load average at start and end
    remove_shm_segments(port)  # the baseline's ranks leave DeepSpeed's CPU shm segments behind
    metrics = out / ("metrics.jsonl" if side == "ours" else "baseline_metrics.jsonl")
    aborted_at_exit = False
    if rc != 0 and metrics.is_file() and len(metrics.read_text().splitlines()) == args.steps \
            and "terminate called" in log.read_text():
        # Every step done and recorded, then a process aborted on its way out (seen about once in 60 CPU runs;
        # README "Not yet"): the figures are whole; the run is kept and flagged.
        rc, aborted_at_exit = 0, True
    if rc != 0:
        raise SystemExit(f"bench: the {side} run failed (exit {rc}): {' '.join(cmd)}\n"
                         f"{log.read_text()[-4000:]}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    lrs = [list(r["lr_groups"].values()) if side == "ours" else r["lrs"] for r in rows]
    times = [r["time"] for r in rows]
    return {"side": side, "losses": [r["loss"] for r in rows], "lrs": lrs,
            "step_s": [b - a for a, b in itertools.pairwise(times)], "first_step_s": times[0] - started,
            "step_cpu_s": cpu_between(cpu_samples, times),
            "peak_gb": rows[-1]["mem_peak_gb"] if on_gpu else rss_gb,
            "peak_kind": "GPU allocator, busiest rank" if on_gpu else "largest process RSS",
            "aborted_at_exit": aborted_at_exit, "load": load}


def summarize(runs: list[dict], warmup: int) -> dict:
    out = {}
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        steps = [s for r in mine for s in r["step_s"][warmup:]]
        out[side] = {"median_step_s": statistics.median(steps), "steps_timed": len(steps),
                     "first_step_s": statistics.median(r["first_step_s"] for r in mine),
                     "peak_gb": max(r["peak_gb"] for r in mine), "peak_kind": mine[0]["peak_kind"]}
    ours, base = (next(r for r in runs if r["side"] == s) for s in SIDES)
    out["step_time_ratio"] = out["ours"]["median_step_s"] / out["baseline"]["median_step_s"]
    # Round k of each side (runs are sorted per side in round order): the two ran back to back.
    per_round = {side: [statistics.median(r["step_s"][warmup:]) for r in runs if r["side"] == side] for side in SIDES}
    out["round_medians_s"] = per_round
    out["round_ratios"] = [o / b for o, b in zip(per_round["ours"], per_round["baseline"])]
    out["median_round_ratio"] = statistics.median(out["round_ratios"])
    if all(r["step_cpu_s"] for r in runs):
        for side in SIDES:
            out[side]["median_step_cpu_s"] = statistics.median(
                x for r in runs if r["side"] == side for x in r["step_cpu_s"][warmup:])
        out["step_cpu_ratio"] = out["ours"]["median_step_cpu_s"] / out["baseline"]["median_step_cpu_s"]
    out["first_step_ratio"] = out["ours"]["first_step_s"] / out["baseline"]["first_step_s"]
    out["max_loss_diff"] = max(abs(a - b) for a, b in zip(ours["losses"], base["losses"]))
    def lr_sets(steps: list[list[float | None]]) -> list[tuple]:
        """The distinct sets of group lrs over the steps (None: a group the optimizer no longer held)."""
        return sorted({tuple(sorted(x, key=lambda v: (v is None, v or 0.0))) for x in steps}, key=str)

    out["baseline_lr_sets"], out["ours_lr_sets"] = lr_sets(base["lrs"]), lr_sets(ours["lrs"])
    return out


def table(s: dict) -> str:
    o, b = s["ours"], s["baseline"]

    def ms(xs: list[float]) -> str:
        return ", ".join(f"{x * 1e3:.1f}" for x in xs)

    rows = [("median step time", f"{o['median_step_s'] * 1e3:.1f} ms", f"{b['median_step_s'] * 1e3:.1f} ms",
             f"{s['step_time_ratio']:.3f}"),
            ("median step time, per round", f"{ms(s['round_medians_s']['ours'])} ms",
             f"{ms(s['round_medians_s']['baseline'])} ms",
             ", ".join(f"{x:.3f}" for x in s["round_ratios"]) + f" (median {s['median_round_ratio']:.3f})")]
    if "step_cpu_ratio" in s:
        rows.append(("median CPU time a step, all processes", f"{o['median_step_cpu_s']:.2f} s",
                     f"{b['median_step_cpu_s']:.2f} s", f"{s['step_cpu_ratio']:.3f}"))
    rows += [("time to first step", f"{o['first_step_s']:.1f} s", f"{b['first_step_s']:.1f} s",
              f"{s['first_step_ratio']:.3f}"),
             (f"peak memory ({o['peak_kind']})", f"{o['peak_gb']:.3f} GiB", f"{b['peak_gb']:.3f} GiB",
              f"{o['peak_gb'] / b['peak_gb']:.3f}"),
             ("largest per-step loss difference", f"{s['max_loss_diff']:.2e}", "", "")]
    head = ["| | ours (launch/train.py) | HF Trainer + PEFT LoRA+ | ours / baseline |", "|---|---:|---:|---:|"]
    return "\n".join([*head, *(f"| {' | '.join(r)} |" for r in rows)])


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"ours": "tab:blue", "baseline": "tab:orange"}
    names = {"ours": "ours", "baseline": "HF Trainer + PEFT LoRA+"}
    labelled = set()
    for r in runs:
        label = None if r["side"] in labelled else names[r["side"]]  # one legend entry per side
        labelled.add(r["side"])
        ax1.plot(range(2, len(r["step_s"]) + 2), [x * 1e3 for x in r["step_s"]], color=colors[r["side"]],
                 lw=0.8, alpha=0.8, label=label)
        if label:  # every round has the same losses; one curve per side
            ax2.plot(range(1, len(r["losses"]) + 1), r["losses"], color=colors[r["side"]],
                     lw=2.5 if r["side"] == "ours" else 1.0, ls="-" if r["side"] == "ours" else "--", label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("step time (ms)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round of a few steps (CI)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3, help="runs per side, alternating which goes first")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median, per run")
    p.add_argument("--nprocs", type=int, default=2,
                   help="ranks: GPUs (at most the machine's), or CPU processes without a GPU")
    p.add_argument("--deepspeed_config", default="deepspeed_configs/zero2.json")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "overhead")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for both sides")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.warmup = 5, 1, 1
    if args.steps < args.warmup + 2:
        p.error(f"--steps must be at least --warmup + 2 = {args.warmup + 2}")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    import torch

    on_gpu = torch.cuda.is_available() and env.get("DS_ACCELERATOR", "cuda") == "cuda"
    if on_gpu and args.nprocs > torch.cuda.device_count():
        p.error(f"--nprocs {args.nprocs}: this machine has {torch.cuda.device_count()} GPU(s); one rank per GPU")
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
        # One rank per core share: with torch's default (every core per rank) the ranks oversubscribe the cores
        # and ZeRO-3's gathers stall, which made step times swing 4x from one step to the next (measured).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nprocs)))
    work = args.out.parent / (args.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = []
    for k in range(args.rounds):
        order = list(SIDES) if k % 2 == 0 else list(reversed(SIDES))
        for side in order:
            r = one_run(side, args, args.overrides, work, env, on_gpu)
            runs.append(r)
            print(f"round {k + 1} {side}: first step at {r['first_step_s']:.1f} s, median step "
                  f"{statistics.median(r['step_s'][args.warmup:]) * 1e3:.1f} ms, peak {r['peak_gb']:.3f} GiB, "
                  f"load {r['load'][0]:.1f}-{r['load'][1]:.1f}", flush=True)
    runs.sort(key=lambda r: list(SIDES).index(r["side"]))  # stable: per side, in round order
    s = summarize(runs, args.warmup)
    command = "python bench/overhead.py" + (" --quick" if args.quick else "") + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a != "--quick")
    results = {"summary": s, "runs": runs, "command": command, "date": date.today().isoformat(),
               "machine": (torch.cuda.get_device_name() if on_gpu else
                           f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU ranks"),
               "nprocs": args.nprocs, "steps": args.steps, "rounds": args.rounds,
               "deepspeed_config": args.deepspeed_config, "overrides": [*DEFAULTS, *args.overrides],
               "omp_num_threads": env.get("OMP_NUM_THREADS"),
               "seconds": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    md = table(s)
    lrs = ", ".join("/".join(f"{x:g}" if x is not None else "missing" for x in t) for t in s["baseline_lr_sets"])
    loads = "; ".join(side + " " + ", ".join("{:.1f}-{:.1f}".format(*r["load"]) for r in runs if r["side"] == side)
                      for side in SIDES)
    note = (f"{command} — {results['date']}, {results['machine']}, {args.nprocs} ranks, {args.deepspeed_config}, "
            f"{args.steps} steps x {args.rounds} rounds, {results['seconds'] / 60:.1f} min; 1-minute load average at "
            f"the start and end of each run, round by round: {loads}. Baseline group lrs at every step: {lrs}.")
    args.out.with_suffix(".md").write_text(f"{md}\n\n{note}\n")
    plot(runs, args.out.with_suffix(".png"))
    shutil.rmtree(work, ignore_errors=True)
    print(md)
    print(note)


if __name__ == "__main__":
    main()
