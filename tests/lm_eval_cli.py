"""lm-eval's own CLI (``python -m lm_eval --model hf``) on a checkpoint, as a user would score it, and what it logged
for each request: the reference the engine runner's scores are compared with, request by request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class CliScore:
    acc: float
    acc_stderr: float
    requests: dict[tuple[str, int], list[tuple[float, bool]]]  # (task, doc_id) -> each choice's (loglik, greedy)


def command(base: Path, adapter: Path | None, out: Path, num_fewshot: int, limit: int, dtype: str = "float32",
            data: Path | None = None) -> list[str]:
    """``python -m lm_eval`` on ``base`` (+ ``peft=adapter``) with lm-eval's ``mmlu`` pointed at ``data`` (the
    bundled sample by default) through the group the pipeline uses, every request logged."""
    from pipeline.data.builtin import SAMPLE
    from pipeline.eval.score import datasets_cache, group_yaml

    data = data or SAMPLE
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    (out / "tasks" / "mmlu_local.yaml").write_text(group_yaml(data, datasets_cache(data)))
    model_args = f"pretrained={base},dtype={dtype}" + (f",peft={adapter}" if adapter else "")
    return [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--device", "cpu",
            "--tasks", "mmlu_local", "--include_path", str(out / "tasks"), "--num_fewshot", str(num_fewshot),
            "--limit", str(limit), "--batch_size", "16", "--log_samples", "--output_path", str(out / "results")]


def start(cmd: list[str], out: Path) -> subprocess.Popen:
    """Start ``cmd`` in the background (its output into files: a pipe could fill)."""
    with open(out / "cli.out", "w") as stdout, open(out / "cli.err", "w") as stderr:  # the child keeps its own
        return subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=stderr, env=OFFLINE)


def finish(proc: subprocess.Popen, out: Path, timeout: int = 900) -> CliScore:
    """Wait for a :func:`start` and read what it wrote."""
    assert proc.wait(timeout=timeout) == 0, (out / "cli.err").read_text()[-3000:]
    return read(out / "results")


@dataclass(frozen=True)
class Job:
    """One checkpoint (or the base model alone: ``adapter`` None) for lm-eval's CLI to score."""

    base: Path
    adapter: Path | None
    num_fewshot: int
    limit: int
    dtype: str = "float32"


def score_all(jobs: dict[str, Job], root: Path, at_once: int = 2) -> dict[str, CliScore]:
    """lm-eval's CLI on each job, ``at_once`` at a time (each keeps about one of the 2 cores busy), every job's files
    under ``root/<name>``: name -> its score."""
    done, pending = {}, list(jobs.items())
    while pending:
        batch, pending = pending[:at_once], pending[at_once:]
        running = []
        for name, job in batch:
            (root / name).mkdir(parents=True, exist_ok=True)
            cmd = command(job.base, job.adapter, root / name, job.num_fewshot, job.limit, job.dtype)
            running.append((name, start(cmd, root / name)))
        for name, proc in running:
            done[name] = finish(proc, root / name)
    return done


def read(results: Path) -> CliScore:
    [summary] = list(results.rglob("results_*.json"))
    res = json.loads(summary.read_text())["results"]["mmlu"]
    requests = {}
    for f in results.rglob("samples_mmlu_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]  # samples_<task>_<timestamp>.jsonl
        for line in f.read_text().splitlines():
            row = json.loads(line)
            requests[(task, row["doc_id"])] = [(float(r[0][0]), r[0][1] in (True, "True")) for r in row["resps"]]
    return CliScore(res["acc,none"], res["acc_stderr,none"], requests)


def engine_requests(result_dir: Path) -> dict[tuple[str, int], list[tuple[float, bool]]]:
    """What the engine runner logged for each request (``mmlu_samples.jsonl``), keyed as :func:`read` keys lm-eval's."""
    rows = [json.loads(line) for line in (result_dir / "mmlu_samples.jsonl").read_text().splitlines()]
    return {(r["task"], r["doc_id"]): [(float(ll), bool(g)) for ll, g in r["resps"]] for r in rows}


def largest_difference(engine: dict, cli: CliScore) -> float:
    """The largest difference of one request's log-likelihood between the two; the same requests on both sides,
    with the same greedy verdicts where they are clear."""
    assert engine.keys() == cli.requests.keys() and engine, (len(engine), len(cli.requests))
    worst = 0.0
    for key, choices in engine.items():
        theirs = cli.requests[key]
        assert len(choices) == len(theirs), key
        for (a, _), (b, _) in zip(choices, theirs):
            worst = max(worst, abs(a - b))
    return worst


def near_ties(cli: CliScore, tol: float) -> int:
    """Questions whose two likeliest choices are within ``tol`` of each other in lm-eval's log-likelihoods: where
    a difference within ``tol`` may pick another answer."""
    ties = 0
    for choices in cli.requests.values():
        best = sorted((ll for ll, _ in choices), reverse=True)
        ties += len(best) > 1 and best[0] - best[1] < tol
    return ties
