#!/usr/bin/env python
"""MMLU on the training engine (``eval.mmlu.runner=engine``) against the background process scorer
(``runner=process``), in the same training run, through ``deepspeed launch/train.py``.

    python bench/score_engine.py                  # SmolLM2, ZeRO-3 (the shipped JSON), 5-shot on the bundled sample
    python bench/score_engine.py --limit 2        # 2 questions a subject (114 of 228)
    python bench/score_engine.py --quick          # the tiny model, 0-shot, 1 question, the first two runs: the
                                                  # test suite runs it

Four runs of the same 2 training steps (a checkpoint at step 2; the base model scored as step 0):

- ``engine-ws2``: 2 ranks, scored by the ranks themselves;
- ``process-ws2``: 2 ranks, scored by rank 0's background process (loads the base and the adapter again, on the CPU);
- ``unscored-ws2``: 2 ranks, no scoring (the memory and time of training alone);
- ``engine-ws1``: 1 rank, scored by it (how the split over ranks scales).

Measured: each run's wall time; per score, the engine's pause (``metrics.jsonl``) or the process scorer's own time
(``mmlu.json``'s ``wall_s``) and the time from the checkpoint's save to its score landing; the peak resident memory
of each rank and of the whole job (every process under the launcher, the scorer included), sampled every 0.1 s;
and the scores themselves, compared request by request (``mmlu_samples.jsonl``) between the runners and between
world sizes. Results: ``bench/results/score_engine.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
GIB = 2 ** 30
CASES = {"engine-ws2": ("engine", 2), "process-ws2": ("process", 2), "unscored-ws2": (None, 2),
         "engine-ws1": ("engine", 1)}


class Sampler(threading.Thread):
    """Peak resident memory of every process under ``pid``: each rank's, the scorer's, and their sum."""

    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peaks: dict[str, int] = {}
        self.job_peak = 0
        self._halt = threading.Event()

    @staticmethod
    def role(cmdline: list[str]) -> str:
        line = " ".join(cmdline)
        if "pipeline.cli.watch" in line:
            return "scorer"
        for part in cmdline:
            if part.startswith("--local_rank="):
                return f"rank {part.split('=')[1]}"
        return "launcher"

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss, role = p.memory_info().rss, self.role(p.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                self.peaks[role] = max(self.peaks.get(role, 0), rss)
            self.job_peak = max(self.job_peak, total)
            time.sleep(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def train_args(model: str, out: Path, runner: str | None, world: int, shots: int, limit: int) -> list[str]:
    args = [f"output_dir={out}", f"model.name_or_path={model}", "train.max_steps=2", "train.save_every=2",
            "train.micro_batch_size=4", "train.seq_len=256", "optim.lr=1e-4", "seed=5",
            f"train.grad_accum={2 // world}",  # the same global batch of 8 on 1 rank as on 2: the same training
            "--deepspeed_config", str(REPO / "deepspeed_configs" / "zero3.json")]
    if runner is None:
        return args + ["eval.mmlu.every_checkpoint=false"]
    return args + ["eval.mmlu.every_checkpoint=true", f"eval.mmlu.runner={runner}", "eval.mmlu.data=sample",
                   f"eval.mmlu.num_fewshot={shots}", f"eval.mmlu.limit={limit}", "eval.mmlu.log_samples=true"]


def run_case(name: str, model: str, root: Path, shots: int, limit: int) -> dict:
    runner, world = CASES[name]
    out = root / name
    port = random.randint(20000, 40000)
    cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", str(port), str(REPO / "launch" / "train.py"),
           *train_args(model, out, runner, world, shots, limit)]
    log = open(root / f"{name}.log", "w")
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(proc.pid)
    sampler.start()
    code = proc.wait()
    wall = time.perf_counter() - began
    sampler.stop()
    log.close()
    from pipeline.distributed import remove_shm_segments

    remove_shm_segments(port)
    if code != 0:
        raise SystemExit(f"{name}: exited {code}; see {root / f'{name}.log'}")
    return {"runner": runner, "world_size": world, "wall_s": round(wall, 1), "scores": scores(out, runner),
            "peak_rss_gib": {k: round(v / GIB, 3) for k, v in sorted(sampler.peaks.items())},
            "job_peak_rss_gib": round(sampler.job_peak / GIB, 3), "output_dir": str(out)}


def scores(out: Path, runner: str | None) -> dict:
    """step -> acc, stderr and the time it cost (the engine's pause; the process scorer's own time, and from the
    checkpoint's save to its score landing)."""
    if runner is None:
        return {}
    pauses = {r["step"]: r["pause_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r.get("event") == "mmlu"}
    found = {}
    for step, result_dir in ((0, out / "base"), (2, out / "checkpoints" / "step-2")):
        summary = json.loads((result_dir / "mmlu.json").read_text())
        row = {"acc": summary["acc"], "acc_stderr": summary["acc_stderr"], "scorer_wall_s": summary["wall_s"]}
        if runner == "engine":
            row["pause_s"] = pauses[step]
            row["forwards_per_rank"], row["lm_eval_ranks"] = summary["forwards_per_rank"], summary["lm_eval_ranks"]
        elif step:  # seconds from the sealed checkpoint to its score on disk
            sealed = (result_dir / "manifest.json").stat().st_mtime
            row["save_to_score_s"] = round((result_dir / "mmlu.json").stat().st_mtime - sealed, 1)
        found[step] = row
    return found


def requests(out: Path, step: int) -> dict:
    d = out / ("base" if step == 0 else f"checkpoints/step-{step}")
    return {(r["task"], r["doc_id"]): [x[0] for x in r["resps"]]
            for r in map(json.loads, (d / "mmlu_samples.jsonl").read_text().splitlines())}


def compare(a: dict, b: dict) -> dict:
    out = {}
    for step in (0, 2):
        ra, rb = requests(Path(a["output_dir"]), step), requests(Path(b["output_dir"]), step)
        assert ra.keys() == rb.keys() and ra
        out[step] = {"requests": len(ra) * 4, "largest_loglik_difference": max(
            abs(x - y) for k in ra for x, y in zip(ra[k], rb[k])),
            "same_acc": a["scores"][step]["acc"] == b["scores"][step]["acc"]}
    return out


def report(res: dict) -> str:
    lines = [f"# MMLU on the training engine against the background scorer ({res['model_name']}, ZeRO-3, "
             f"{res['shots']}-shot, {res['questions']} questions)", "",
             f"`{res['command']}` on {res['machine']}, {res['date']}. Two training steps, a checkpoint at step 2, "
             f"the base model scored as step 0.", "",
             "| run | ranks | run wall s | step 0: cost s | step 2: cost s | acc 0 / 2 | peak RSS per rank GiB | "
             "scorer GiB | whole job GiB |", "|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for name, r in res["runs"].items():
        sc = r["scores"]

        def cost(step):
            if not sc:
                return "-"
            s = sc[step]
            if "pause_s" in s:
                return f"{s['pause_s']:.1f} (pause, {s['forwards_per_rank']} forwards a rank)"
            extra = f", save to score {s['save_to_score_s']:.1f}" if "save_to_score_s" in s else ""
            return f"{s['scorer_wall_s']:.1f} (background{extra})"

        accs = " / ".join(f"{sc[s]['acc']:.4f}" for s in (0, 2)) if sc else "-"
        ranks = ", ".join(f"{r['peak_rss_gib'][k]:.2f}" for k in sorted(r["peak_rss_gib"]) if k.startswith("rank"))
        lines.append(f"| {name} | {r['world_size']} | {r['wall_s']:.0f} | {cost(0)} | {cost(2)} | {accs} | {ranks} | "
                     f"{r['peak_rss_gib'].get('scorer', 0):.2f} | {r['job_peak_rss_gib']:.2f} |")
    lines += ["", "Scores compared request by request (log-likelihood of each of the 4 choices):", ""]
    for pair, cmp in res["comparisons"].items():
        for step, c in cmp.items():
            lines.append(f"- {pair}, step {step}: {c['requests']} requests, largest difference "
                         f"{c['largest_loglik_difference']:.2g}, same acc: {c['same_acc']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny model, 0-shot, one question a subject")
    p.add_argument("--limit", type=int, default=0, help="questions a subject (0: all 4 of the sample)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "score_engine"))
    p.add_argument("--runs", default=str(REPO / "bench" / "runs" / "score_engine"))
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.quick:
        from pipeline.model.tiny import ensure_tiny_model

        model, name, shots, limit = ensure_tiny_model(), "the tiny model", 0, 1
    else:
        from pipeline.model.gguf import ensure_smollm2

        model, name, shots, limit = ensure_smollm2(), "SmolLM2-135M-Instruct", args.shots, args.limit
    root = Path(args.runs)
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    runs = {}
    for case in (("engine-ws2", "process-ws2") if args.quick else CASES):
        print(f"{case}...", flush=True)
        runs[case] = run_case(case, str(model), root, shots, limit)
        print(json.dumps({k: v for k, v in runs[case].items() if k != "output_dir"}), flush=True)
    import datetime
    import platform

    res = {"model_name": name, "shots": shots, "questions": 57 * (limit or 4), "runs": runs,
           "comparisons": {"engine-ws2 vs process-ws2": compare(runs["engine-ws2"], runs["process-ws2"]),
                           **({"engine-ws1 vs engine-ws2": compare(runs["engine-ws1"], runs["engine-ws2"])}
                              if "engine-ws1" in runs else {})},
           "command": "python bench/score_engine.py" + (" --quick" if args.quick else "") +
                      (f" --limit {args.limit}" if args.limit and not args.quick else ""),
           "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
           "date": datetime.date.today().isoformat()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
