"""Score every checkpoint of a run that has no MMLU result yet, as checkpoints appear.

    loraplus-watch --run OUTPUT_DIR [--once] [--poll SECONDS] [--mmlu-data DIR|sample] [--num-fewshot K]
                   [--memory-gb auto|GiB] ...
    python eval/watch.py ...        (from a checkout)

For a separate eval GPU or node that shares the run's filesystem. The base model is scored first, as step 0
(into OUTPUT_DIR/base/mmlu.json; --no-base skips it), then each checkpoint once: only sealed checkpoints whose
files match their manifest are read (never a save in progress), a checkpoint with an mmlu.json is skipped, and a
per-checkpoint lock keeps two watchers (or the training run's own scorer) from scoring the same one. Stop it at
any time (Ctrl-C) and start it again. Each result is appended to OUTPUT_DIR/mmlu.jsonl, mmlu.png / mmlu.md are
redrawn, checkpoints/best is moved if the new score is the best, and the run's trackers (logging.tensorboard,
logging.wandb in its config.yaml) get eval/mmlu/* at the checkpoint's step.
"""

import argparse
import json
import time
from pathlib import Path

from pipeline import rundir
from pipeline.errors import UserError, exit_on_user_error
from pipeline.eval.score import add_eval_args, check_eval_args, evaluate_one


def wanted(args, cache: Path) -> dict:
    """The setting (data, shots, limit, subjects) this watcher scores with, as ``mmlu.json`` records it."""
    from pipeline.eval.score import setting_of

    return setting_of(args, cache).record()


def run_config(run: Path) -> dict:
    """The run's resolved ``config.yaml`` as a mapping (empty if it has none, or it does not read)."""
    import yaml

    try:
        tree = yaml.safe_load((run / "config.yaml").read_text())
        return tree if isinstance(tree, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def base_model(run: Path) -> Path | None:
    """The run's base model directory (scored as step 0), or ``None`` if it has none on disk (random weights)."""
    model = run_config(run).get("model") or {}
    if model.get("random_init") or not model.get("name_or_path"):
        return None
    return Path(model["name_or_path"])


def pending(run: Path, verified: set[Path], setting: dict, with_base: bool = True) -> tuple[list[Path], list[dict]]:
    """What has no result for ``setting`` yet (the base model's ``run/base`` first, then sealed, verified
    checkpoints, oldest first), and the results already in ``mmlu.json`` files (recorded again, in case a scorer
    stopped between writing one and recording it)."""
    from pipeline.eval import score
    from pipeline.train import checkpoint

    todo, done = [], []
    candidates = [run / "base"] if with_base and base_model(run) is not None else []
    for path in candidates + [path for _, path in sorted(rundir.sealed_steps(run))]:
        try:
            summary = json.loads((path / "mmlu.json").read_text())
            if score.setting(summary) == setting:
                done.append(summary)
                continue
        except (OSError, ValueError, KeyError):
            pass  # no result yet (or one from another setting): score it
        if path.name != "base" and path not in verified:
            if checkpoint.verify(path) is not None:
                continue  # being replaced, or damaged: training's resume deals with it
            verified.add(path)
        todo.append(path)
    return todo, done


def score_pending(run: Path, args, cache: Path, verified: set[Path], failed: set[Path], log=print,
                  trackers=None) -> int:
    """One pass; returns how many models were scored. One that fails is reported once and skipped from then on
    (by this process), so it cannot hold up the ones after it. ``trackers`` get every row recorded."""
    from pipeline.errors import UserError
    from pipeline.eval import report, score
    from pipeline.files import locked

    setting = wanted(args, cache)
    todo, done = pending(run, verified, setting, with_base=not args.no_base)
    for summary in done:
        report.record(run, score.table_row(summary))
    scored = 0
    for path in todo:
        if path in failed:
            continue
        try:
            if path.name == "base":
                path.mkdir(exist_ok=True)
            with locked(path / ".mmlu.lock", blocking=False) as mine:
                if not mine:
                    continue  # another scorer has it
                if path.name == "base":
                    summary = score.evaluate_target(score.Target(Path(args.base or base_model(run)), None, 0,
                                                                       path), args, cache)
                else:
                    summary = evaluate_one(path, args, cache)
        except (UserError, OSError, RuntimeError, ValueError) as e:
            if path.is_dir():
                failed.add(path)
                log(f"{'base model' if path.name == 'base' else path.name}: not scored: {e}")
            continue  # else deleted meanwhile (train.keep_last)
        report.record(run, score.table_row(summary))
        what = "base model (step 0)" if path.name == "base" else path.name
        log(f"{what}: MMLU {score.headline(summary)} in {summary['wall_s']:.1f} s")
        scored += 1
    if trackers is not None:
        trackers.mmlu_rows(report.read_rows(run))
    return scored


def open_trackers(run: Path, log=print):
    """The run's trackers as its ``config.yaml`` sets them (``logging.*``), to log scores into the same run."""
    from pipeline.config import LoggingConfig
    from pipeline.observe.trackers import Trackers

    known = {k: v for k, v in (run_config(run).get("logging") or {}).items()
             if k in LoggingConfig.__dataclass_fields__}
    try:
        cfg = LoggingConfig(**known)
    except TypeError:
        return None
    return Trackers(run, cfg, None, warn=log) if cfg.tensorboard or cfg.wandb else None


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a training run's output_dir")
    p.add_argument("--once", action="store_true", help="score what is there now, then exit")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between looks for new checkpoints")
    p.add_argument("--no-base", action="store_true", help="do not score the base model as step 0")
    p.add_argument("--no-trackers", action="store_true",
                   help="do not log scores to the run's TensorBoard / W&B (the training run's own scorer: the "
                        "training process logs them)")
    add_eval_args(p)
    args = p.parse_args(argv)
    run = Path(args.run).expanduser().resolve()
    if args.num_fewshot is None:  # the shots the run's own scorer uses, so that both fill one table
        shots = str(((run_config(run).get("eval") or {}).get("mmlu") or {}).get("num_fewshot", ""))
        args.num_fewshot = int(shots) if shots.isdigit() else None
    check_eval_args(args)
    if not (run / "checkpoints").is_dir() and not (run / "config.yaml").is_file():
        raise UserError(f"--run {run} is not a training run's output_dir (no config.yaml or checkpoints/)")
    from pipeline.eval import mmlu
    from pipeline.files import cache_dir

    if not args.hub:
        mmlu.resolve(args.mmlu_data, args.num_fewshot, cache_dir())  # bad data: fail now, not at the first checkpoint
    verified: set[Path] = set()
    failed: set[Path] = set()
    trackers = None if args.no_trackers else open_trackers(run)
    try:
        while True:
            score_pending(run, args, cache_dir(), verified, failed, trackers=trackers)
            if args.once:
                break
            time.sleep(args.poll)
    except KeyboardInterrupt:
        print("stopped; start it again to go on (nothing is scored twice)")
    finally:
        if trackers is not None:
            trackers.close()
    if (run / "mmlu.md").is_file():
        print((run / "mmlu.md").read_text())


if __name__ == "__main__":
    main()
