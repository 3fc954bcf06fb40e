"""Whole data files through the cache: reading, errors with file and line, the cache's key, locking, damage and
rebuilds, sharegpt, validation sets, and packed rows that keep documents apart."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data.builtin import BUNDLED_DATA, generate_dataset
from pipeline.data.formats import IGNORE_INDEX, DataError, collate, tokenize_record
from pipeline.data.prepared import prepare, verify
from tests.conftest import RECS, REPO


@pytest.fixture
def prep(tmp_path, tok, tiny_model_dir):
    """``prep(path, seq_len=256, **DataConfig keys)`` -> (Prepared, log lines), cached under this test's tmp_path."""
    def run(path, seq_len=256, log=None, **kw):
        lines = [] if log is None else log
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        p = prepare(DataConfig(path=str(path), **kw), tok, str(tiny_model_dir), seq_len, log=lines.append)
        return p, lines
    return run


def write_jsonl(path: Path, records, blank_after=()) -> Path:
    lines = []
    for i, r in enumerate(records):
        lines.append(json.dumps(r))
        if i in blank_after:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n")
    return path


def ids_of(rows) -> list[list[int]]:
    return [list(map(int, rows[i].input_ids)) for i in range(len(rows))]


def expected(records, tok, fmt="instruction") -> list[list[int]]:
    return [tokenize_record(r, "", fmt, tok).input_ids for r in records]


# ----------------------------------------------------------------------------------------------------------
# Reading every kind of file, and its errors


def test_jsonl_blank_lines_and_line_numbers(tmp_path, prep, tok):
    p = write_jsonl(tmp_path / "d.jsonl", RECS, blank_after=(0,))
    data, _ = prep(p)
    assert ids_of(data.train) == expected(RECS, tok)
    assert [int(x) for x in data.train.column("source")] == [0, 2, 3]  # the rows' own line numbers, less 1
    p.write_text(p.read_text() + '{"instruction": "x", "output": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:5: malformed JSON"):
        prep(p)


def test_json_parquet_and_saved_datasets(tmp_path, prep, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = expected(RECS, tok)
    (tmp_path / "d.json").write_text(json.dumps({"data": RECS}))
    assert ids_of(prep(tmp_path / "d.json")[0].train) == want
    pq.write_table(pa.Table.from_pylist(RECS), tmp_path / "d.parquet")
    assert ids_of(prep(tmp_path / "d.parquet")[0].train) == want
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECS[:2]),
                          "test": datasets.Dataset.from_list(RECS[2:])}).save_to_disk(str(tmp_path / "dict"))
    assert ids_of(prep(tmp_path / "dict")[0].train) == want[:2]
    assert ids_of(prep(tmp_path / "dict", split="test")[0].train) == want[2:]
    with pytest.raises(DataError) as info:
        prep(tmp_path / "dict", split="validation")
    assert all(w in str(info.value) for w in ("validation", "train", "test", "data.split"))


@pytest.mark.parametrize("name, content, match", [
    ("bad.json", '[\n {"text": "a"},\n {"text": }\n]', r"bad\.json:3"),
    ("rows.json", json.dumps({"rows": RECS}), "list"),
    ("d.csv", "a,b\n1,2\n", r"\.csv"),
    ("empty.jsonl", "\n\n", "empty"),
    ("latin1.jsonl", None, r"latin1\.jsonl:2: not valid UTF-8"),
])
def test_unreadable_files_are_named(tmp_path, prep, name, content, match):
    p = tmp_path / name
    if content is None:
        p.write_bytes(json.dumps(RECS[0]).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n')
    else:
        p.write_text(content)
    with pytest.raises(DataError, match=match):
        prep(p)
    with pytest.raises(DataError, match="not found"):
        prep(tmp_path / "missing.jsonl")
    (tmp_path / "plain_dir").mkdir(exist_ok=True)
    with pytest.raises(DataError, match="save_to_disk"):
        prep(tmp_path / "plain_dir")


@pytest.mark.parametrize("fmt, record, field", [
    ("instruction", {"instruction": "Say hi."}, "output"),
    ("instruction", {"prompt": "Say hi.", "output": "hi"}, "instruction"),
    ("instruction", {"instruction": "Say hi.", "output": 3}, "output"),
    ("text", {"content": "hello"}, "text"),
])
def test_missing_field_names_field_and_line(tmp_path, prep, fmt, record, field):
    good = RECS[0] if fmt == "instruction" else {"text": "hello"}
    p = write_jsonl(tmp_path / "d.jsonl", [good, record])
    with pytest.raises(DataError) as info:
        prep(p, format=fmt)
    assert f"'{field}'" in str(info.value) and f"{p}:2" in str(info.value)


def test_too_long_refuse_truncate_and_dropped(tmp_path, prep, tok):
    long = {"instruction": "Write these digits as words.", "input": "1 2 3",
            "output": " ".join(["one two three four five six seven eight nine"] * 6)}
    long_prompt = {"instruction": "Sort these words alphabetically. " * 12, "input": "", "output": "apple"}
    p = write_jsonl(tmp_path / "d.jsonl", [RECS[0], long, long_prompt])
    whole = tokenize_record(long, "", "instruction", tok)
    seq_len = max(len(expected([RECS[0]], tok)[0]), sum(t == IGNORE_INDEX for t in whole.labels) + 5)
    assert len(whole.input_ids) > seq_len
    with pytest.raises(DataError) as info:
        prep(p, seq_len=seq_len, too_long="refuse")
    assert f"{p}:2" in str(info.value) and f"seq_len={seq_len}" in str(info.value)

    data, log = prep(p, seq_len=seq_len)
    assert len(data.train) == 2
    assert list(data.train[1].input_ids) == whole.input_ids[:seq_len]
    assert list(data.train[1].labels) == whole.labels[:seq_len]
    assert "2 samples" in log[-1] and "1 truncated" in log[-1] and "1 dropped with no response left" in log[-1]
    # nothing left to learn from: an error, not an empty run
    with pytest.raises(DataError, match="seq_len"):
        prep(write_jsonl(tmp_path / "d2.jsonl", [long_prompt]), seq_len=seq_len)


# ----------------------------------------------------------------------------------------------------------
# ShareGPT


def test_sharegpt_is_chat_rendered_by_the_template(tmp_path, prep, tok):
    turns = [("system", "Be brief."), ("human", "What is 2 plus 3?"), ("gpt", "2 plus 3 is 5."),
             ("user", "And the capital of Peru?"), ("assistant", "Lima.")]
    role = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    share = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    chat = {"messages": [{"role": role[f], "content": v} for f, v in turns]}
    data, _ = prep(write_jsonl(tmp_path / "s.jsonl", [share]), format="sharegpt")
    want = tokenize_record(chat, "", "chat", tok)
    assert list(data.train[0].input_ids) == want.input_ids and list(data.train[0].labels) == want.labels


@pytest.mark.parametrize("turn, match", [
    ({"from": "bot", "value": "hi"}, r"conversations\[1\] has role 'bot'"),
    ({"from": "gpt"}, r"conversations\[1\] \(gpt\) has no 'value'"),
    ({"from": "gpt", "value": 5}, r"conversations\[1\] \(gpt\) has a 'value' of type int"),
])
def test_sharegpt_bad_turns_name_file_and_line(tmp_path, prep, turn, match):
    ok = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad = {"conversations": [{"from": "human", "value": "hi"}, turn]}
    p = write_jsonl(tmp_path / "s.jsonl", [ok, ok, bad])
    with pytest.raises(DataError, match=rf"s\.jsonl:3: {match}"):
        prep(p, format="sharegpt")


# ----------------------------------------------------------------------------------------------------------
# Validation sets


def test_val_fraction_is_a_fixed_disjoint_split(tmp_path, prep):
    data, log = prep(BUNDLED_DATA, val_fraction=0.1)
    train = {int(x) for x in data.train.column("source")}
    val = {int(x) for x in data.val.column("source")}
    assert len(val) == 500 and len(train) == 4500 and not train & val
    assert any("held out (data.val_fraction=0.1)" in line for line in log)
    again, _ = prep(BUNDLED_DATA, val_fraction=0.1, cache_dir=str(tmp_path / "other"))  # rebuilt from scratch
    assert {int(x) for x in again.val.column("source")} == val


def test_val_path_errors(tmp_path, prep):
    train = write_jsonl(tmp_path / "t.jsonl", RECS)
    chat = write_jsonl(tmp_path / "v.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"v\.jsonl:1: data.format=instruction needs a field 'instruction'"):
        prep(train, val_path=str(chat), format="instruction")
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"e\.jsonl: the dataset is empty \(config key 'data.val_path'\)"):
        prep(train, val_path=str(empty))
    with pytest.raises(DataError, match="holds out no sample"):
        prep(train, val_fraction=0.1)  # 10% of 3 samples


def test_unwritable_cache_dir_is_one_line(tmp_path, prep):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"data.cache_dir: cannot write to .*a_file/cache"):
        prep(BUNDLED_DATA, cache_dir=str(blocker / "cache"))


# ----------------------------------------------------------------------------------------------------------
# The cache: keyed, reused, checked, rebuilt, built once


def test_second_start_reuses_the_cache_and_the_key_covers_the_settings(tmp_path, prep, tok, tiny_model_dir):
    p = write_jsonl(tmp_path / "d.jsonl", RECS)
    first, log = prep(p)
    assert any("cache built" in line for line in log)
    again, log = prep(p)
    assert again.key == first.key and any("nothing tokenised" in line for line in log)
    assert not any("cache built" in line for line in log)
    keys = {first.key, prep(p, seq_len=128)[0].key, prep(p, packing=True)[0].key,
            prep(p, too_long="refuse")[0].key, prep(p, val_path=str(p))[0].key}
    assert len(keys) == 5
    write_jsonl(p, RECS[::-1])  # same size, other content
    assert prep(p)[0].key != first.key
    # another chat template is another tokenizer: another key
    import shutil

    other = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    moved = prepare(DataConfig(path=str(p), cache_dir=str(tmp_path / "cache")), tok, str(other), 256)
    assert moved.key != prep(p)[0].key


def test_damaged_cache_is_rebuilt_with_one_warning(tmp_path, prep):
    data, _ = prep(BUNDLED_DATA)
    arrow = next(data.directory.rglob("*.arrow"))
    size = arrow.stat().st_size
    with open(arrow, "r+b") as f:
        f.truncate(size // 2)
    assert "differs" in verify(data.directory)
    again, log = prep(BUNDLED_DATA)
    warnings = [line for line in log if "warning" in line]
    assert len(warnings) == 1 and "unusable" in warnings[0] and "rebuilding" in warnings[0]
    assert verify(again.directory) is None and len(again.train) == 5000
    (again.directory / "manifest.json").unlink()
    assert "manifest" in verify(again.directory)
    assert len(prep(BUNDLED_DATA)[0].train) == 5000


def test_a_killed_build_is_never_used(tmp_path, tiny_model_dir):
    """SIGKILL a prepare_data.py while it tokenises: no cache appears, and the next start builds a whole one."""
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps(r) + "\n" for r in generate_dataset(60_000, seed=1)))
    cache = tmp_path / "cache"
    cmd = [sys.executable, str(REPO / "launch" / "prepare_data.py"), f"data.path={big}", f"data.cache_dir={cache}",
           "data.num_proc=1"]
    proc = subprocess.Popen([sys.executable, "-u", *cmd[1:]], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # killed once it has read the file and is tokenising
        if line.startswith("data: tokenising"):
            time.sleep(1.0)
            break
    proc.kill()
    proc.wait()
    assert any(cache.glob(".build-*")), "the build was not caught in the middle"
    assert not [d for d in cache.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "stat"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    built = Path(done.stdout.strip().splitlines()[-1])
    assert verify(built) is None and "60,000 samples" in done.stdout


def test_concurrent_starts_build_once_and_share_a_data_error(tmp_path):
    """Two processes (two ranks, or two jobs) that need the same cache: one builds, the other waits and reads
    it. On bad data the waiter stops with the builder's error without tokenising again."""
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in generate_dataset(30_000, seed=2)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"instruction": "no output"}\n')
    cache = tmp_path / "cache"

    def both(path):
        cmd = [sys.executable, str(REPO / "launch" / "prepare_data.py"), f"data.path={path}",
               f"data.cache_dir={cache}", "data.num_proc=1"]
        procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        return [(p.wait(), *p.communicate()) for p in procs]

    results = both(good)
    assert [r[0] for r in results] == [0, 0], results
    outs = [r[1] for r in results]
    assert sum("tokenising" in o for o in outs) == 1, outs
    assert sum("nothing tokenised" in o for o in outs) == 1
    assert len({o.strip().splitlines()[-1] for o in outs}) == 1  # the same cache directory

    results = both(bad)
    assert [r[0] for r in results] == [2, 2]
    assert sum("tokenising" in r[1] for r in results) == 1, results
    for _, _, err in results:
        assert f"error: {bad}:30001: data.format=instruction needs a field 'output'" in err
        assert "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------
# Packed rows keep documents apart


def _flash_attn_usable() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.parametrize("attn", ["sdpa", "eager", pytest.param("flash_attention_2", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not _flash_attn_usable(), reason="flash_attention_2 needs a CUDA GPU and "
                                        "flash-attn; sdpa and eager are checked on CPU")])])
def test_each_documents_loss_in_a_packed_row_equals_its_loss_alone(prep, tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    from pipeline.train.loop import model_inputs

    flash = attn == "flash_attention_2"  # bf16 on a GPU (flash-attention has no fp32), the batch flattened
    device = "cuda" if flash else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16 if flash else torch.float32,
                                                 attn_implementation=attn).to(device).eval()
    data, _ = prep(BUNDLED_DATA, packing=True, seq_len=200)
    rows = [data.train[i] for i in range(4)]
    assert all(len(r.segments) >= 2 for r in rows)
    batch = collate(rows, pad_id=0)
    width = batch["input_ids"].shape[1]

    def token_losses(inputs, labels):
        with torch.no_grad():
            logits = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}).logits
        labels = labels.to(device)
        ce = torch.nn.functional.cross_entropy(logits.float()[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                               ignore_index=IGNORE_INDEX, reduction="none")
        ce = torch.cat([ce, ce.new_zeros(1)]) if flash else ce  # flattened: back to [rows, width - 1] below
        return (ce.view(-1, width)[:, :-1] if flash else ce.view(labels.shape[0], -1)).cpu()

    packed = token_losses(*model_inputs(batch, device, flatten=flash))
    crosstalk = token_losses({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                             batch["labels"])
    worst, differs = 0.0, 0
    for i, row in enumerate(rows):
        start = 0
        for n in row.segments:
            doc = batch["input_ids"][i:i + 1, start:start + n]
            labels = batch["labels"][i:i + 1, start:start + n]
            alone = token_losses({"input_ids": doc, "attention_mask": torch.ones_like(doc)}, labels).sum()
            # position p of the packed row predicts token p + 1: the document's losses sit at start..start+n-2
            inside = packed[i, start:start + n - 1].sum()
            worst = max(worst, abs(float(inside - alone)) / max(1.0, abs(float(alone))))
            differs += start > 0 and abs(float(crosstalk[i, start:start + n - 1].sum() - alone)) > 1e-3
            start += n
    print(f"{attn}: largest relative difference of a document's loss, packed vs alone: {worst:.2e}")
    assert worst < (2e-2 if flash else 1e-5), worst  # bf16 logits against fp32 ones
    assert differs > 0  # the same rows with a plain attention mask do attend across documents: the test can fail


def test_validation_rows_hold_the_same_documents_packed_and_unpacked(prep):
    """What makes the step-0 validation loss equal packed and unpacked: the same tokens carry the same labels
    (each document's first token, which nothing predicts, aside)."""
    data, _ = prep(BUNDLED_DATA, val_fraction=0.05)
    packed, _ = prep(BUNDLED_DATA, val_fraction=0.05, packing=True)

    def labelled(rows):
        return sum(int((np.asarray(rows[i].labels)[1:] != IGNORE_INDEX).sum()) for i in range(len(rows)))

    assert len(packed.val) < len(data.val)
    assert labelled(packed.val) == labelled(data.val) > 0
