"""MMLU data on disk: the subjects lm-eval's ``mmlu`` task scores, checking a local copy, reading the CSV release,
and the small sample this project ships. Scoring itself is lm-eval's (``pipeline/eval/score.py``).

Layouts accepted for ``--mmlu-data``:

- the Hugging Face hub layout of ``cais/mmlu``: ``<subject>/{dev,validation,test}-00000-of-00001.parquet`` and a
  ``README.md`` whose YAML front matter lists each subject under ``configs:`` (columns ``question``, ``subject``,
  ``choices`` (4 strings), ``answer`` (0-3));
- the original CSV release: ``data/dev/<subject>_dev.csv`` and ``data/test/<subject>_test.csv`` (no header;
  question, 4 choices, answer letter), converted once into the hub layout.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.data.builtin import SAMPLE, SPLITS, subjects, write_hub_layout
from pipeline.errors import UserError

HOW_TO_GET = ("get the data with `huggingface-cli download cais/mmlu --repo-type dataset --local-dir DIR` on a "
              "machine with network access (or the CSV release, https://people.eecs.berkeley.edu/~hendrycks/data.tar)"
              " and pass --mmlu-data DIR; --mmlu-data sample scores the small bundled sample; --hub reads cais/mmlu "
              "from the Hugging Face hub")


class MmluDataError(UserError):
    pass


def resolve(path: str | None, num_fewshot: int, cache: Path) -> Path:
    """The hub-layout directory to hand lm-eval: ``sample``, a hub-layout copy, or a CSV release (converted into
    ``cache``). Every subject, split and row is checked first.

    Raises:
        MmluDataError: no data given, a subject or split missing, a malformed row; the message says where.
    """
    if path is None:
        raise MmluDataError(f"no MMLU data: {HOW_TO_GET}")
    root = SAMPLE if path == "sample" else Path(path).expanduser().resolve()
    if not root.is_dir():
        raise MmluDataError(f"--mmlu-data {root} is not a directory; {HOW_TO_GET}")
    if (root / "data" / "test").is_dir() and (root / "data" / "dev").is_dir():
        root = _from_csv(root / "data", cache)
    check(root, num_fewshot)
    return root


def check_subjects(names: list[str], option: str = "eval.mmlu.subjects") -> None:
    """Every name one of lm-eval's MMLU subjects.

    Raises:
        UserError: one is not; the message names it, and the nearest subject.
    """
    import difflib

    from pipeline.errors import UserError

    known = sorted(subjects())
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            raise UserError(f"{option}: {name!r} is not an MMLU subject" +
                            (f" (did you mean {near[0]!r}?)" if near else f" (the subjects: {', '.join(known)})"))


def test_questions(root: Path, names: list[str]) -> dict[str, int]:
    """Subject -> questions in its ``test`` split (all subjects, or ``names``), from the parquet footers."""
    import pyarrow.parquet as pq

    return {s: sum(pq.read_metadata(f).num_rows for f in (root / s).glob("test-*.parquet"))
            for s in (names or subjects())}


def check(root: Path, num_fewshot: int) -> None:
    """Every subject of lm-eval's ``mmlu`` present in the hub layout, with well-formed rows."""
    import pyarrow.parquet as pq

    if not (root / "README.md").is_file():
        raise MmluDataError(f"{root} has no README.md listing the subjects (the hub layout of cais/mmlu); "
                            f"{HOW_TO_GET}")
    listed = _readme_configs(root / "README.md")
    for subject in subjects():
        if subject not in listed:
            raise MmluDataError(f"{root / 'README.md'} does not list subject '{subject}' under configs: (datasets "
                                f"finds a subject only through that list)")
        for split in SPLITS:
            files = sorted((root / subject).glob(f"{split}-*.parquet"))
            if not files:
                raise MmluDataError(f"{root}: subject '{subject}' has no {split} split "
                                    f"({root / subject}/{split}-00000-of-00001.parquet)")
            for f in files:
                try:
                    table = pq.read_table(f)
                except Exception as e:  # noqa: BLE001  (any unreadable file is the user's to fix)
                    raise MmluDataError(f"{f}: not a readable parquet file ({e})") from None
                missing = {"question", "choices", "answer"} - set(table.column_names)
                if missing:
                    raise MmluDataError(f"{f}: missing column(s) {', '.join(sorted(missing))}")
                for i, row in enumerate(table.select(["question", "choices", "answer"]).to_pylist()):
                    _check_row(row, f"{f} row {i}")
                if split == "dev" and table.num_rows < num_fewshot:
                    raise MmluDataError(f"{f}: {table.num_rows} dev rows, fewer than --num-fewshot {num_fewshot}")


def _readme_configs(readme: Path) -> set[str]:
    """The ``config_name`` entries of a hub README's YAML front matter."""
    import yaml

    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return set()
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return set()
    return {c.get("config_name") for c in front.get("configs", []) if isinstance(c, dict)}


def _check_row(row: dict, where: str) -> None:
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise MmluDataError(f"{where}: empty question")
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise MmluDataError(f"{where}: 'choices' must be a list of 4 strings; got {choices!r}")
    if row["answer"] not in (0, 1, 2, 3):
        raise MmluDataError(f"{where}: 'answer' must be 0, 1, 2 or 3; got {row['answer']!r}")


def _from_csv(data: Path, cache: Path) -> Path:
    """The CSV release converted into the hub layout under ``cache`` (keyed by the files' sizes and times)."""
    from pipeline.files import files_key, locked

    key = files_key(data, "*.csv")
    out = cache / f"mmlu-csv-{key}"
    if (out / "README.md").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / f".mmlu-csv-{key}.lock"):  # several ranks or watchers may get here at once
        if not (out / "README.md").is_file():
            write_hub_layout(_read_csv_release(data), out)
    return out


def _read_csv_release(data: Path) -> dict[str, dict[str, list[dict]]]:
    rows: dict[str, dict[str, list[dict]]] = {}
    for subject in subjects():
        rows[subject] = {}
        for split, folder in (("dev", "dev"), ("validation", "val"), ("test", "test")):
            path = data / folder / f"{subject}_{folder}.csv"
            if not path.is_file():
                if split == "validation":  # lm-eval's mmlu never reads it
                    rows[subject][split] = []
                    continue
                raise MmluDataError(f"{data}: subject '{subject}' has no {split} file ({path})")
            rows[subject][split] = _read_csv(path)
    return rows


def _read_csv(path: Path) -> list[dict]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, rec in enumerate(csv.reader(f), start=1):
            if len(rec) != 6 or rec[5].strip() not in ("A", "B", "C", "D"):
                raise MmluDataError(f"{path}:{n}: expected question, 4 choices and an answer letter A-D; "
                                    f"got {len(rec)} field(s)")
            out.append({"question": rec[0], "choices": rec[1:5], "answer": "ABCD".index(rec[5].strip())})
    return out
