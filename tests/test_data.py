"""Tokenising (response-only labels), the packing plan, sharded batching and collation (the per-record and
per-batch pieces; whole files through the cache are tests/test_prepared.py)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.data import builtin
from pipeline.data.builtin import BUNDLED_DATA, generate_dataset
from pipeline.data.formats import (
    IGNORE_INDEX,
    DataError,
    Sample,
    collate,
    epoch_order,
    global_batch_indices,
    pack_plan,
    rank_micro_batches,
    tokenize_record,
    tokenize_records,
)
from tests.conftest import RECS


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


@pytest.mark.parametrize("fmt", ["instruction", "text"])
def test_batched_tokenising_equals_per_record(tok, fmt):
    recs = generate_dataset(200, seed=3)
    if fmt == "text":
        recs = [{"text": f"{r['instruction']} {r['output']}"} for r in recs]
    records = [(f"x:{i}", r) for i, r in enumerate(recs)]
    assert tokenize_records(records, fmt, tok) == [tokenize_record(r, w, fmt, tok) for w, r in records]


def test_text_labels_everything(tok):
    s = tokenize_record({"text": "The capital of Peru is Lima."}, "x:1", "text", tok)
    assert s.labels == s.input_ids
    assert s.input_ids[0] == tok.bos_token_id and s.input_ids[-1] == tok.eos_token_id
    assert tok.decode(s.input_ids[1:-1]) == "The capital of Peru is Lima."


def test_prompt_completion_labels_only_the_completion_with_no_template(tok):
    s = tokenize_record({"prompt": "Q: 2 plus 3?\nAnswer:", "completion": " 5"}, "x:1", "prompt_completion", tok)
    assert s.input_ids[0] == tok.bos_token_id and s.input_ids[-1] == tok.eos_token_id
    n_prompt = next(i for i, t in enumerate(s.labels) if t != IGNORE_INDEX)
    assert tok.decode(s.input_ids[1:n_prompt]) == "Q: 2 plus 3?\nAnswer:"  # the prompt as written, no template
    assert tok.decode(s.labels[n_prompt:]) == " 5" + tok.eos_token
    with pytest.raises(DataError, match=r"x:2: data.format=prompt_completion needs a field 'completion'"):
        tokenize_record({"prompt": "Q"}, "x:2", "prompt_completion", tok)


def test_auto_reads_each_sample_in_the_format_its_fields_name(tok):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    records = [("x:1", RECS[0]), ("x:2", {"text": "The capital of Peru is Lima."}), ("x:3", chat),
               ("x:4", {"prompt": "Q", "completion": " A"}), ("x:5", RECS[1])]
    kinds = ["instruction", "text", "chat", "prompt_completion", "instruction"]
    expected = [tokenize_record(r, w, k, tok) for (w, r), k in zip(records, kinds)]
    assert tokenize_records(records, "auto", tok) == expected  # mixed formats in one file, order kept
    assert [tokenize_record(r, w, "auto", tok) for w, r in records] == expected
    with pytest.raises(DataError, match=r"x:6: data.format=auto cannot tell this sample's format \(it has id, "
                                        r"value\)"):
        tokenize_record({"id": 1, "value": "v"}, "x:6", "auto", tok)
    with pytest.raises(DataError, match=r"x:7: data.format=instruction needs a field 'output'"):
        tokenize_record({"instruction": "hi"}, "x:7", "auto", tok)  # read as instruction, missing its output


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


# ----------------------------------------------------------------------------------------------------------
# Packing


def plan_rows(lengths, seq_len):
    offsets, doc, start, length = pack_plan(np.array(lengths), seq_len)
    return [list(zip(doc[offsets[r]:offsets[r + 1]].tolist(), start[offsets[r]:offsets[r + 1]].tolist(),
                     length[offsets[r]:offsets[r + 1]].tolist())) for r in range(len(offsets) - 1)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_plan_covers_every_token_once_and_splits_only_long_documents(seed):
    rng = np.random.default_rng(seed)
    seq_len = 64
    lengths = rng.integers(1, 90, size=500)  # some longer than a row
    rows = plan_rows(lengths, seq_len)
    covered = {d: [] for d in range(len(lengths))}
    for row in rows:
        assert 0 < sum(n for _, _, n in row) <= seq_len
        for d, start, n in row:
            covered[d].append((start, n))
    for d, pieces in covered.items():
        pieces.sort()
        # contiguous, from 0 to the end: every token of every document, once
        assert pieces[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(pieces, pieces[1:]))
        assert pieces[-1][0] + pieces[-1][1] == lengths[d]
        if lengths[d] <= seq_len:
            assert len(pieces) == 1, f"document {d} of {lengths[d]} tokens was split"
        else:  # whole rows of its own, then the remainder
            assert len(pieces) == -(-lengths[d] // seq_len)
    total = int(lengths.sum())
    assert len(rows) <= 1.08 * -(-total // seq_len), "bin packing left too much room"  # best fit: near-optimal
    assert plan_rows(lengths, seq_len) == rows  # deterministic


def test_pack_plan_beats_filling_in_order():
    # in order, 40 + 40 never share a 64-token row and every 40 wastes 24; best fit pairs each 40 with a 24
    lengths = [40, 40, 24, 24] * 10
    assert len(plan_rows(lengths, 64)) == 20
    assert plan_rows([64, 64], 64) == [[(0, 0, 64)], [(1, 0, 64)]]


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


def test_collate_packed_rows_restart_positions_at_each_document():
    a = Sample([1, 10, 2, 1, 11, 12, 2], [IGNORE_INDEX, 10, 2, IGNORE_INDEX, 11, 12, 2], segments=(3, 4))
    b = Sample([1, 13, 2], [IGNORE_INDEX, 13, 2], segments=(3,))
    out = collate([a, b], pad_id=0)
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3]]  # padding: its own run
    assert out["doc_lengths"].tolist() == [3, 4, 3]
    assert out["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0, 0, 0]
    assert "position_ids" not in collate([Sample([1, 2], [IGNORE_INDEX, 2])], pad_id=0)


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

    expected = "".join(json.dumps(r) + "\n" for r in builtin.bundled_records())
    assert BUNDLED_DATA.read_text() == expected
    records = [json.loads(line) for line in expected.splitlines()]
    mc = [r for r in records if "prompt" in r]
    assert len(records) == 5000 and len(mc) == builtin.MULTIPLE_CHOICE == 3000
    assert all(r["completion"] in (" A", " B", " C", " D") for r in mc)
    # never one of the bundled MMLU sample's own questions, in any split, and each in lm-eval's 0-shot layout
    sample = {builtin.zero_shot_prompt(r, subject) for subject, splits in builtin.sample_rows().items()
              for rows in splits.values() for r in rows}
    assert not sample & {r["prompt"] for r in mc}
    assert sorted({r["completion"] for r in mc}) == [" A", " B", " C", " D"]


def test_chat_starting_with_assistant_is_refused(tok):
    msgs = [{"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "ok"}]
    with pytest.raises(DataError, match="starts with an assistant message"):
        tokenize_record({"messages": msgs}, "f.jsonl:9", "chat", tok)
