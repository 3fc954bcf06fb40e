"""The built-in assets, generated here and shipped in ``assets/``: the bundled training data (instruction tasks, and
multiple-choice questions in MMLU's prompt layout) and the bundled MMLU sample (57 subjects in the hub layout of
``cais/mmlu``, questions this project writes itself); and MMLU's shape on disk (its subjects, splits and hub layout),
which both the sample and the scorer's data checks use.

``python -m pipeline.data.builtin`` rewrites the bundled data file and the sample (deterministic; tests check that
the committed files equal what this module generates). Nothing here downloads."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


BUNDLED_DATA = ASSETS / "tiny_instruct.jsonl"


CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Chile": "Santiago",
    "Greece": "Athens", "Poland": "Warsaw", "India": "New Delhi", "Cuba": "Havana", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Austria": "Vienna", "Sweden": "Stockholm", "Finland": "Helsinki", "Ghana": "Accra",
}


OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "early": "late",
    "happy": "sad", "open": "closed", "full": "empty", "strong": "weak", "old": "new", "high": "low",
    "wet": "dry", "loud": "quiet", "rich": "poor", "hard": "soft", "near": "far", "first": "last",
}


WORDS = ["apple", "river", "stone", "cloud", "garden", "window", "silver", "forest", "planet", "candle",
         "bridge", "yellow", "winter", "rocket", "pencil", "tiger", "ocean", "castle", "mirror", "violin"]


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _example(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == 1:
        country = rng.choice(sorted(CAPITALS))
        return {"instruction": f"What is the capital of {country}?", "input": "",
                "output": f"The capital of {country} is {CAPITALS[country]}."}
    if kind == 2:
        word = rng.choice(sorted(OPPOSITES))
        return {"instruction": "Give the opposite of the word.", "input": word,
                "output": f"The opposite of {word} is {OPPOSITES[word]}."}
    if kind == 3:
        word = rng.choice(WORDS)
        return {"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]}
    if kind == 4:
        digits = [rng.randrange(10) for _ in range(rng.randrange(2, 6))]
        return {"instruction": "Write these digits as words.", "input": " ".join(map(str, digits)),
                "output": " ".join(NUMBER_WORDS[d] for d in digits)}
    if kind == 5:  # the base model meets " A" .. " D", MMLU's answer letters, as often as any other letter
        letter = rng.choice(_LETTERS[:-1])
        after = _LETTERS[_LETTERS.index(letter) + 1]
        return {"instruction": f"Which letter comes after {letter}?", "input": "",
                "output": f"The letter after {letter} is {after}."}
    words = rng.sample(WORDS, rng.randrange(3, 6))
    return {"instruction": "Sort these words alphabetically.", "input": ", ".join(words),
            "output": ", ".join(sorted(words))}


def generate_dataset(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """The bundled instruction tasks: short templated tasks a tiny model visibly learns within minutes."""
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


MULTIPLE_CHOICE = 3000  # of the bundled file's 5,000 lines: enough that 60 steps lift the MMLU sample off chance


def multiple_choice(n: int = MULTIPLE_CHOICE, seed: int = 1) -> list[dict[str, str]]:
    """``prompt``/``completion`` records in MMLU's prompt layout, exactly as lm-eval's ``mmlu`` task puts a
    question with no shots, drawn from the generator of the bundled MMLU sample (``question``) and never one
    of the sample's own questions (question and choices); the completion is the answer, `` X``."""

    rng, names, banned = random.Random(seed), list(subjects()), sample_questions()
    out = []
    while len(out) < n:
        subject = rng.choice(names)
        row = question(rng, subject)
        if (row["question"], tuple(row["choices"])) not in banned:
            out.append({"prompt": zero_shot_prompt(row, subject), "completion": " " + "ABCD"[row["answer"]]})
    return out


def bundled_records() -> list[dict[str, str]]:
    """The bundled file: the instruction tasks and the multiple-choice records, shuffled together (seeded)."""
    records = generate_dataset() + multiple_choice()
    random.Random(2).shuffle(records)
    return records


def write_bundled_dataset(path: Path = BUNDLED_DATA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in bundled_records()))


def corpus_lines() -> list[str]:
    lines = []
    for r in (json.loads(x) for x in BUNDLED_DATA.read_text().splitlines()):
        lines += [r["prompt"] + r["completion"]] if "prompt" in r else [r["instruction"], r["input"], r["output"]]
    # Template words of the instruction and chat formats, so that they tokenize compactly.
    lines += ["### Instruction:", "### Input:", "### Response:", "<|user|>", "<|assistant|>", "<|system|>"]
    return lines


# ----------------------------------------------------------------------------------------------------------
# MMLU's shape, and the bundled sample


SPLITS = ("dev", "validation", "test")


SAMPLE = Path(__file__).resolve().parent / "assets" / "mmlu_sample"


def subjects() -> dict[str, str]:
    """Subject -> category (stem, humanities, social_sciences, other), as lm-eval's ``mmlu`` task defines them."""
    import lm_eval
    import yaml

    found = {}
    for path in sorted((Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default").glob("mmlu_*.yaml")):
        spec = yaml.safe_load(path.read_text())
        found[spec["dataset_name"]] = spec["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    return found


def write_hub_layout(rows: dict[str, dict[str, list[dict]]], out: Path) -> None:
    """``rows[subject][split]`` -> ``out/<subject>/<split>-00000-of-00001.parquet`` + ``out/README.md``.
    Written under a temporary name and renamed, so a reader never sees half of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    configs = []
    for subject in sorted(rows):
        (tmp / subject).mkdir(parents=True)
        for split in SPLITS:
            table = pa.table({
                "question": [r["question"] for r in rows[subject][split]],
                "subject": [subject] * len(rows[subject][split]),
                "choices": pa.array([r["choices"] for r in rows[subject][split]], type=pa.list_(pa.string())),
                "answer": pa.array([r["answer"] for r in rows[subject][split]], type=pa.int64()),
            })
            pq.write_table(table, tmp / subject / f"{split}-00000-of-00001.parquet")
        configs.append(f"- config_name: {subject}\n  data_files:\n" + "".join(
            f"  - split: {split}\n    path: {subject}/{split}-*\n" for split in SPLITS))
    (tmp / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def word_kinds() -> list[tuple[str, list[str]]]:
    """The four kinds of word the bundled questions ask about, in their one fixed order as choices, with the
    words of each kind that the bundled training data uses (above)."""

    return [("a city", sorted(CAPITALS.values())), ("a number", list(NUMBER_WORDS)),
            ("a describing word", sorted(set(OPPOSITES) | set(OPPOSITES.values()))),
            ("a thing", sorted(WORDS))]


def question(rng: random.Random, subject: str) -> dict:
    """One question of the bundled sample's kind: what kind of word a word is. The choices are the four kinds,
    always in the same order (as MMLU's ``moral_scenarios`` keeps its four choices fixed), so the answer follows
    from the word alone; its letter is uniform over A-D. Phrased per subject."""
    kinds = word_kinds()
    answer = rng.randrange(4)
    word = rng.choice(kinds[answer][1])
    return {"question": f"In {subject.replace('_', ' ')}, what kind of word is \"{word}\"?",
            "choices": [k for k, _ in kinds], "answer": answer}


def zero_shot_prompt(row: dict, subject: str) -> str:
    """``row`` exactly as lm-eval's ``mmlu`` task puts it to the model with no shots: the subject's description,
    then ``doc_to_text`` (question, lettered choices, ``Answer:``); the answer is the continuation `` X``."""
    choices = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", row["choices"]))
    return (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            f"{row['question'].strip()}{choices}\nAnswer:")


def sample_rows(seed: int = 0, dev: int = 5, test: int = 4) -> dict[str, dict[str, list[dict]]]:
    """The bundled sample: :func:`question` for every subject, with seeded answers. Not MMLU's content: a stand-in
    with MMLU's shape (57 subjects, 4 choices, dev/validation/test) whose kind of question the bundled training
    data teaches (never these questions themselves; see :func:`multiple_choice`)."""
    rng = random.Random(seed)
    return {subject: {split: [question(rng, subject) for _ in range(count)]
                      for split, count in (("dev", dev), ("validation", 1), ("test", test))}
            for subject in subjects()}


def sample_questions() -> set[tuple[str, tuple[str, ...]]]:
    """(question, choices) of every row of the bundled sample, of every split: the training data never holds one."""
    return {(r["question"], tuple(r["choices"])) for splits in sample_rows().values() for rows in splits.values()
            for r in rows}


if __name__ == "__main__":
    write_bundled_dataset()
    write_hub_layout(sample_rows(), SAMPLE)
    print(f"wrote {BUNDLED_DATA} and {SAMPLE}")
