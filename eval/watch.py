#!/usr/bin/env python
"""Score every checkpoint of a run that has no MMLU result yet, as checkpoints appear.

    python eval/watch.py --run OUTPUT_DIR [--once] [--poll SECONDS] [--mmlu-data DIR|sample] [--num-fewshot K] ...

For a separate eval GPU or node that shares the run's filesystem. Each checkpoint is scored once: only sealed
checkpoints whose files match their manifest are read (never a save in progress), a checkpoint with an
mmlu.json is skipped, and a per-checkpoint lock keeps two watchers (or the training run's own scorer) from
scoring the same one. Stop it at any time (Ctrl-C) and start it again. Each result is appended to
OUTPUT_DIR/mmlu.jsonl and mmlu.png / mmlu.md are redrawn.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.errors import UserError, exit_on_user_error  # noqa: E402
from pipeline.evaluate import add_eval_args, check_eval_args, evaluate_one  # noqa: E402


def pending(run: Path, verified: set[Path]) -> list[Path]:
    """Sealed, verified checkpoints without a result, oldest first."""
    from pipeline import checkpoint

    out = []
    for _, path in sorted(checkpoint.sealed_steps(run)):
        if (path / "mmlu.json").is_file():
            continue
        if path not in verified:
            if checkpoint.verify(path) is not None:
                continue  # being replaced, or damaged: training's resume deals with it
            verified.add(path)
        out.append(path)
    return out


def score_pending(run: Path, args, cache: Path, verified: set[Path], log=print) -> int:
    """One pass; returns how many checkpoints were scored."""
    from pipeline import evaluate, mmlu_report

    scored = 0
    for path in pending(run, verified):
        with mmlu_report.locked(path.parent / f".{path.name}.mmlu.lock", blocking=False) as mine:
            if not mine or (path / "mmlu.json").is_file() or not path.is_dir():
                continue  # another scorer has it, or it is gone (retention)
            summary = evaluate_one(path, args, cache)
        mmlu_report.record(run, evaluate.table_row(summary))
        log(f"{path.name}: MMLU {evaluate.headline(summary)} in {summary['wall_s']:.1f} s")
        scored += 1
    return scored


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a training run's output_dir")
    p.add_argument("--once", action="store_true", help="score what is there now, then exit")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between looks for new checkpoints")
    add_eval_args(p)
    args = p.parse_args(argv)
    check_eval_args(args)
    run = Path(args.run).expanduser().resolve()
    if not (run / "checkpoints").is_dir() and not (run / "config.yaml").is_file():
        raise UserError(f"--run {run} is not a training run's output_dir (no config.yaml or checkpoints/)")
    from pipeline import mmlu
    from pipeline.tiny import cache_dir

    if not args.hub:
        mmlu.resolve(args.mmlu_data, args.num_fewshot, cache_dir())  # bad data: fail now, not at the first checkpoint
    verified: set[Path] = set()
    try:
        while True:
            score_pending(run, args, cache_dir(), verified)
            if args.once:
                break
            time.sleep(args.poll)
    except KeyboardInterrupt:
        print("stopped; start it again to go on (nothing is scored twice)")
    if (run / "mmlu.md").is_file():
        print((run / "mmlu.md").read_text())


if __name__ == "__main__":
    main()
