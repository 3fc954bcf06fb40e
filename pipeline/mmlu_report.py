"""A run's MMLU record: ``mmlu.jsonl`` (one row per scored checkpoint), ``mmlu.png`` (accuracy against step
with stderr bars; training loss and, when the run has a validation set, validation loss on a second axis) and
``mmlu.md`` (a table naming the best checkpoint, with the validation loss at each scored step).

Writers (the in-training scorer, any number of watchers) serialise on an ``flock`` of ``output_dir/.mmlu.lock``:
a step already in ``mmlu.jsonl`` is never appended twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.evaluate import CATEGORIES
from pipeline.files import atomic_write_text, locked


def read_rows(output_dir: Path) -> list[dict]:
    path = output_dir / "mmlu.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return sorted(rows, key=lambda r: r["step"])


SETTING = ("data", "num_fewshot", "limit")


def record(output_dir: Path, row: dict) -> bool:
    """Add ``row`` unless the same step with the same setting (data, shots, limit) is there; a row of that step
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


def best(rows: list[dict]) -> dict | None:
    """The highest accuracy; the earliest step among equals."""
    return max(rows, key=lambda r: (r["acc"], -r["step"])) if rows else None


def table(rows: list[dict], val_loss: dict[int, float] | None = None) -> str:
    """The markdown table; ``val_loss`` (step -> validation loss) adds its column when the run has one."""
    val_loss = val_loss or {}
    head = "| step | MMLU acc | ± stderr | " + " | ".join(c.replace("_", " ") for c in CATEGORIES) + " |"
    head += " val loss |\n" if val_loss else "\n"
    head += "|---:|---:|---:|" + "---:|" * len(CATEGORIES) + ("---:|\n" if val_loss else "\n")
    top = best(rows)
    lines = []
    for r in rows:
        mark = " **best**" if r is top else ""
        cell = f" {_num(val_loss.get(r['step']))} |" if val_loss else ""
        lines.append(f"| {r['step']}{mark} | {r['acc']:.4f} | {_num(r['acc_stderr'])} | "
                     + " | ".join(f"{r[c]:.4f}" for c in CATEGORIES) + f" |{cell}\n")
    verdict = (f"\nBest checkpoint: **step-{top['step']}** (acc {top['acc']:.4f} ± {_num(top['acc_stderr'])}).\n"
               if top else "\nNo checkpoint scored yet.\n")
    return "# MMLU by checkpoint\n\n" + head + "".join(lines) + verdict


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "n/a"


def _losses(output_dir: Path, name: str = "metrics.jsonl", key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of ``key`` in the JSONL file ``name`` of the run (rows cut short by a crash skipped)."""
    path = output_dir / name
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get(key) is not None:
                out.append((row["step"], row[key]))
    return out


def plot(rows: list[dict], losses: list[tuple[int, float]], path: Path,
         val: list[tuple[int, float]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if rows:
        ax.errorbar([r["step"] for r in rows], [r["acc"] for r in rows], yerr=[r["acc_stderr"] or 0.0 for r in rows],
                    marker="o", capsize=3, color="tab:blue", label="MMLU acc")
        top = best(rows)
        ax.annotate(f"best: step {top['step']}", (top["step"], top["acc"]), textcoords="offset points",
                    xytext=(0, 10), ha="center", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("MMLU accuracy", color="tab:blue")
    if losses or val:
        ax2 = ax.twinx()
        if losses:
            ax2.plot([s for s, _ in losses], [v for _, v in losses], color="tab:gray", alpha=0.6, label="train loss")
        if val:
            ax2.plot([s for s, _ in val], [v for _, v in val], color="tab:orange", marker="s", markersize=3,
                     label="validation loss")
        ax2.set_ylabel("loss", color="tab:gray")
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_title("MMLU accuracy by checkpoint")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
