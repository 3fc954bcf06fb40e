"""Score a model (a checkpoint's adapter on its base, or a plain Hugging Face directory) on MMLU with
lm-evaluation-harness. Every number is lm-eval's: its ``hf`` model class, its built-in ``mmlu`` task (prompt,
5-shot ``dev`` split, ``acc``, size-weighted groups); only the dataset path is redirected to a local copy, and on
CPU the batch size is chosen from a memory budget (``MemoryBudgetHFLM``: lm-eval's ``HFLM`` with its batch-size
detection replaced by arithmetic, since a CPU raises no out-of-memory error for lm-eval's search to catch).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import MmluEvalConfig
from pipeline.errors import UserError

CATEGORIES = ("stem", "humanities", "social_sciences", "other")
GIB = 2 ** 30


# ----------------------------------------------------------------------------------------------------------
# Command-line options shared by eval/mmlu.py and eval/watch.py


def add_eval_args(p) -> None:
    """Add the options eval/mmlu.py and eval/watch.py share to the argparse parser ``p``."""
    p.add_argument("--mmlu-data", help="local cais/mmlu copy (hub or CSV layout), or 'sample' for the bundled one")
    p.add_argument("--hub", action="store_true", help="read cais/mmlu from the Hugging Face hub (needs network)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="shots from each subject's dev split (default 5; eval/watch.py: the run's own)")
    p.add_argument("--batch-size", default="auto",
                   help="lm-eval batch size: a number or 'auto' (default; lm-eval's search on a GPU, sized to "
                        "--memory-gb on CPU)")
    p.add_argument("--memory-gb", default="auto",
                   help="CPU scoring: the most resident memory (GiB) this scorer may hold, model included; the batch "
                        "is sized to it for each request length. 'auto' (default): half of MemAvailable when scoring "
                        "starts. Not used on a GPU or with a numeric --batch-size")
    p.add_argument("--limit", type=int, help="score only the first K questions of each subject (quick checks)")
    p.add_argument("--subjects", default="",
                   help="score only these MMLU subjects, comma-separated (default: all 57, MMLU's own groups)")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every request's log-likelihood (mmlu_samples.jsonl beside mmlu.json)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="model dtype for lm-eval (default: the checkpoint's own)")
    p.add_argument("--base", help="base model directory (default: the one the adapter records)")
    p.add_argument("--parallelize", action="store_true",
                   help="split a model larger than one GPU over all visible GPUs (lm-eval's parallelize=True)")


def check_eval_args(args) -> None:
    if args.num_fewshot is None:
        args.num_fewshot = 5
    if args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0; got {args.num_fewshot}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1; got {args.limit}")
    if args.batch_size != "auto" and not args.batch_size.isdigit():
        raise UserError(f"--batch-size must be a number or 'auto'; got {args.batch_size!r}")
    try:
        MmluEvalConfig.parse_memory_gb(args.memory_gb)
    except ValueError as e:
        raise UserError(f"--memory-gb {e}") from None
    if args.hub and args.mmlu_data:
        raise UserError("give either --mmlu-data DIR or --hub, not both")
    try:
        chosen = MmluEvalConfig.parse_subjects(args.subjects)
    except ValueError as e:
        raise UserError(f"--subjects {e}") from None
    from pipeline.eval.mmlu import check_subjects

    check_subjects(chosen, "--subjects")


def data_dir(args, cache: Path):
    """The hub-layout directory to score on (``None``: the hub)."""
    from pipeline.eval import mmlu

    return None if args.hub else mmlu.resolve(args.mmlu_data, args.num_fewshot, cache)


def setting_of(args, cache: Path) -> Setting:
    """The :class:`Setting` the command-line options ``args`` (checked) ask for."""
    return Setting(data_dir(args, cache), args.num_fewshot, args.limit or None,
                   tuple(MmluEvalConfig.parse_subjects(args.subjects)))


def data_label(data: Path | None) -> str:
    """How a score records its data: ``sample`` for the bundled sample (the same name wherever the package is
    installed, so that a checkout's watcher and an installed wheel's scorer agree on a run's setting), else the
    directory, or the hub."""
    from pipeline.data.builtin import SAMPLE

    if data is None:
        return "cais/mmlu (hub)"
    return "sample" if Path(data).resolve() == SAMPLE.resolve() else str(data)


def default_device(args) -> str:
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_one(checkpoint: Path, args, cache: Path) -> dict | None:
    """Score ``checkpoint`` and write its ``mmlu.json``; return the summary (``None`` on a non-zero rank)."""
    return evaluate_target(target(checkpoint, args.base), args, cache)


def evaluate_target(tgt: Target, args, cache: Path) -> dict | None:
    """Score ``tgt`` and write ``mmlu.json`` into its ``result_dir``; return the summary (``None`` on a non-zero
    rank)."""
    summary, results = score(tgt, setting_of(args, cache), Hardware(args.batch_size, default_device(args),
                             args.dtype, args.parallelize, args.memory_gb), args.log_samples)
    if summary is not None:
        write(summary, results, tgt.result_dir)
    return summary


@dataclass(frozen=True)
class Setting:
    """What a score depends on besides the model (``mmlu.json`` records it; a score of another setting is another
    score): the MMLU copy (``None``: the hub), the shots, the question limit per subject, the subjects (empty:
    all 57, with MMLU's groups)."""

    data: Path | None
    num_fewshot: int
    limit: int | None = None
    subjects: tuple[str, ...] = ()

    def record(self) -> dict:
        """As ``mmlu.json``, ``mmlu.jsonl`` and the watcher compare it (``subset``: the chosen subjects, only where
        some are chosen; ``mmlu.json``'s ``subjects`` holds each subject's score)."""
        out = {"data": data_label(self.data), "num_fewshot": self.num_fewshot, "limit": self.limit}
        return {**out, "subset": list(self.subjects)} if self.subjects else out


def configured_setting(cfg: MmluEvalConfig) -> Setting:
    """The :class:`Setting` a run's ``eval.mmlu`` asks for (``num_fewshot`` resolved; the data checked)."""
    from pipeline.eval import mmlu
    from pipeline.files import cache_dir

    shots = int(cfg.num_fewshot)
    return Setting(mmlu.resolve(cfg.data, shots, cache_dir()), shots, cfg.limit or None,
                   tuple(cfg.parse_subjects(cfg.subjects)))


def has_score(result_dir: Path, wanted: Setting) -> bool:
    """``result_dir`` (``base/`` or a checkpoint) holds an ``mmlu.json`` of the setting ``wanted``."""
    try:
        summary = json.loads((result_dir / "mmlu.json").read_text())
        return setting(summary) == wanted.record()
    except (OSError, ValueError, KeyError):
        return False


@dataclass(frozen=True)
class Hardware:
    """How the process runner's lm-eval ``HFLM`` runs: batch size, device, dtype, lm-eval's ``parallelize``, and the
    CPU memory budget (see :func:`memory_budget`)."""

    batch_size: str = "auto"
    device: str = "cpu"
    dtype: str = "auto"
    parallelize: bool = False
    memory_gb: str = "auto"


# ----------------------------------------------------------------------------------------------------------
# What is scored, and scoring it


@dataclass(frozen=True)
class Target:
    """What is scored: ``base`` alone, or ``base`` + the PEFT ``adapter`` of a checkpoint."""

    base: Path
    adapter: Path | None
    step: int
    result_dir: Path  # where mmlu.json goes

    def identity(self) -> dict:
        ident = {"base": str(self.base), "adapter": str(self.adapter) if self.adapter else None, "step": self.step}
        if self.adapter:
            with open(self.adapter / "adapter_model.safetensors", "rb") as f:
                ident["adapter_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
        return ident


def target(path: Path, base: str | None = None) -> Target:
    """A ``checkpoints/step-N`` directory (its adapter on the base it records), or a model directory (step 0).

    Raises:
        UserError: neither; a checkpoint without an adapter; a base that is missing.
    """
    from pipeline.model.load import check_model_dir

    if not path.is_dir():
        raise UserError(f"--checkpoint {path} is not a directory")
    if (path / "trainer_state.json").is_file() or (path / "adapter").exists():
        adapter = path / "adapter"
        if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
            raise UserError(f"--checkpoint {path} has no adapter (adapter/adapter_config.json and "
                            f"adapter/adapter_model.safetensors)")
        base = Path(base or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
        check_model_dir(str(base))
        step = json.loads((path / "trainer_state.json").read_text())["step"] if \
            (path / "trainer_state.json").is_file() else -1
        return Target(base, adapter, step, path)
    if (path / "config.json").is_file():
        check_model_dir(str(path))
        return Target(path, None, 0, path)
    raise UserError(f"--checkpoint {path} is neither a checkpoint (checkpoints/step-N with adapter/) nor a Hugging "
                    f"Face model directory (config.json)")


GROUP = "mmlu_local"  # the group :func:`group_yaml` defines


def group_yaml(data: Path | None, cache: Path | None = None, subjects: Sequence[str] = ()) -> str:
    """An lm-eval group that is the built-in ``mmlu`` (or, with ``subjects``, those of its ``mmlu_<subject>`` tasks)
    with its ``dataset_path`` pointed at ``data`` (the forms lm-eval 0.4.13 accepts, tried against it; ``None``:
    the hub's), and ``datasets``' cache at ``cache``: see :func:`datasets_cache`."""
    kwargs = f"    dataset_kwargs:\n      cache_dir: {json.dumps(str(cache))}\n" if cache is not None else ""
    path = f"    dataset_path: {json.dumps(str(data))}\n" if data is not None else ""
    members = [f"  - task: mmlu_{s}\n" for s in subjects] or ["  - group: mmlu\n"]
    return (f"group: {GROUP}\ntask:\n" + "".join(m + path + kwargs for m in members) +
            "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")


@contextlib.contextmanager
def mmlu_task(setting: Setting):
    """lm-eval's ``mmlu`` task on ``setting``'s data and subjects: yields the task names and the ``TaskManager`` to
    hand ``simple_evaluate``. Only lm-eval's own mmlu task files are indexed (``include_defaults=False``): indexing
    all of its tasks takes ~13 s per score on a 2-core machine, and the same YAML files are read either way."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    mmlu_tasks = str(Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default")
    with tempfile.TemporaryDirectory() as include:
        cache = datasets_cache(setting.data) if setting.data is not None else None
        Path(include, f"{GROUP}.yaml").write_text(group_yaml(setting.data, cache, setting.subjects))
        yield [GROUP], TaskManager(include_path=[include, mmlu_tasks], include_defaults=False)


def evaluate(lm, setting: Setting, batch_size, log_samples: bool = False) -> dict | None:
    """lm-eval's own evaluation of ``lm`` (any ``lm_eval.api.model.LM``) on ``setting``: its task files, few-shot
    sampling, requests, metrics and aggregation. Every rank of a distributed ``lm`` calls it; the results come back
    on rank 0, ``None`` elsewhere."""
    import lm_eval

    with mmlu_task(setting) as (tasks, manager), _fast_yaml():
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=setting.num_fewshot,
                                       batch_size=batch_size, limit=setting.limit, task_manager=manager,
                                       log_samples=log_samples)


def go_offline(data) -> None:
    """Keep ``datasets`` and the hub client off the network when the MMLU data is local (``data``: a directory,
    ``sample``; ``None``: the hub). They read these switches when first imported: call before that in a process
    (the training entry point does, for the engine runner)."""
    if data is not None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def datasets_cache(data: Path) -> Path:
    """A ``datasets`` cache directory for the local MMLU copy ``data``, keyed by its files' names, sizes and
    times. Offline, ``datasets`` keys its cache of a local directory by the directory's name alone and reads the
    copy it made the first time, even after the files changed (measured with datasets 4: a rewritten sample was
    scored as the old one); a key of the files' own makes a changed copy a new cache."""
    from pipeline.files import cache_dir, files_key

    return cache_dir() / "mmlu-datasets" / files_key(data)


def score(tgt: Target, setting: Setting, hw: Hardware = Hardware(),
          log_samples: bool = False) -> tuple[dict | None, dict | None]:
    """Score ``tgt`` with lm-eval's ``HFLM`` in this process; return (our summary, lm-eval's full results), or
    ``(None, None)`` on a rank other than 0 of a data-parallel run. ``hw.memory_gb`` (a number of GiB, or ``auto``)
    bounds the scorer's memory on CPU when ``hw.batch_size`` is ``auto``: see :func:`memory_budget`.

    Call before anything imports ``datasets`` in this process when offline (the environment switches are read at
    import).
    """
    go_offline(setting.data)
    from lm_eval.models.huggingface import HFLM

    on_cpu = hw.device == "cpu" and not hw.parallelize
    budget = memory_budget(hw.memory_gb, on_cpu, hw.batch_size)  # read before the model takes its share
    model_args = {"pretrained": str(tgt.base), "dtype": hw.dtype, "device": hw.device, "trust_remote_code": False,
                  "batch_size": hw.batch_size}
    if tgt.adapter:
        model_args["peft"] = str(tgt.adapter)
    if hw.parallelize:
        model_args["parallelize"] = True
        model_args.pop("device")
    started = time.perf_counter()
    try:
        # lm-eval's own HFLM (its search on a GPU, a fixed batch when one is given), or on CPU the same class with
        # the batch sized to the budget; either way lm-eval loads the model, the adapter and the dtype.
        lm = HFLM(**model_args) if budget is None else budget_hflm_class()(memory_bytes=budget, **model_args)
        results = evaluate(lm, setting, hw.batch_size, log_samples)
    except (RuntimeError, ValueError) as e:
        # PEFT loading an adapter made for another model: other shapes, or other module names.
        if tgt.adapter and ("size mismatch" in str(e) or "Target modules" in str(e)):
            detail = next((line.strip() for line in str(e).splitlines()
                           if "size mismatch" in line or "Target modules" in line), "")
            raise UserError(f"the adapter {tgt.adapter} does not fit the base model {tgt.base}: {detail}; "
                            f"pass the base it was trained on (--base DIR)") from None
        raise
    wall = time.perf_counter() - started
    if results is None:  # a non-zero rank of a data-parallel `accelerate launch`: rank 0 has the results
        return None, None
    return summarize(results, tgt, setting, wall), results


# ----------------------------------------------------------------------------------------------------------
# The batch size on CPU, from a memory budget
#
# lm-eval scores the loglikelihood requests of every task together, sorted longest first (its Collator), in
# batches padded to their first request's length. A batch's peak is its logits: lm-eval takes ``log_softmax`` of
# the model's [batch, tokens, vocab] logits into a second tensor of that shape, and keeps that one (``multi_logits``
# in ``_loglikelihood_tokens``) until the next batch's has been computed. At SmolLM2's 49,152-token vocabulary one
# fp32 copy is 192 KiB a token; at Llama-3's 128,256, 501 KiB. lm-eval's ``batch_size="auto"`` finds the largest
# batch by waiting for an out-of-memory error, which a CPU does not raise (it swaps, or the kernel kills a
# process), so on CPU the size is computed instead: the bytes a token of a batch holds at its peak (``TokenCost``)
# times the batch's padded length, against what the budget leaves once the model and lm-eval's data are resident.

#: Over ``TokenCost.formula``. Measured peak / formula (fp32, 2-core CPU, ``bench/score_memory.py``'s calibration:
#: two batches in a row, as lm-eval runs them): 1.00-1.17 for SmolLM2-135M and a 128,256-vocab Llama (the high end
#: on a process's first large batch), 0.77-1.02 on a KV-cache-heavy 512-vocab shape; a whole SmolLM2 5-shot score
#: at a 4 GiB budget peaked at 1.05x (bench/results/score_memory.md). The rest is the allocator's.
TOKEN_MARGIN = 1.2


@dataclass(frozen=True)
class TokenCost:
    """Bytes one token of a CPU scoring batch holds at the batch's peak, from the model's shape.

    The batch's own peak is the larger of two phases: the forward, which ends holding the logits (one copy), the
    KV cache it builds (``use_cache``; dropped with the model's output) and one layer's activations; then lm-eval's
    ``log_softmax``, which holds the logits and its own copy. On top, lm-eval still holds the previous batch's
    ``log_softmax`` (one copy of its logits). Counting that as one more copy per token of this batch is exact
    enough: every batch is sized this way, so the previous one's copy is at most its share of the same budget.
    """

    vocab: int
    """Logits per token (the output embedding's rows)."""
    itemsize: int
    """Bytes per element of the model's dtype (the logits and ``log_softmax`` keep it)."""
    kv: int
    """Bytes of KV cache per token: 2 x layers x KV heads x head dim x itemsize (0 without ``use_cache``)."""
    act: int
    """Bytes of one layer's activations per token: 8 x hidden + 6 x intermediate elements, twice what a layer's
    MLP and attention hold at once (measured on a 30-layer 576-wide Llama with a 512 vocabulary, where the forward
    outweighs the logits: the allocator keeps about as much again)."""

    @classmethod
    def of(cls, config, itemsize: int) -> TokenCost:
        """From a ``transformers`` config (its text part for a multimodal one)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = int(getattr(text, "hidden_size", 0) or 0)
        heads = int(getattr(text, "num_attention_heads", 0) or 1)
        head_dim = int(getattr(text, "head_dim", 0) or hidden // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
        layers = int(getattr(text, "num_hidden_layers", 0) or 0)
        inter = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
        kv = 2 * layers * kv_heads * head_dim * itemsize if getattr(text, "use_cache", True) else 0
        return cls(vocab=int(text.vocab_size), itemsize=itemsize, kv=kv, act=(8 * hidden + 6 * inter) * itemsize)

    @property
    def formula(self) -> int:
        """Bytes a token, without the margin: the previous batch's ``log_softmax`` + this batch's larger phase."""
        logits = self.vocab * self.itemsize
        return logits + max(2 * logits, logits + self.kv + self.act)

    @property
    def per_token(self) -> int:
        """What the batch size is computed from: the formula times ``TOKEN_MARGIN``."""
        return math.ceil(self.formula * TOKEN_MARGIN)


def batch_rows(budget: int, tokens: int, cost: TokenCost, cap: int) -> int:
    """The largest batch of ``tokens``-long rows whose peak fits ``budget`` bytes: at least 1, at most ``cap``."""
    return max(1, min(cap, budget // max(1, tokens * cost.per_token)))


def memory_budget(memory_gb: str, on_cpu: bool, batch_size: str, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The scorer's memory budget in bytes, or ``None`` where the batch is not sized to one: a numeric
    ``batch_size`` (it wins), or a GPU (lm-eval's own search: a GPU raises the out-of-memory error it waits for).

    ``memory_gb`` ``auto`` is half of ``MemAvailable`` in ``meminfo`` now, when the scorer starts, and before it
    loads the model (which then comes out of that half; the batch gets the rest). Half, because the background
    scorer shares the machine with training ranks that are still growing when it starts (it scores the base model
    as they load, and each checkpoint while their optimizer state, data and save buffers come and go), and the
    page cache the training data is read through; the other half is their headroom.
    """
    if batch_size != "auto" or not on_cpu:
        return None
    gib = MmluEvalConfig.parse_memory_gb(memory_gb)
    if gib is not None:
        return int(gib * GIB)
    return mem_available(meminfo) // 2


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` in bytes (Linux); elsewhere the free physical pages."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident memory now (``VmRSS``; where there is no /proc, its peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class ChunkSizer:
    """lm-eval's ``batch_fn`` for requests sorted longest first: every batch sized for its own first (longest)
    request.

    ``Collator.get_chunks`` calls ``fn(i, requests)`` at every request ``i`` and closes the batch when it holds
    that many. lm-eval's own scheduler (``batch_size="auto:N"``) answers one size per N-th of the list, so a batch
    that begins in one N-th and ends in the next takes the next one's (larger) size at the first one's (longer)
    length: over the budget by the ratio of the two lengths. This answers, at each position of a batch, the size
    that fits the batch's first request.
    """

    def __init__(self, rows_for: Callable[[Sequence], int]):
        self.rows_for = rows_for  # request (context tokens, continuation tokens, ...) -> rows
        self._start, self._size = 0, 0

    def __call__(self, pos: int, requests: Sequence) -> int:
        if pos == 0 or pos >= self._start + self._size:  # a new batch begins at pos
            self._start, self._size = pos, self.rows_for(requests[pos])
        return self._size


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


@functools.cache
def budget_hflm_class():
    """``MemoryBudgetHFLM``: lm-eval's ``HFLM`` whose ``batch_size="auto"`` is sized to a memory budget. Built on
    first use, so that importing this module does not import lm-eval."""
    from lm_eval.models.huggingface import HFLM

    class MemoryBudgetHFLM(HFLM):
        """lm-eval's ``HFLM`` (model, adapter, dtype, prompts, batching, scoring all its own) with the two places
        it sizes an ``auto`` batch answered from ``memory_bytes``: ``_detect_batch_size`` (its search) and
        ``_batch_scheduler`` (its ``batch_fn`` for loglikelihood requests, sorted longest first).

        The budget is for the whole process: what is resident when scoring starts (the model, its weights paged
        in, and lm-eval's tasks and requests) is taken from it, and each batch gets the rest.
        """

        def __init__(self, memory_bytes: int, **kwargs):
            super().__init__(**kwargs)
            self.memory_bytes = memory_bytes
            self.cost = TokenCost.of(self.model.config, self.model.dtype.itemsize)
            self.sizer = ChunkSizer(lambda request: self.rows(self.request_tokens(request)))
            self._resident = 0
            self._said: tuple[int, bool] | None = None
            # Touch a byte of every page of the weights: safetensors maps them from the file, and the first forward
            # would bring them in anyway; the resident memory measured before the first batch must include them.
            for p in self.model.parameters():
                flat = p.detach().reshape(-1)
                float(flat[:: max(1, 4096 // p.element_size())].sum())

        def request_tokens(self, request: Sequence) -> int:
            """The padded length of a batch that begins with ``request`` (lm-eval's left truncation)."""
            _, context, continuation = request[:3]
            return len((context + continuation)[-(self.max_length + 1):][:-1])

        def rows(self, tokens: int) -> int:
            left = self.memory_bytes - self._resident
            rows = batch_rows(left, tokens, self.cost, self.max_batch_size)
            need = tokens * self.cost.per_token
            if (rows, left < need) != self._said:  # a line per new size (they grow as the requests get shorter)
                self._said = (rows, left < need)
                print(f"{'warning: ' if left < need else ''}MMLU batch {rows} for requests of {tokens:,} tokens, "
                      f"{_size(need)} each{': over the memory budget' if left < need else ''} (budget "
                      f"{_size(self.memory_bytes)}, {_size(self._resident)} resident before the first batch)",
                      flush=True)
                self.batch_sizes[len(self.batch_sizes)] = rows  # lm-eval's results list them (config.batch_sizes)
            return rows

        def _detect_batch_size(self, requests=None, pos: int = 0) -> int:
            self._resident, self._said = resident_bytes(), None
            return self.rows(self.request_tokens(requests[pos]) if requests else self.max_length)

        def _batch_scheduler(self, pos: int, n_reordered_requests) -> int:
            if pos == 0:  # a new set of requests: what the scorer holds before its first batch
                self._resident, self._said = resident_bytes(), None
            return self.sizer(pos, n_reordered_requests)

    return MemoryBudgetHFLM


@contextlib.contextmanager
def _fast_yaml():
    """``yaml.safe_load`` through libyaml's C parser (``CSafeLoader``: the same safe loader, in C) while lm-eval
    runs. ``datasets`` reads the data directory's README (its YAML front matter lists every subject) once per
    subject, 57 times a score, with PyYAML's pure-Python parser: about 10 s of a 2-core machine per score. Nothing
    changes where PyYAML was built without libyaml."""
    import yaml

    if not getattr(yaml, "__with_libyaml__", False):
        yield
        return
    plain = yaml.safe_load
    yaml.safe_load = lambda stream: yaml.load(stream, Loader=yaml.CSafeLoader)
    try:
        yield
    finally:
        yaml.safe_load = plain


def summarize(results: dict, tgt: Target, setting: Setting, wall: float, runner: str = "process") -> dict:
    """``mmlu.json``: top-level acc/stderr (of lm-eval's ``mmlu`` group, or of the chosen subjects), the four
    categories (``None`` where the subjects leave one out), every subject, the setting, and how it was scored."""
    import lm_eval

    res = results["results"]

    def pair(key: str) -> dict | None:
        if key not in res:
            return None
        stderr = res[key]["acc_stderr,none"]  # lm-eval writes "N/A" where it has no estimate (one question)
        return {"acc": res[key]["acc,none"], "acc_stderr": stderr if isinstance(stderr, (int, float)) else None}

    subjects = {k.removeprefix("mmlu_"): pair(k) for k in sorted(res)
                if k.startswith("mmlu_") and k.removeprefix("mmlu_") not in (*CATEGORIES, "local")}
    return {
        **pair("mmlu" if "mmlu" in res else GROUP),
        "categories": {c: pair(f"mmlu_{c}") for c in CATEGORIES},
        "subjects": subjects,
        **setting.record(),
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _version("lm_eval"),
        "model": tgt.identity(),
        "runner": runner,
        "wall_s": round(wall, 2),
    }


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name.replace("_", "-"))


def write(summary: dict, results: dict, out_dir: Path) -> Path:
    """``out_dir/mmlu.json`` (atomically, last) and lm-eval's full results beside it, ``mmlu_lm_eval.json``; with
    lm-eval's per-request samples (``log_samples``), each request's log-likelihood in ``mmlu_samples.jsonl``."""
    samples = results.pop("samples", None)
    if samples is not None:
        (out_dir / "mmlu_samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sample_rows(samples)))
    full = out_dir / "mmlu_lm_eval.json"
    full.write_text(json.dumps(results, indent=1, default=str) + "\n")
    from pipeline.files import atomic_write_text

    path = out_dir / "mmlu.json"
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n", fsync=True)  # an empty one would read as "scored"
    return path


def headline(summary: dict) -> str:
    """``acc 0.2500 ± 0.0286`` (no ± where lm-eval gives no stderr)."""
    stderr = summary["acc_stderr"]
    return f"acc {summary['acc']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def sample_rows(samples: dict) -> list[dict]:
    """lm-eval's ``samples`` (task -> its logged documents) as one row per document: the task, lm-eval's
    ``doc_id``, the gold answer, each choice's (log-likelihood, is-greedy) and ``acc``: what two scorers of the
    same checkpoint can be compared on, request by request."""
    rows = []
    for task in sorted(samples):
        for doc in sorted(samples[task], key=lambda d: d["doc_id"]):
            rows.append({"task": task, "doc_id": doc["doc_id"], "target": doc["target"],
                         "resps": [[float(r[0][0]), bool(r[0][1])] for r in doc["resps"]], "acc": doc.get("acc")})
    return rows


SETTING = ("data", "num_fewshot", "limit", "subset")


def setting(summary: dict) -> dict:
    """What a score depends on besides the model, as :meth:`Setting.record` writes it."""
    return {k: summary[k] for k in SETTING if k in summary}


def table_row(summary: dict) -> dict:
    """One ``mmlu.jsonl`` row."""
    return {"step": summary["model"]["step"], "acc": summary["acc"], "acc_stderr": summary["acc_stderr"],
            **{c: (summary["categories"][c] or {}).get("acc") for c in CATEGORIES}, **setting(summary)}
