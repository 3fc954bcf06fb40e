"""Training data: reading local files, tokenising with response-only labels, packing, and sharded batches.

No DeepSpeed here: batching takes the rank, world size and step as plain integers.

Batch order (the seed policy for data): the samples of epoch ``e`` are visited in the order of
``torch.randperm(n, generator=seeded(seed + e))``; epochs are chained into one stream. Optimizer step ``s``
consumes the next ``G = micro_batch_size * grad_accum * world_size`` samples of that stream, and micro-batch ``k``
of rank ``r`` is the slice starting at ``(k * world_size + r) * micro_batch_size``. The global batch of a step is
therefore the same at any world size / accumulation split, and the position in the data is a function of the
step alone (which makes resuming exact).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError

IGNORE_INDEX = -100

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DataError(UserError):
    """The data file or its content is unusable."""


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_records(path: str | Path, split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """Read samples from a local ``.jsonl``/``.json``/``.parquet`` file or a ``save_to_disk`` directory.

    Returns:
        ``(where, record)`` pairs; ``where`` names the file and line (or row) for error messages.
    Raises:
        DataError: missing path, unknown extension, malformed line (with file and line number).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file not found: {p} (config key 'data.path')")
    if p.is_dir():
        return _read_saved_dataset(p, split)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        out = []
        with p.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{p}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
                out.append((f"{p}:{lineno}", record))
        return out
    if suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{p}: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of samples (or {{\"data\": [...]}})")
        return [(f"{p} item {i}", r) for i, r in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{p}: cannot read parquet ({e})") from None
        return [(f"{p} row {i}", r) for i, r in enumerate(rows)]
    raise DataError(f"{p}: unsupported data file type '{suffix}' (use .jsonl, .json, .parquet or a "
                    f"datasets.save_to_disk directory)")


def _read_saved_dataset(p: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise DataError(f"{p}: a directory, but not one written by datasets.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{p}: no split '{split}' (has {', '.join(ds)}); set data.split")
        ds = ds[split]
    return [(f"{p} row {i}", r) for i, r in enumerate(ds)]


# ----------------------------------------------------------------------------------------------------------
# Tokenising


@dataclass(frozen=True)
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


def _field(record: dict, key: str, where: str, fmt: str, optional: bool = False) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    value = record.get(key)
    if value is None and optional:
        return ""
    if key not in record:
        have = ", ".join(sorted(record)) or "no fields"
        raise DataError(f"{where}: data.format={fmt} needs a field '{key}' (this sample has {have})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_record(record: dict, where: str, fmt: str, tokenizer) -> Sample:
    """Turn one record into token ids and labels. Loss only on the response for ``instruction`` and ``chat``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    if fmt == "text":
        ids = bos + _ids(tokenizer, _field(record, "text", where, fmt)) + eos
        return Sample(ids, list(ids))
    if fmt == "instruction":
        instruction = _field(record, "instruction", where, fmt)
        extra = _field(record, "input", where, fmt, optional=True)
        output = _field(record, "output", where, fmt)
        template = INSTRUCTION_INPUT_TEMPLATE if extra else INSTRUCTION_TEMPLATE
        prompt = bos + _ids(tokenizer, template.format(instruction=instruction, input=extra))
        response = _ids(tokenizer, output) + eos
        return Sample(prompt + response, [IGNORE_INDEX] * len(prompt) + response)
    if fmt == "chat":
        return _tokenize_chat(record, where, tokenizer)
    raise ValueError(fmt)


def _tokenize_chat(record: dict, where: str, tokenizer) -> Sample:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: data.format=chat needs 'messages': a non-empty list of "
                        f"{{\"role\": ..., \"content\": ...}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: chat sample has no assistant message to learn from")
    if tokenizer.chat_template is None:
        raise DataError("data.format=chat needs a tokenizer with a chat template; this model's tokenizer has "
                        "none (use data.format=instruction or add a chat_template to tokenizer_config.json)")

    def render(msgs: list[dict], gen: bool) -> list[int]:
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=True)
        return list(out["input_ids"])

    # Render growing prefixes; the tokens each assistant turn adds (after its generation prompt) are the
    # ones that carry loss. This works for any prefix-stable template, which is checked, not assumed.
    ids: list[int] = []
    labels: list[int] = []
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: chat sample starts with an assistant message; it needs a user (or system) "
                        f"message before it to respond to")
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = render(messages[:i], gen=True)
            if prompt[:len(ids)] != ids:
                raise DataError(f"{where}: the tokenizer's chat template is not prefix-stable, so assistant "
                                f"turns cannot be located; use data.format=instruction")
            labels += [IGNORE_INDEX] * (len(prompt) - len(ids))
            ids = prompt
        full = render(messages[:i + 1], gen=False)
        if full[:len(ids)] != ids:
            raise DataError(f"{where}: the tokenizer's chat template is not prefix-stable, so assistant turns "
                            f"cannot be located; use data.format=instruction")
        new = full[len(ids):]
        if m["role"] == "assistant":
            # Learn the turn up to and including its end token; whatever the template appends after it
            # (a newline, say) is formatting, not something the model should predict.
            end = max((j for j, t in enumerate(new) if t == tokenizer.eos_token_id), default=len(new) - 1)
            labels += new[:end + 1] + [IGNORE_INDEX] * (len(new) - end - 1)
        else:
            labels += [IGNORE_INDEX] * len(new)
        ids = full
    return Sample(ids, labels)


@dataclass(frozen=True)
class DataReport:
    samples: int
    truncated: int
    dropped_no_labels: int
    tokens: int


def build_samples(records: list[tuple[str, dict]], fmt: str, tokenizer, seq_len: int | None, too_long: str,
                  progress=None) -> tuple[list[Sample], DataReport]:
    """Tokenise every record and enforce ``seq_len`` (``None``: keep every sample whole, for packing).

    Raises:
        DataError: empty dataset, malformed sample, a too-long sample with ``too_long=refuse``, or nothing left
            to learn from after truncation.
    """
    if not records:
        raise DataError("the dataset is empty (config key 'data.path')")
    samples, truncated, dropped, tokens = [], 0, 0, 0
    for where, record in (progress(records) if progress else records):
        s = tokenize_record(record, where, fmt, tokenizer)
        if seq_len is not None and len(s.input_ids) > seq_len:
            if too_long == "refuse":
                raise DataError(f"{where}: sample is {len(s.input_ids)} tokens, longer than train.seq_len="
                                f"{seq_len} (raise train.seq_len, or set data.too_long=truncate)")
            truncated += 1
            s = Sample(s.input_ids[:seq_len], s.labels[:seq_len])
        if all(t == IGNORE_INDEX for t in s.labels[1:]):
            dropped += 1  # its response was cut off entirely: it would only add padding
            continue
        tokens += len(s.input_ids)
        samples.append(s)
    if not samples:
        raise DataError(f"no sample has a response token within train.seq_len={seq_len}; raise train.seq_len")
    return samples, DataReport(len(samples), truncated, dropped, tokens)


def pack(samples: list[Sample], seq_len: int) -> list[Sample]:
    """Concatenate samples (each already ends with EOS) and cut into rows of exactly ``seq_len`` tokens.

    The tail shorter than ``seq_len`` is kept as a last, shorter row. Packing is done in dataset order, before
    shuffling, so rows are fixed for the whole run.
    """
    rows: list[Sample] = []
    ids: list[int] = []
    labels: list[int] = []
    for s in samples:
        ids += s.input_ids
        labels += s.labels
        while len(ids) >= seq_len:
            rows.append(Sample(ids[:seq_len], labels[:seq_len]))
            ids, labels = ids[seq_len:], labels[seq_len:]
    if any(t != IGNORE_INDEX for t in labels[1:]):
        rows.append(Sample(ids, labels))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Batching


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch_indices(n: int, seed: int, step: int, global_batch: int) -> list[int]:
    """Sample indices of optimizer step ``step``'s global batch: the stream of seeded epoch permutations."""
    start = step * global_batch
    out: list[int] = []
    epoch, offset = divmod(start, n)
    while len(out) < global_batch:
        order = epoch_order(n, seed, epoch)
        take = order[offset:offset + global_batch - len(out)]
        out += take
        epoch, offset = epoch + 1, 0
    return out


def rank_micro_batches(n: int, seed: int, step: int, micro_batch_size: int, grad_accum: int, rank: int,
                       world_size: int) -> list[list[int]]:
    """The ``grad_accum`` micro-batches (lists of sample indices) that ``rank`` runs at optimizer step ``step``."""
    idx = global_batch_indices(n, seed, step, micro_batch_size * grad_accum * world_size)
    return [idx[(k * world_size + rank) * micro_batch_size:(k * world_size + rank + 1) * micro_batch_size]
            for k in range(grad_accum)]


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample of the micro-batch.

    Returns:
        ``input_ids``, ``labels`` and ``attention_mask``, each ``[batch, longest]``.
    """
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def load_samples(cfg, tokenizer, seq_len: int, show_progress: bool = False) -> tuple[list[Sample], str]:
    """Read, tokenise, check and (optionally) pack the training data of a ``DataConfig``.

    Returns:
        The samples (rows, when packing) and a one-line report for the log.
    """
    progress = None
    if show_progress and sys.stderr.isatty():
        from tqdm import tqdm

        progress = lambda it: tqdm(it, desc="tokenize", unit="sample", leave=False, mininterval=1.0)  # noqa: E731
    records = read_records(cfg.path, cfg.split)
    # Packed samples may be longer than a row: pack() spreads them over several rows instead of cutting them.
    samples, rep = build_samples(records, cfg.format, tokenizer, None if cfg.packing else seq_len, cfg.too_long,
                                 progress)
    line = f"{rep.samples} samples, {rep.tokens:,} tokens from {cfg.path} (format {cfg.format}); "
    if cfg.packing:
        samples = pack(samples, seq_len)
        line += f"packed into {len(samples)} rows of up to {seq_len} tokens"
    else:
        line += f"{rep.truncated} truncated to {seq_len} tokens, {rep.dropped_no_labels} dropped with no response left"
    return samples, line


def fingerprint(samples: list[Sample]) -> str:
    """sha256 of every sample's tokens and labels, in order: a resumed run must see the data it was trained on."""
    import hashlib
    from array import array

    h = hashlib.sha256()
    for s in samples:
        h.update(array("q", s.input_ids).tobytes())
        h.update(b"|")
        h.update(array("q", s.labels).tobytes())
        h.update(b"\n")
    return h.hexdigest()
