"""The CPU scorer's batch size from a memory budget (``pipeline/eval/score.py``): the arithmetic, the batching of
lm-eval's sorted requests, where the budget applies, and its setting. A real scoring run through this path is in
``tests/test_mmlu.py`` (``test_cpu_batch_sized_to_the_memory_budget_scores_the_same``); the measured memory is
``bench/score_memory.py``'s."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.errors import UserError
from pipeline.eval.score import (
    GIB,
    ChunkSizer,
    TokenCost,
    add_eval_args,
    batch_rows,
    check_eval_args,
    memory_budget,
)
from tests.conftest import REPO


def llama(vocab: int, layers: int = 2, hidden: int = 64, inter: int = 128, heads: int = 4, kv_heads: int = 2,
          use_cache: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, use_cache=use_cache)


SMOLLM2 = {"vocab": 49152, "layers": 30, "hidden": 576, "inter": 1536, "heads": 9, "kv_heads": 3}


# ----------------------------------------------------------------------------------------------------------
# The arithmetic


def test_token_cost_is_three_logits_copies_at_a_large_vocabulary():
    """lm-eval holds the logits and their log_softmax, and the previous batch's log_softmax until this one's is
    computed: 3 x vocab x itemsize bytes a token, x the measured margin."""
    smol = TokenCost.of(llama(**SMOLLM2), 4)
    assert (smol.vocab, smol.kv, smol.act) == (49152, 2 * 30 * 3 * 64 * 4, (8 * 576 + 6 * 1536) * 4)
    assert smol.formula == 3 * 49152 * 4 and smol.per_token == 707789  # ceil(3 x 49,152 x 4 x 1.2)
    assert TokenCost.of(llama(128256), 4).per_token == 1846887  # ceil(3 x 128,256 x 4 x 1.2)
    assert TokenCost.of(llama(128256), 2).per_token == 923444  # bf16 logits: half


def test_token_cost_counts_the_kv_cache_where_it_outweighs_the_logits():
    """A deep model with a small vocabulary peaks in the forward (KV cache + a layer's activations), not in the
    log_softmax; without ``use_cache`` there is no KV cache."""
    shape = {"vocab": 512, "layers": 30, "hidden": 576, "inter": 1536, "heads": 9, "kv_heads": 3}
    deep = TokenCost.of(llama(**shape), 4)
    assert deep.formula == 512 * 4 + 512 * 4 + 2 * 30 * 3 * 64 * 4 + (8 * 576 + 6 * 1536) * 4
    no_cache = TokenCost.of(llama(**shape, use_cache=False), 4)
    assert no_cache.kv == 0 and no_cache.formula == deep.formula - 2 * 30 * 3 * 64 * 4


def test_batch_rows_shrink_with_the_vocabulary_and_the_prompt():
    big = TokenCost.of(llama(128256), 4)
    assert batch_rows(4 * GIB, 3000, big, 64) in (1, 2)  # a 5-shot long-subject prompt at Llama-3's vocabulary
    assert batch_rows(4 * GIB, 100, big, 64) == 23  # a short one: many more
    smol = TokenCost.of(llama(**SMOLLM2), 4)
    assert batch_rows(4 * GIB, 3000, smol, 64) == 2 and batch_rows(4 * GIB, 50, smol, 64) == 64  # lm-eval's cap
    assert batch_rows(0, 3000, smol, 64) == batch_rows(-GIB, 3000, smol, 64) == 1  # below one row: still one


# ----------------------------------------------------------------------------------------------------------
# Batching lm-eval's sorted requests


def requests(lengths: list[int]) -> tuple:
    """lm-eval's (key, context tokens, continuation tokens), sorted longest first as its Collator sorts them."""
    return tuple(((str(n), ""), [5] * (n - 1), [7]) for n in sorted(lengths, reverse=True))


LENGTHS = [3000, 2900, 2600, 1200, 1100, 1000, 900, 800, 300, 280, 260, 250, 240, 200, 190, 180, 170, 160]


def fits(budget: int):
    """rows for a request: budget // its length (one byte a token, for the arithmetic)."""
    return lambda request: max(1, budget // (len(request[1]) + len(request[2]) - 1))


def test_every_batch_fits_its_own_longest_request():
    """lm-eval's ``Collator.get_chunks`` with ``ChunkSizer``: each batch holds as many requests as fit its first
    (longest) one, and grows as the requests get shorter."""
    from lm_eval.models.utils import Collator

    reqs, budget = requests(LENGTHS), 6000
    batches = list(Collator.get_chunks(reqs, fn=ChunkSizer(fits(budget))))
    assert sum(map(len, batches)) == len(reqs)
    for batch in batches:
        assert len(batch) * len(batch[0][1]) <= budget, [len(b[1]) for b in batch]
    assert [len(b) for b in batches] == [2, 2, 5, 9]  # from 3,000 tokens: 2; 2,600: 2; 1,100: 5; 280: the rest
    again = list(Collator.get_chunks(reqs, fn=ChunkSizer(fits(budget))))  # a new set starts afresh at 0
    assert [len(b) for b in again] == [len(b) for b in batches]


def test_lm_evals_own_schedule_overruns_at_its_boundaries():
    """Why ``_batch_scheduler`` is replaced and not only ``_detect_batch_size``: lm-eval's ``auto:N`` answers one
    size per N-th of the sorted list, so a batch that starts in one N-th and ends in the next is padded to the
    first's length at the next's size. The same requests and the same fit, through lm-eval 0.4.13's own code."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import Collator

    reqs, budget = requests(LENGTHS), 6000
    fit = fits(budget)
    theirs = SimpleNamespace(batch_schedule=6.0, batch_sizes={}, max_batch_size=64,
                             _detect_batch_size=lambda rs, pos: fit(rs[pos]))
    batches = list(Collator.get_chunks(reqs, fn=lambda pos, rs: HFLM._batch_scheduler(theirs, pos, rs)))
    assert max(len(b) * len(b[0][1]) for b in batches) > budget


# ----------------------------------------------------------------------------------------------------------
# Where the budget applies, and its setting


def test_budget_only_for_an_auto_batch_on_cpu(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   16000000 kB\n")
    assert memory_budget("auto", True, "auto", meminfo) == 16000000 * 1024 // 2  # half of MemAvailable
    assert memory_budget("3.5", True, "auto", meminfo) == int(3.5 * GIB)
    assert memory_budget("3.5", True, "8", meminfo) is None  # an explicit batch size wins
    assert memory_budget("auto", False, "auto", meminfo) is None  # a GPU: lm-eval's own search ('auto')


def parse(*argv: str):
    p = argparse.ArgumentParser()
    add_eval_args(p)
    args = p.parse_args(argv)
    check_eval_args(args)
    return args


def test_memory_gb_option():
    assert parse().memory_gb == "auto" and parse("--memory-gb", "6").memory_gb == "6"
    for bad in ("0", "-2", "many", "inf"):
        with pytest.raises(UserError, match=r"--memory-gb must be a number of GiB > 0, or auto; got"):
            parse("--memory-gb", bad)


@pytest.mark.parametrize("script", ["mmlu.py", "watch.py"])
def test_bad_memory_gb_is_one_error_line(script, tmp_path):
    where = ["--checkpoint", str(tmp_path)] if script == "mmlu.py" else ["--run", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(REPO / "eval" / script), *where, "--mmlu-data", "sample",
                           "--memory-gb", "0"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors == ["error: --memory-gb must be a number of GiB > 0, or auto; got '0'"], proc.stderr[-2000:]


def test_background_scorer_passes_the_budget(tmp_path):
    from pipeline.config import make_config
    from pipeline.eval.scorer import BackgroundScorer

    cfg = make_config(None, ["eval.mmlu.runner=process", "eval.mmlu.memory_gb=6"]).eval.mmlu
    cmd = BackgroundScorer(Path(tmp_path), cfg, active=True).command("cpu")
    assert cmd[cmd.index("--memory-gb") + 1] == "6" and cmd[cmd.index("--batch-size") + 1] == "auto"
