"""The best checkpoint (``checkpoints/best``, kept by ``train.keep_last``), base-vs-best in ``mmlu.md``, the plots,
and the trackers' failure path, without a launcher. The trackers in a real run (TensorBoard's reader, a W&B
offline run) are tested on the embedded default run (tests/test_distributed.py) and their failure in a real run in
tests/test_mmlu.py."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import rundir
from pipeline.config import LoggingConfig
from pipeline.eval import report
from pipeline.observe.trackers import Trackers
from pipeline.train import checkpoint


def _row(step: int, acc: float, stderr: float | None = 0.03) -> dict:
    return {"step": step, "acc": acc, "acc_stderr": stderr, "stem": acc, "humanities": acc, "social_sciences": acc,
            "other": acc, "data": "sample", "num_fewshot": 5, "limit": None}


def _run_with_checkpoints(root: Path, steps) -> Path:
    for s in steps:
        (rundir.step_dir(root, s) / "adapter").mkdir(parents=True)
    return root


def test_best_follows_the_scores_and_survives_keep_last(tmp_path):
    out = _run_with_checkpoints(tmp_path / "run", [10, 20, 30, 40])
    assert report.choose_best(out) is None and rundir.best_name(out) is None  # nothing scored yet
    report.record(out, _row(0, 0.25))  # the base model is never "best": it is not a checkpoint
    assert rundir.best_name(out) is None
    for step, acc, best in ((10, 0.40, "step-10"), (20, 0.55, "step-20"), (30, 0.50, "step-20"),
                            (40, 0.55, "step-20")):  # equal accuracy: the earlier checkpoint stays
        report.record(out, _row(step, acc))
        assert rundir.best_name(out) == best, step
    checkpoint._retain(out, keep_last=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-20", "step-40"]
    text = (out / "mmlu.md").read_text()
    assert "| 20 **best** |" in text and "| 0 (base model) |" in text
    assert "+0.3000 over the base model" in text and "larger than its stderr" in text
    for name in ("mmlu.png", "mmlu.md"):
        assert (out / name).stat().st_size > 0


def test_best_by_validation_loss_when_nothing_is_scored(tmp_path):
    out = _run_with_checkpoints(tmp_path / "run", [5, 10, 15])
    (out / "val.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n"
                                           for s, v in ((0, 3.0), (5, 2.0), (10, 1.5), (15, 1.7))))
    assert report.choose_best(out) == "step-10" == rundir.best_name(out)
    checkpoint._retain(out, keep_last=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-10", "step-15"]
    # a score, once there, decides (MMLU over validation loss)
    report.record(out, _row(15, 0.6))
    assert rundir.best_name(out) == "step-15"


def test_verdict_says_whether_the_gain_is_beyond_the_stderr():
    rows = [_row(0, 0.25, 0.03), _row(15, 0.28, 0.03)]
    text = report.verdict(rows)
    assert "+0.0300 over the base model" in text and "stderr is 0.0424" in text and "no clear difference" in text
    assert "larger than its stderr" in report.verdict([_row(0, 0.25), _row(15, 0.40)])
    worse = report.verdict([_row(0, 0.40), _row(15, 0.25)])
    assert "-0.1500 over the base model" in worse and "scores below the base model" in worse
    assert "base model was not scored" in report.verdict([_row(15, 0.40)])
    assert report.verdict([_row(0, 0.25)]) == "No checkpoint scored yet."


def test_loss_plot_has_loss_and_both_learning_rates(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3 / s, "lr_groups": {"lora_A": 1e-4 / s, "lora_B": 1.6e-3 / s}}) + "\n"
        for s in range(1, 31)))
    (tmp_path / "val.jsonl").write_text(json.dumps({"step": 30, "val_loss": 0.2}) + "\n")
    import matplotlib.image

    path = report.plot_losses(tmp_path)
    assert path == tmp_path / "loss.png" and matplotlib.image.imread(path).shape[2] in (3, 4)
    assert report.plot_losses(tmp_path / "empty") is None
    assert report.smooth([1.0, 1.0, 1.0]) == [1.0, 1.0, 1.0]  # debiased: no pull towards 0 at the start


def test_a_tracker_that_fails_is_one_warning_and_the_rest_goes_on(tmp_path):
    (tmp_path / "tensorboard").write_text("a file where the event directory would go")
    lines: list[str] = []
    t = Trackers(tmp_path, LoggingConfig(tensorboard=True), {"seed": 1}, warn=lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: TensorBoard logging is off for this run: ")
    assert not t.active
    t.log(1, {"train/loss": 1.0})
    t.mmlu_rows([_row(1, 0.5)])
    t.close()
    assert len(lines) == 1 and not (tmp_path / "trackers.json").exists()


def test_trackers_log_numbers_only_and_each_score_once(tmp_path):
    from tests.conftest import tensorboard_scalars

    t = Trackers(tmp_path, LoggingConfig(tensorboard=True), {"seed": 1}, warn=print)
    t.log(1, {"train/loss": 2.0, "train/mfu": None, "train/grad_norm": float("nan")})
    t.mmlu_rows([_row(0, 0.25), _row(1, 0.5)])
    t.mmlu_rows([_row(0, 0.25), _row(1, 0.5), _row(2, 0.6)])
    t.close()
    again = Trackers(tmp_path, LoggingConfig(tensorboard=True), {"seed": 1}, warn=print)  # a resumed start
    again.mmlu_rows([_row(0, 0.25), _row(1, 0.5), _row(2, 0.6)])  # already logged by the first: nothing
    again.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == {1: 2.0} and "train/mfu" not in scalars and "train/grad_norm" not in scalars
    assert scalars["eval/mmlu/acc"] == {0: 0.25, 1: 0.5, 2: 0.6000000238418579}
    state = json.loads((tmp_path / "trackers.json").read_text())
    assert state["mmlu_logged"] == [0, 1, 2] and state["config_logged"] == ["tensorboard"]


def test_a_tracker_asked_for_but_not_installed_is_refused_in_one_line(monkeypatch):
    import importlib.util

    import pytest

    from pipeline.errors import UserError
    from pipeline.observe import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    trackers.check_installed(LoggingConfig(tensorboard=True))  # installed: nothing to say
    with pytest.raises(UserError, match=r"logging.wandb=true needs the wandb package, which is not installed: pip "
                                        r"install tensorboard wandb \(or pip install -e '.\[trackers\]'\)"):
        trackers.check_installed(LoggingConfig(wandb=True))
