"""Shared fixtures. Launcher tests run the real ``deepspeed`` CLI on CPU (gloo), as a cluster would."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"


def pytest_configure(config):
    # One cache for the whole session (and the launcher subprocesses, which inherit the environment), so the
    # tiny model is built once and never read from a developer's own ~/.cache.
    if "LORAPLUS_CACHE" not in os.environ:
        os.environ["LORAPLUS_CACHE"] = str(Path(config.rootpath) / ".pytest_cache" / "loraplus")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    random.seed(0)
    torch.manual_seed(0)


@dataclass(frozen=True)
class Installed:
    """The built wheel installed alone into an empty directory (``site``), to be run from ``cwd``, a directory
    outside the checkout: ``env`` puts ``site`` first on PYTHONPATH and its ``bin`` first on PATH, so that
    ``loraplus-train`` and every process it starts import the installed package, not this checkout."""
    site: Path
    cwd: Path
    env: dict

    def command(self, name: str) -> str:
        return str(self.site / "bin" / name)


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Installed:
    """``pip wheel`` of this checkout, ``pip install --no-deps --target`` of that wheel into an empty directory
    (the dependencies are this environment's, as for any user)."""
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root), str(REPO)], check=True,
                   cwd=root, capture_output=True, timeout=300)
    (wheel,) = root.glob("loraplus_pipeline-*.whl")
    site, cwd = root / "site", root / "elsewhere"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": f"{site / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return Installed(site, cwd, env)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from pipeline.model.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tok(tiny_model_dir):
    """The tiny model's tokenizer."""
    from pipeline.model.load import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


#: Three instruction samples (one without ``input``) for the data tests.
RECS = [{"instruction": "What is 2 plus 3?", "input": "", "output": "2 plus 3 is 5."},
        {"instruction": "Spell the word backwards.", "input": "river", "output": "revir"},
        {"instruction": "Give the opposite of the word.", "input": "hot", "output": "The opposite of hot is cold."}]


def ds_config(stage: str) -> str:
    """The DeepSpeed JSON a launcher test runs ``stage`` (``zero0`` .. ``zero3_offload``) with: the shipped file,
    except that under ZeRO-3 every parameter is partitioned (``stage3_param_persistence_threshold`` 0).

    The shipped threshold (100,000 elements) suits a real model, whose projections it partitions; every tensor of
    the tiny test models is below it, so with it a ZeRO-3 test would run with every weight whole on every rank and
    no gather collective. The file is written once per content under the temp directory (the launcher's ranks, a
    second node and a SLURM job all read it by path)."""
    shipped = REPO / "deepspeed_configs" / f"{stage}.json"
    ds = json.loads(shipped.read_text())
    if ds.get("zero_optimization", {}).get("stage") != 3:
        return f"deepspeed_configs/{stage}.json"
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return str(write_once(f"loraplus-tests-{stage}", ".json", json.dumps(ds, indent=1) + "\n"))


def write_once(prefix: str, suffix: str, text: str) -> Path:
    """``text`` in a file under the temp directory named by its content (``prefix-<hash><suffix>``), written once
    and atomically, so that concurrent test sessions and every process of a launch read the same complete file."""
    import hashlib
    import tempfile

    path = Path(tempfile.gettempdir()) / f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:12]}{suffix}"
    if not path.is_file():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


#: MMLU scored by the training ranks at the start and after each save (eval.mmlu.runner=engine), 0-shot, two
#: questions a subject (each of two ranks runs lm-eval on its question), every request logged: what the launcher
#: tests compare with lm-eval's CLI (tests/lm_eval_cli.py).
ENGINE_SCORING = ("eval.mmlu.every_checkpoint=true", "eval.mmlu.runner=engine", "eval.mmlu.num_fewshot=0",
                  "eval.mmlu.limit=2", "eval.mmlu.log_samples=true")


#: What the start log says of a ZeRO-3 run with ``ds_config``'s JSON: nothing kept whole.
ALL_PARTITIONED = re.compile(r"ZeRO-3: ([\d,]+) of \1 parameter tensors partitioned, 0 kept whole on every rank")


def train_command(args: list[str], nprocs: int = 0, port: int | None = None) -> list[str]:
    """launch/train.py through ``deepspeed --num_gpus N`` when ``nprocs`` > 0, else as plain python. MMLU scoring
    at checkpoints is off unless the arguments turn it on (it has tests of its own)."""
    if not any(a.startswith("eval.mmlu.every_checkpoint=") for a in args):
        args = [*args, "eval.mmlu.every_checkpoint=false"]
    if nprocs:
        port = port or random.randint(20000, 40000)
        return ["deepspeed", "--num_gpus", str(nprocs), "--master_port", str(port), str(TRAIN), *args]
    return [sys.executable, str(TRAIN), *args]


def run_train(args: list[str], nprocs: int = 0, timeout: int = 600, port: int | None = None,
              check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run launch/train.py to completion (see ``train_command``); ``env`` adds environment variables.

    A multi-rank run that succeeds must leave none of DeepSpeed's shm segments in /dev/shm (66 MiB of RAM per
    rank each, which DeepSpeed never unlinks: ``pipeline.distributed.release_shm_segment``); any a run leaves is
    removed, so that a failure cannot fill the memory of the tests after it."""
    cmd = train_command(args, nprocs, port)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if nprocs:
        from pipeline.distributed import remove_shm_segments

        left = remove_shm_segments(cmd[cmd.index("--master_port") + 1])
        assert proc.returncode != 0 or not left, f"the run left DeepSpeed's shm segments behind: {left}"
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def held_out_loss(model, rows) -> tuple[float, int]:
    """The token-weighted next-token loss of ``model`` over ``rows`` (prepared samples), each row alone and
    unpacked, as plain transformers/PEFT computes it: (loss, label tokens). What the training loop's validation must
    reproduce."""
    import torch

    from pipeline.data.formats import IGNORE_INDEX

    total, tokens = 0.0, 0
    for i in range(len(rows)):
        ids, labels = (torch.tensor(x, dtype=torch.long)[None] for x in (rows[i].input_ids, rows[i].labels))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX,
                                                         reduction="sum"))
        tokens += int((labels[0, 1:] != IGNORE_INDEX).sum())
    return total / tokens, tokens


def read_metrics(output_dir: Path) -> list[dict]:
    """The step rows of ``metrics.jsonl`` (not the rows of events after a step, such as an MMLU score's pause)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r]


def trained_after(rows: list[dict], ref: list[dict], at: int) -> tuple[list[dict], list[dict]]:
    """The rows a run resumed from step ``at`` trained itself, and the reference's rows of the same steps: both
    runs logged every step once, and the resumed run's rows after ``at`` are its own (logged after the whole
    reference run ended), not the copies of the reference's that its output_dir started with."""
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, len(ref) + 1))
    new, old = rows[at:], ref[at:]
    assert new and all(r["time"] > ref[-1]["time"] for r in new), "the resumed run trained no step of its own"
    assert rows[:at] == ref[:at]  # the copied history, untouched
    return new, old


def tensorboard_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the event files of ``logdir``, read by TensorBoard's own loader: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_records(run_file: Path) -> list:
    """The records of a W&B ``run-<id>.wandb`` file (what ``wandb sync`` uploads), as ``wandb_internal_pb2.Record``.

    The file is a 7-byte header (``:W&B``, magic, version) and then LevelDB's log format: 32 KiB blocks of
    records, each with a 7-byte header (crc32c, length, type: full, first, middle, last) and a payload; a record
    may span blocks. wandb 0.31 ships no reader of its own in Python (its core is Go), so this is one.
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", run_file
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left - 7
            continue
        part += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def wandb_history(wandb_dir: Path) -> list[dict]:
    """The logged rows of every offline run under ``wandb_dir`` (oldest first): key -> value."""
    rows = []
    for run_file in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        for r in wandb_records(run_file):
            if r.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in r.history.item})
    return rows
