"""A run's MMLU record and its pictures: ``mmlu.jsonl`` (one row per scored model: the base model as step 0, then
each checkpoint), ``mmlu.md`` (the table, base vs best with the stderr), ``mmlu.png`` (accuracy with stderr bars
by step, validation loss and smoothed training loss on a second axis, the best checkpoint marked), ``loss.png``
(training and validation loss; the lr of each LoRA+ group on a log axis), and ``checkpoints/best``.

``checkpoints/best`` names the checkpoint with the highest MMLU accuracy (the earliest among equals), or, while no
checkpoint has a score (MMLU off), the lowest validation loss; :func:`choose_best` re-reads both each time a
score or a checkpoint lands. ``train.keep_last`` never deletes it (``checkpoint._retain``, under the same lock).

Writers (the in-training scorer, any number of watchers) serialise on an ``flock`` of ``output_dir/.mmlu.lock``:
a step already in ``mmlu.jsonl`` is never appended twice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline import rundir
from pipeline.eval.score import CATEGORIES, SETTING
from pipeline.files import atomic_write_text, locked


def read_rows(output_dir: Path) -> list[dict]:
    """The rows of ``mmlu.jsonl`` by step (a line cut short by a crash skipped)."""
    return [row for _, row in sorted(_jsonl(output_dir / "mmlu.jsonl"), key=lambda sr: sr[0])]


def record(output_dir: Path, row: dict) -> bool:
    """Add ``row`` unless the same step with the same setting (data, shots, limit, subjects) is there; a row of that step
    with another setting is replaced. Then redraw the plot and the table. True if the file changed."""
    with locked(output_dir / ".mmlu.lock"):
        rows = read_rows(output_dir)
        same_step = [r for r in rows if r["step"] == row["step"]]
        if any(all(r.get(k) == row.get(k) for k in SETTING) for r in same_step):
            return False
        if same_step:
            kept = [r for r in rows if r["step"] != row["step"]] + [row]
            atomic_write_text(output_dir / "mmlu.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        else:
            with open(output_dir / "mmlu.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        redraw(output_dir)
        return True


def redraw(output_dir: Path) -> None:
    rows = read_rows(output_dir)
    val = _losses(output_dir, "val.jsonl", "val_loss")
    atomic_write_text(output_dir / "mmlu.md", table(rows, dict(val)))
    plot(rows, _losses(output_dir), output_dir / "mmlu.png", val)
    choose_best(output_dir)


def base_row(rows: list[dict]) -> dict | None:
    """The base model's score (step 0), if it was scored."""
    return next((r for r in rows if r["step"] == 0), None)


def best(rows: list[dict]) -> dict | None:
    """The checkpoint (step > 0) with the highest accuracy; the earliest step among equals."""
    scored = [r for r in rows if r["step"] > 0]
    return max(scored, key=lambda r: (r["acc"], -r["step"])) if scored else None


def choose_best(output_dir: Path) -> str | None:
    """Point ``checkpoints/best`` at the best checkpoint still on disk: by MMLU accuracy if any checkpoint has a
    score, else by validation loss (the lowest; the earliest among equals). Returns its name (``None``: none)."""

    root = rundir.checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    with locked(output_dir / rundir.BEST_LOCK):
        on_disk = {step for step, _ in rundir.sealed_steps(output_dir)}
        top = best([r for r in read_rows(output_dir) if r["step"] in on_disk])
        if top is None:
            val = [(v, s) for s, v in _losses(output_dir, "val.jsonl", "val_loss") if s in on_disk]
            top = {"step": min(val)[1]} if val else None
        if top is None:
            return None
        name = f"step-{top['step']}"
        if rundir.best_name(output_dir) != name:
            atomic_write_text(root / rundir.BEST, name + "\n")
        return name


def verdict(rows: list[dict]) -> str:
    """Base vs best, with the stderr of their difference and whether the difference is larger."""
    top, base = best(rows), base_row(rows)
    if top is None:
        return "No checkpoint scored yet."
    line = f"Best checkpoint: **step-{top['step']}** (acc {top['acc']:.4f} ± {_num(top['acc_stderr'])})"
    if base is None:
        return line + "; the base model was not scored."
    diff = top["acc"] - base["acc"]
    if top["acc_stderr"] is None or base["acc_stderr"] is None:
        return line + f": {diff:+.4f} over the base model (acc {base['acc']:.4f}; no stderr to compare with)."
    se = (top["acc_stderr"] ** 2 + base["acc_stderr"] ** 2) ** 0.5
    judged = ("larger than its stderr" if diff > se else
              "larger than its stderr: the best checkpoint scores below the base model" if diff < -se else
              "within its stderr: no clear difference")
    return line + (f": {diff:+.4f} over the base model (acc {base['acc']:.4f} ± {base['acc_stderr']:.4f}); the "
                   f"difference's stderr is {se:.4f}, so the difference is {judged}.")


def table(rows: list[dict], val_loss: dict[int, float] | None = None) -> str:
    """The markdown table; ``val_loss`` (step -> validation loss) adds its column when the run has one."""
    val_loss = val_loss or {}
    head = "| step | MMLU acc | ± stderr | " + " | ".join(c.replace("_", " ") for c in CATEGORIES) + " |"
    head += " val loss |\n" if val_loss else "\n"
    head += "|---:|---:|---:|" + "---:|" * len(CATEGORIES) + ("---:|\n" if val_loss else "\n")
    top = best(rows)
    lines = []
    for r in rows:
        mark = " **best**" if r is top else " (base model)" if r["step"] == 0 else ""
        cell = f" {_num(val_loss.get(r['step']))} |" if val_loss else ""
        lines.append(f"| {r['step']}{mark} | {r['acc']:.4f} | {_num(r['acc_stderr'])} | "
                     + " | ".join(f"{r[c]:.4f}" for c in CATEGORIES) + f" |{cell}\n")
    return "# MMLU by checkpoint\n\n" + head + "".join(lines) + "\n" + verdict(rows) + "\n"


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"


def _losses(output_dir: Path, name: str = "metrics.jsonl", key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of ``key`` in the JSONL file ``name`` of the run (rows cut short by a crash skipped)."""
    return [(s, row[key]) for s, row in _jsonl(output_dir / name) if row.get(key) is not None]


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                out.append((row["step"], row))
    return out


def smooth(values: list[float]) -> list[float]:
    """A debiased exponential moving average (TensorBoard's smoothing) over about a twentieth of the curve."""
    span = max(1, len(values) // 20)
    weight = 1 - 2 / (span + 1)
    out, avg = [], 0.0
    for k, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** k) if weight else v)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    _pyplot().close(fig)
    os.replace(tmp, path)


def plot(rows: list[dict], losses: list[tuple[int, float]], path: Path,
         val: list[tuple[int, float]] | None = None) -> None:
    """``mmlu.png``: accuracy with stderr bars by step (the base model at step 0), the best checkpoint starred;
    validation loss and smoothed training loss on the second axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    handles = []
    if rows:
        handles.append(ax.errorbar([r["step"] for r in rows], [r["acc"] for r in rows],
                                   yerr=[r["acc_stderr"] or 0.0 for r in rows], marker="o", capsize=3,
                                   color="tab:blue", label="MMLU acc ± stderr"))
        top, base = best(rows), base_row(rows)
        if top is not None:
            handles.append(ax.scatter([top["step"]], [top["acc"]], marker="*", s=220, color="gold",
                                      edgecolors="black", zorder=5, label=f"best: step {top['step']}"))
        if base is not None:
            ax.annotate("base model", (0, base["acc"]), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("MMLU accuracy", color="tab:blue")
    if losses or val:
        ax2 = ax.twinx()
        if losses:
            steps, values = [s for s, _ in losses], [v for _, v in losses]
            ax2.plot(steps, values, color="tab:gray", alpha=0.25, linewidth=0.8)
            handles += ax2.plot(steps, smooth(values), color="tab:gray", label="train loss (smoothed)")
        if val:
            handles += ax2.plot([s for s, _ in val], [v for _, v in val], color="tab:orange", marker="s",
                                markersize=3, label="validation loss")
        ax2.set_ylabel("loss", color="tab:gray")
    if handles:
        ax.legend(handles=handles, loc="center right", fontsize=8)
    ax.set_title("MMLU accuracy by checkpoint")
    fig.tight_layout()
    _save(fig, path)


def plot_losses(output_dir: Path) -> Path | None:
    """``loss.png``: training loss (raw and smoothed) and validation loss; below it, the lr of every LoRA+ group on
    a log axis. Drawn at the end of every run; ``None`` if the run has no steps."""
    rows = _jsonl(output_dir / "metrics.jsonl")
    if not rows:
        return None
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.5), dpi=120, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    losses = [(s, r["loss"]) for s, r in rows if r.get("loss") is not None]
    if losses:
        steps, values = [s for s, _ in losses], [v for _, v in losses]
        top.plot(steps, values, color="tab:gray", alpha=0.3, linewidth=0.8, label="train loss")
        top.plot(steps, smooth(values), color="tab:gray", label="train loss (smoothed)")
    val = _losses(output_dir, "val.jsonl", "val_loss")
    if val:
        top.plot([s for s, _ in val], [v for _, v in val], color="tab:orange", marker="s", markersize=3,
                 label="validation loss")
    top.set_ylabel("loss")
    top.legend(fontsize=8)
    top.set_title("Training")
    groups = sorted({g for _, r in rows for g in (r.get("lr_groups") or {})})
    for g in groups:
        pts = [(s, r["lr_groups"][g]) for s, r in rows if (r.get("lr_groups") or {}).get(g, 0) > 0]
        if pts:
            bottom.plot([s for s, _ in pts], [v for _, v in pts], label=f"lr {g}")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_ylabel("learning rate")
    if groups:
        bottom.legend(fontsize=8)
    fig.tight_layout()
    path = output_dir / "loss.png"
    _save(fig, path)
    return path
