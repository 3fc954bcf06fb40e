"""Training data: the formats, tokenising with response-only labels, the packing plan, sharded batches and collation.

Preparing a whole data file (reading it, tokenising it with ``datasets.map``, packing, caching it on disk and
memory-mapping it at run time) is ``pipeline/data/prepared.py``; this module holds what it applies to each record and
each batch. No DeepSpeed here: batching takes the rank, world size and step as plain integers.

Batch order (the seed policy for data): the samples of epoch ``e`` are visited in the order of
``torch.randperm(n, generator=seeded(seed + e))``; epochs are chained into one stream. Optimizer step ``s``
consumes the next ``G = micro_batch_size * grad_accum * world_size`` samples of that stream, and micro-batch ``k``
of rank ``r`` is the slice starting at ``(k * world_size + r) * micro_batch_size``. The global batch of a step is
therefore the same at any world size / accumulation split, and the position in the data is a function of the
step alone (which makes resuming exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError

IGNORE_INDEX = -100

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DataError(UserError):
    """The data file or its content is unusable."""


# ----------------------------------------------------------------------------------------------------------
# Tokenising


@dataclass(frozen=True)
class Sample:
    """One training row: a sample, or (packed) several whose lengths ``segments`` gives, in order."""

    input_ids: Any  # list[int] or a 1-D integer array
    labels: Any  # the same length; IGNORE_INDEX where no loss is taken
    segments: tuple[int, ...] | None = None  # packed row: the lengths of its documents (they sum to the length)


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


#: ``data.format=auto``: the first of these whose field a record has decides its format (TRL's dataset types are
#: told apart the same way, by their keys).
AUTO_FIELDS = (("messages", "chat"), ("conversations", "sharegpt"), ("prompt", "prompt_completion"),
               ("completion", "prompt_completion"), ("instruction", "instruction"), ("output", "instruction"),
               ("text", "text"))


def detect_format(record: Any, where: str) -> str:
    """The format ``data.format=auto`` reads ``record`` in, from its fields.

    Raises:
        DataError: no field that names a format.
    """
    if isinstance(record, dict):
        for key, fmt in AUTO_FIELDS:
            if key in record:
                return fmt
        have = ", ".join(sorted(record)) or "no fields"
    else:
        have = f"a JSON {type(record).__name__}, not an object"
    raise DataError(f"{where}: data.format=auto cannot tell this sample's format (it has {have}); a sample needs "
                    f"'text', 'instruction' + 'output', 'prompt' + 'completion', 'messages' or 'conversations'")


def tokenize_record(record: dict, where: str, fmt: str, tokenizer) -> Sample:
    """Turn one record into token ids and labels. Loss only on the response for ``instruction``, the completion
    for ``prompt_completion`` and the assistant turns for ``chat``/``sharegpt``."""
    if fmt == "auto":
        fmt = detect_format(record, where)
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
    if fmt == "prompt_completion":  # no template: the prompt's text is what the model sees
        prompt = bos + _ids(tokenizer, _field(record, "prompt", where, fmt))
        completion = _ids(tokenizer, _field(record, "completion", where, fmt)) + eos
        return Sample(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
    if fmt == "chat":
        return _tokenize_chat(record, where, tokenizer)
    if fmt == "sharegpt":
        return _tokenize_chat({"messages": sharegpt_messages(record, where)}, where, tokenizer)
    raise ValueError(fmt)


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def sharegpt_messages(record: Any, where: str) -> list[dict[str, str]]:
    """ShareGPT ``conversations`` (``{"from", "value"}`` turns) as chat ``messages``.

    Raises:
        DataError: no ``conversations`` list, a turn that is not an object, an unknown role, a missing or
            non-string ``value``.
    """
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        have = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: data.format=sharegpt needs 'conversations': a non-empty list of "
                        f"{{\"from\": ..., \"value\": ...}} turns (this sample has {have or 'no fields'})")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{k}] must be an object with 'from' and 'value'")
        role = turn.get("from")
        if role not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{k}] has role {role!r}; data.format=sharegpt knows "
                            f"{', '.join(SHAREGPT_ROLES)}")
        if not isinstance(turn.get("value"), str):
            what = "no 'value'" if "value" not in turn else f"a 'value' of type {type(turn['value']).__name__}"
            raise DataError(f"{where}: conversations[{k}] ({role}) has {what}; it must be a string")
        messages.append({"role": SHAREGPT_ROLES[role], "content": turn["value"]})
    return messages


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


def tokenize_records(records: list[tuple[str, Any]], fmt: str, tokenizer) -> list[Sample]:
    """:func:`tokenize_record` over many records, with one tokenizer call per field for ``text`` and
    ``instruction`` (the fast tokenizer then encodes the batch in parallel); the result is the same. ``auto``:
    each record in the format its fields name, the records of each format batched together."""
    if fmt == "auto":
        kinds = [detect_format(r, w) for w, r in records]
        out: list[Sample | None] = [None] * len(records)
        for kind in dict.fromkeys(kinds):
            mine = [i for i, k in enumerate(kinds) if k == kind]
            for i, sample in zip(mine, tokenize_records([records[i] for i in mine], kind, tokenizer)):
                out[i] = sample
        return out
    if fmt not in ("text", "instruction"):
        return [tokenize_record(r, w, fmt, tokenizer) for w, r in records]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    if fmt == "text":
        texts = [_field(r, "text", w, fmt) for w, r in records]
        return [Sample(ids, list(ids)) for ids in (bos + t + eos for t in _batch_ids(tokenizer, texts))]
    prompts, outputs = [], []
    for w, r in records:
        instruction = _field(r, "instruction", w, fmt)
        extra = _field(r, "input", w, fmt, optional=True)
        outputs.append(_field(r, "output", w, fmt))
        template = INSTRUCTION_INPUT_TEMPLATE if extra else INSTRUCTION_TEMPLATE
        prompts.append(template.format(instruction=instruction, input=extra))
    out = []
    for p, o in zip(_batch_ids(tokenizer, prompts), _batch_ids(tokenizer, outputs)):
        prompt, response = bos + p, o + eos
        out.append(Sample(prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return out


def _batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def fit_to_length(s: Sample, where: str, seq_len: int | None, too_long: str) -> tuple[Sample | None, bool]:
    """Apply ``train.seq_len`` to one sample (``None``: keep it whole, for packing).

    Returns:
        The sample (None when no label is left after truncation: it would only add padding) and whether it
        was truncated.
    Raises:
        DataError: a too-long sample with ``too_long=refuse``.
    """
    truncated = False
    if seq_len is not None and len(s.input_ids) > seq_len:
        if too_long == "refuse":
            raise DataError(f"{where}: sample is {len(s.input_ids)} tokens, longer than train.seq_len="
                            f"{seq_len} (raise train.seq_len, or set data.too_long=truncate)")
        truncated = True
        s = Sample(s.input_ids[:seq_len], s.labels[:seq_len])
    if loss_tokens(s.labels) == 0:
        return None, truncated
    return s, truncated


def loss_tokens(labels: list[int]) -> int:
    """Positions that carry loss: labels after the first (nothing predicts a row's first token)."""
    return len(labels) - 1 - labels[1:].count(IGNORE_INDEX) if len(labels) > 1 else 0


def pack_plan(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of at most ``seq_len`` tokens holding documents of ``lengths``, by best-fit decreasing bin packing.

    A document longer than ``seq_len`` fills ``len // seq_len`` rows of its own and its remainder is packed like
    any other document; no other document is ever split. Deterministic: ties are broken by document index.

    Returns:
        ``(row_offsets, doc, start, length)``: row ``r`` holds the segments ``row_offsets[r]:row_offsets[r+1]``,
        each ``length`` tokens of document ``doc`` from token ``start``.
    """
    import bisect

    lengths = np.asarray(lengths, dtype=np.int64)
    full = lengths // seq_len
    rows: list[list[tuple[int, int, int]]] = []
    for d in np.flatnonzero(full):  # the whole-row chunks of long documents
        rows += [[(int(d), int(k * seq_len), seq_len)] for k in range(full[d])]
    rest = lengths - full * seq_len
    pieces = np.flatnonzero(rest)
    pieces = pieces[np.argsort(-rest[pieces], kind="stable")]
    bins: list[list[tuple[int, int, int]]] = []
    caps: list[int] = []  # sorted distinct free capacities that have an open bin
    open_bins: dict[int, list[int]] = {}  # free capacity -> bins with it
    for d in pieces.tolist():
        n, start = int(rest[d]), int(full[d] * seq_len)
        i = bisect.bisect_left(caps, n)
        if i < len(caps):  # the fullest bin that still fits it
            cap = caps[i]
            b = open_bins[cap].pop()
            if not open_bins[cap]:
                del caps[i], open_bins[cap]
        else:
            cap, b = seq_len, len(bins)
            bins.append([])
        bins[b].append((d, start, n))
        left = cap - n
        if left:
            if left not in open_bins:
                bisect.insort(caps, left)
                open_bins[left] = []
            open_bins[left].append(b)
    rows += bins
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = np.array([seg for r in rows for seg in r], dtype=np.int64).reshape(-1, 3)
    return offsets, flat[:, 0], flat[:, 1].astype(np.int32), flat[:, 2].astype(np.int32)


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
    """Right-pad to the longest row of the micro-batch.

    Returns:
        ``input_ids``, ``labels`` and ``attention_mask`` (1 on real tokens; for counting, and for the model when
        rows are not packed), each ``[batch, longest]``. Packed rows add ``position_ids`` ``[batch, longest]``,
        restarting at 0 at each document (and at the padding), which is what keeps a document's attention inside
        it once no ``attention_mask`` is passed (transformers' ``find_packed_sequence_indices``), and
        ``doc_lengths`` ``[documents]``, the length of every document of the batch.
    """
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    packed = any(s.segments is not None for s in samples)
    positions = torch.zeros((len(samples), width), dtype=torch.long) if packed else None
    docs: list[int] = []
    ids_np, labels_np = ids.numpy(), labels.numpy()  # views: rows from memory-mapped Arrow (read-only numpy
    for i, s in enumerate(samples):                  # arrays) are copied in without becoming tensors themselves
        n = len(s.input_ids)
        ids_np[i, :n] = s.input_ids
        labels_np[i, :n] = s.labels
        mask[i, :n] = 1
        if packed:
            segments = list(s.segments or (n,))
            docs += segments
            if width > n:
                segments.append(width - n)
            positions[i] = torch.cat([torch.arange(k) for k in segments])
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if packed:
        out["position_ids"] = positions
        out["doc_lengths"] = torch.tensor(docs, dtype=torch.long)
    return out
