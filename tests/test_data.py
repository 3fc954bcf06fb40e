"""Reading, tokenising (response-only labels), packing, sharded batching and collation."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from pipeline.data import (IGNORE_INDEX, DataError, Sample, build_samples, collate, epoch_order,
                           global_batch_indices, pack, rank_micro_batches, read_records, tokenize_record)
from pipeline.tiny import BUNDLED_DATA, generate_dataset

RECS = [{"instruction": "What is 2 plus 3?", "input": "", "output": "2 plus 3 is 5."},
        {"instruction": "Spell the word backwards.", "input": "river", "output": "revir"},
        {"instruction": "Give the opposite of the word.", "input": "hot", "output": "The opposite of hot is cold."}]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from pipeline.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def write_jsonl(path, records, blank_after=()):
    lines = []
    for i, r in enumerate(records):
        lines.append(json.dumps(r))
        if i in blank_after:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n")
    return path


def labelled_runs(sample):
    """Maximal runs of consecutive positions that carry loss, as lists of label ids."""
    runs, cur = [], []
    for label in sample.labels:
        if label != IGNORE_INDEX:
            cur.append(label)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


# ----------------------------------------------------------------------------------------------------------
# Reading


def test_read_jsonl_skips_blank_lines(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", RECS, blank_after=(0,))
    out = read_records(p)
    assert [r for _, r in out] == RECS
    assert [w for w, _ in out] == [f"{p}:1", f"{p}:3", f"{p}:4"]  # line numbers are the file's own


def test_read_json_list_and_data_key(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(RECS, indent=1))
    assert [r for _, r in read_records(p)] == RECS
    p.write_text(json.dumps({"data": RECS}))
    assert [r for _, r in read_records(p)] == RECS
    p.write_text(json.dumps({"rows": RECS}))
    with pytest.raises(DataError, match="list"):
        read_records(p)


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECS), p)
    out = read_records(p)
    assert [r for _, r in out] == RECS
    assert str(p) in out[0][0]


def test_read_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(RECS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert [r for _, r in read_records(tmp_path / "one")] == RECS

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECS[:2]),
                               "test": datasets.Dataset.from_list(RECS[2:])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert [r for _, r in read_records(tmp_path / "dict")] == RECS[:2]
    assert [r for _, r in read_records(tmp_path / "dict", split="test")] == RECS[2:]
    with pytest.raises(DataError) as info:
        read_records(tmp_path / "dict", split="validation")
    msg = str(info.value)
    assert "validation" in msg and "train" in msg and "test" in msg and "data.split" in msg


def test_read_errors(tmp_path):
    p = write_jsonl(tmp_path / "file.jsonl", RECS[:2])
    p.write_text(p.read_text() + '{"instruction": "x", "output": \n')
    with pytest.raises(DataError) as info:
        read_records(p)
    assert "file.jsonl:3" in str(info.value)

    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.jsonl")
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"\.csv"):
        read_records(csv)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        read_records(tmp_path / "plain_dir")
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match="bad.json:3"):
        read_records(bad)


def test_empty_dataset(tmp_path, tok):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    assert read_records(p) == []
    with pytest.raises(DataError, match="empty"):
        build_samples(read_records(p), "instruction", tok, 64, "truncate")


# ----------------------------------------------------------------------------------------------------------
# Tokenising


@pytest.mark.parametrize("rec", RECS, ids=["no-input", "input", "input2"])
def test_instruction_labels_only_response(tok, rec):
    s = tokenize_record(rec, "x:1", "instruction", tok)
    assert len(s.input_ids) == len(s.labels)
    n_prompt = s.labels.index(next(t for t in s.labels if t != IGNORE_INDEX))
    assert all(t == IGNORE_INDEX for t in s.labels[:n_prompt])
    assert s.labels[n_prompt:] == s.input_ids[n_prompt:]
    assert tok.decode(s.labels[n_prompt:]) == rec["output"] + tok.eos_token
    assert s.input_ids[0] == tok.bos_token_id and s.input_ids[-1] == tok.eos_token_id
    prompt = tok.decode(s.input_ids[1:n_prompt])
    assert rec["instruction"] in prompt and prompt.endswith("### Response:\n")
    assert ("### Input:" in prompt) == bool(rec["input"])


def test_text_labels_everything(tok):
    s = tokenize_record({"text": "The capital of Peru is Lima."}, "x:1", "text", tok)
    assert s.labels == s.input_ids
    assert s.input_ids[0] == tok.bos_token_id and s.input_ids[-1] == tok.eos_token_id
    assert tok.decode(s.input_ids[1:-1]) == "The capital of Peru is Lima."


def test_chat_labels_only_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "2 plus 3 is 5."},
            {"role": "user", "content": "What is the capital of Peru?"},
            {"role": "assistant", "content": "The capital of Peru is Lima."}]
    s = tokenize_record({"messages": msgs}, "x:1", "chat", tok)
    assert len(s.input_ids) == len(s.labels)
    # labels equal ids wherever they are set
    assert all(lab == i for lab, i in zip(s.labels, s.input_ids) if lab != IGNORE_INDEX)
    runs = [tok.decode(r) for r in labelled_runs(s)]
    assert len(runs) == 2
    for run, content in zip(runs, [msgs[2]["content"], msgs[4]["content"]]):
        # content + EOS exactly; the template's "\n" after EOS is formatting and carries no loss
        assert run == content + tok.eos_token, repr(run)
    unlabelled = tok.decode([i for i, lab in zip(s.input_ids, s.labels) if lab == IGNORE_INDEX])
    for m in msgs[:2] + msgs[3:4]:
        assert m["content"] in unlabelled
    assert "<|assistant|>" in unlabelled  # the generation prompt carries no loss
    assert tok.decode(s.input_ids) == tok.apply_chat_template(msgs, tokenize=False)


def test_chat_errors(tok):
    with pytest.raises(DataError, match="no assistant"):
        tokenize_record({"messages": [{"role": "user", "content": "hi"}]}, "f.jsonl:4", "chat", tok)
    with pytest.raises(DataError, match="f.jsonl:5"):
        tokenize_record({"messages": []}, "f.jsonl:5", "chat", tok)
    with pytest.raises(DataError, match="messages"):
        tokenize_record({"text": "hi"}, "f.jsonl:6", "chat", tok)


@pytest.mark.parametrize("fmt, record, field", [
    ("instruction", {"instruction": "Say hi."}, "output"),
    ("instruction", {"prompt": "Say hi.", "output": "hi"}, "instruction"),
    ("instruction", {"instruction": "Say hi.", "output": 3}, "output"),
    ("text", {"content": "hello"}, "text"),
])
def test_missing_field_names_field_and_location(tmp_path, tok, fmt, record, field):
    good = RECS[0] if fmt == "instruction" else {"text": "hello"}
    p = write_jsonl(tmp_path / "d.jsonl", [good, record])
    with pytest.raises(DataError) as info:
        build_samples(read_records(p), fmt, tok, 256, "truncate")
    msg = str(info.value)
    assert f"'{field}'" in msg and f"{p}:2" in msg


def test_too_long_refuse_and_truncate(tmp_path, tok):
    long = {"instruction": "Write these digits as words.", "input": "1 2 3",
            "output": " ".join(["one two three four five six seven eight nine"] * 6)}
    p = write_jsonl(tmp_path / "d.jsonl", [RECS[0], long])
    long_sample = tokenize_record(long, "", "instruction", tok)
    n_long = len(long_sample.input_ids)
    n_prompt = sum(t == IGNORE_INDEX for t in long_sample.labels)
    seq_len = max(len(tokenize_record(RECS[0], "", "instruction", tok).input_ids), n_prompt + 5)
    assert n_long > seq_len
    with pytest.raises(DataError) as info:
        build_samples(read_records(p), "instruction", tok, seq_len, "refuse")
    msg = str(info.value)
    assert f"{p}:2" in msg and f"seq_len={seq_len}" in msg and str(n_long) in msg

    samples, rep = build_samples(read_records(p), "instruction", tok, seq_len, "truncate")
    assert rep.samples == 2 and rep.truncated == 1 and rep.dropped_no_labels == 0
    assert len(samples[1].input_ids) == seq_len == len(samples[1].labels)
    assert samples[1].input_ids == long_sample.input_ids[:seq_len]
    assert samples[1].labels == long_sample.labels[:seq_len]
    assert rep.tokens == sum(len(s.input_ids) for s in samples)


def test_sample_whose_response_is_cut_is_dropped(tmp_path, tok):
    long_prompt = {"instruction": "Sort these words alphabetically. " * 12, "input": "", "output": "apple"}
    p = write_jsonl(tmp_path / "d.jsonl", [RECS[0], long_prompt, RECS[1]])
    seq_len = max(len(tokenize_record(r, "", "instruction", tok).input_ids) for r in RECS[:2])
    long_sample = tokenize_record(long_prompt, "", "instruction", tok)
    prompt_len = sum(t == IGNORE_INDEX for t in long_sample.labels)
    assert prompt_len > seq_len
    samples, rep = build_samples(read_records(p), "instruction", tok, seq_len, "truncate")
    assert rep.samples == 2 == len(samples)
    assert rep.truncated == 1 and rep.dropped_no_labels == 1
    assert [s.input_ids for s in samples] == [tokenize_record(r, "", "instruction", tok).input_ids
                                              for r in (RECS[0], RECS[1])]
    # nothing left at all -> an error, not an empty run
    p2 = write_jsonl(tmp_path / "d2.jsonl", [long_prompt])
    with pytest.raises(DataError, match="seq_len"):
        build_samples(read_records(p2), "instruction", tok, seq_len, "truncate")


# ----------------------------------------------------------------------------------------------------------
# Packing


def test_pack(tok):
    records = [(f"x:{i}", r) for i, r in enumerate(generate_dataset(40, seed=5))]
    samples, _ = build_samples(records, "instruction", tok, 256, "truncate")
    seq_len = 48
    rows = pack(samples, seq_len)
    assert len(rows) >= 2
    assert all(len(r.input_ids) == seq_len for r in rows[:-1])
    assert 0 < len(rows[-1].input_ids) <= seq_len
    assert all(len(r.labels) == len(r.input_ids) for r in rows)
    flat_rows = [t for r in rows for t in r.input_ids]
    flat_samples = [t for s in samples for t in s.input_ids]
    assert flat_rows == flat_samples
    assert [t for r in rows for t in r.labels] == [t for s in samples for t in s.labels]
    total = len(flat_samples)
    assert len(rows) == -(-total // seq_len)


def test_pack_exact_multiple_has_no_empty_tail():
    s = Sample([1, 5, 6, 2], [IGNORE_INDEX, 5, 6, 2])
    rows = pack([s, s, s], 4)
    assert len(rows) == 3 and all(r.input_ids == s.input_ids for r in rows)


# ----------------------------------------------------------------------------------------------------------
# Batching


def concat_global(n, seed, step, mb, ga, world):
    """The global batch as seen by a world: micro-batch k of every rank in rank order, k-major."""
    per_rank = [rank_micro_batches(n, seed, step, mb, ga, r, world) for r in range(world)]
    return [i for k in range(ga) for r in range(world) for i in per_rank[r][k]]


@pytest.mark.parametrize("n", [48, 50, 7])
def test_global_batch_independent_of_world_and_accumulation(n):
    seed, mb = 11, 4
    for step in (0, 1, 5, 6, 13):
        a = concat_global(n, seed, step, mb, ga=1, world=2)
        b = concat_global(n, seed, step, mb, ga=2, world=1)
        c = concat_global(n, seed, step, 2, ga=2, world=2)
        d = concat_global(n, seed, step, 1, ga=8, world=1)
        assert a == b == c == d, step
        assert Counter(a) == Counter(b)
        assert len(a) == 8
        assert a == global_batch_indices(n, seed, step, 8)


def test_global_batch_is_the_epoch_stream():
    n, seed, g = 10, 3, 4
    stream = [i for e in range(6) for i in epoch_order(n, seed, e)]
    for step in range(12):
        assert global_batch_indices(n, seed, step, g) == stream[step * g:(step + 1) * g]
    # a global batch larger than the dataset spans epochs
    assert global_batch_indices(5, seed, 1, 8) == [i for e in range(5) for i in epoch_order(5, seed, e)][8:16]


def test_rank_shards_disjoint_within_step():
    n, seed, mb, ga, world = 100, 0, 3, 2, 4
    for step in range(6):
        shards = [i for r in range(world) for mbatch in rank_micro_batches(n, seed, step, mb, ga, r, world)
                  for i in mbatch]
        assert len(shards) == mb * ga * world
        assert len(set(shards)) == len(shards), step
        for r in range(world):
            micro = rank_micro_batches(n, seed, step, mb, ga, r, world)
            assert len(micro) == ga and all(len(m) == mb for m in micro)


def test_one_epoch_visits_every_index_once():
    n, seed, mb, ga, world = 48, 9, 2, 2, 3  # global batch 12, 4 steps per epoch
    seen = [i for step in range(n // (mb * ga * world)) for r in range(world)
            for m in rank_micro_batches(n, seed, step, mb, ga, r, world) for i in m]
    assert sorted(seen) == list(range(n))
    assert seen != list(range(n))  # and it is shuffled
    # the next epoch is a different permutation that again covers everything
    first = [i for step in range(4) for i in global_batch_indices(n, seed, step, 12)]
    nxt = [i for step in range(4, 8) for i in global_batch_indices(n, seed, step, 12)]
    assert sorted(nxt) == list(range(n)) and nxt != first


def test_seed_determinism():
    a = [global_batch_indices(64, 1, s, 8) for s in range(8)]
    assert a == [global_batch_indices(64, 1, s, 8) for s in range(8)]
    assert a != [global_batch_indices(64, 2, s, 8) for s in range(8)]
    assert rank_micro_batches(64, 1, 3, 4, 1, 1, 2) == rank_micro_batches(64, 1, 3, 4, 1, 1, 2)
    assert rank_micro_batches(64, 1, 3, 4, 1, 1, 2) != rank_micro_batches(64, 2, 3, 4, 1, 1, 2)


def test_step_batch_is_pure():
    fresh = rank_micro_batches(30, 4, 7, 2, 2, 1, 2)
    torch.manual_seed(1234)  # global RNG state must not matter
    for s in range(7):
        rank_micro_batches(30, 4, s, 2, 2, 1, 2)
    assert rank_micro_batches(30, 4, 7, 2, 2, 1, 2) == fresh
    torch.randperm(10)
    assert rank_micro_batches(30, 4, 7, 2, 2, 1, 2) == fresh


# ----------------------------------------------------------------------------------------------------------
# Collation


def test_collate_right_pads():
    a = Sample([1, 10, 11, 2], [IGNORE_INDEX, IGNORE_INDEX, 11, 2])
    b = Sample([1, 12], [IGNORE_INDEX, 12])
    out = collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[1, 10, 11, 2], [1, 12, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 11, 2], [IGNORE_INDEX, 12, IGNORE_INDEX,
                                                                         IGNORE_INDEX]]
    assert all(t.dtype == torch.long and t.shape == (2, 4) for t in out.values())


def test_collate_with_real_tokenizer(tok):
    samples = [tokenize_record(r, "", "instruction", tok) for r in RECS]
    out = collate(samples, tok.pad_token_id)
    width = max(len(s.input_ids) for s in samples)
    assert out["input_ids"].shape == (3, width)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        assert out["attention_mask"][i].sum().item() == n
        assert out["input_ids"][i, :n].tolist() == s.input_ids
        assert (out["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (out["labels"][i, n:] == IGNORE_INDEX).all()


# ----------------------------------------------------------------------------------------------------------
# The bundled dataset


def test_bundled_dataset_matches_generator():
    expected = "".join(json.dumps(r) + "\n" for r in generate_dataset())
    assert BUNDLED_DATA.read_text() == expected
    assert len(expected.splitlines()) == 2000


def test_chat_starting_with_assistant_is_refused(tok):
    msgs = [{"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "ok"}]
    with pytest.raises(DataError, match="starts with an assistant message"):
        tokenize_record({"messages": msgs}, "f.jsonl:9", "chat", tok)


def test_packing_spreads_long_samples_instead_of_cutting_them(tok, tmp_path):
    from pipeline.config import DataConfig
    from pipeline.data import load_samples

    long_text = " ".join(f"word{i}" for i in range(120))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    whole = tokenize_record({"text": long_text}, "x", "text", tok).input_ids
    assert len(whole) > 64
    rows, report = load_samples(DataConfig(path=str(path), format="text", packing=True), tok, seq_len=64)
    packed = [t for r in rows for t in r.input_ids]
    assert packed[:len(whole)] == whole  # nothing of the long document was dropped
    assert all(len(r.input_ids) == 64 for r in rows[:-1]) and "packed into" in report
    rows, report = load_samples(DataConfig(path=str(path), format="text", packing=False), tok, seq_len=64)
    assert len(rows[0].input_ids) == 64 and "1 truncated" in report  # without packing it is cut, and counted
