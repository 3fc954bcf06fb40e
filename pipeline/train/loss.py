"""Next-token cross-entropy that never holds the whole ``[tokens, vocab]`` logits in fp32.

The plain loss (:func:`full_token_loss_sum`) materialises the LM head's logits for every position and then an
fp32 copy for the cross-entropy: with a 128,256-token vocabulary that is gigabytes per micro-batch, most of it
for prompt and padding positions that carry no label. :func:`token_loss_sum` instead takes the final hidden
states, keeps only the labelled positions, and runs the LM head chunk by chunk inside one autograd function
(:class:`ChunkedCrossEntropy`) that recomputes each chunk's logits in backward rather than saving them. Its
peak is one ``[chunk, vocab]`` fp32 block (plus its low-precision twin) instead of ``[batch * seq, vocab]``.

The numerics follow the full path: each chunk's logits are ``F.linear`` in the inputs' dtype cast to fp32 (what
``lm_head(h).float()`` gives), and the gradient reaching the matmuls is cast back to the weight's dtype first, as
autograd does for the ``.float()`` of the full path. Under ZeRO-3 the caller passes a ``gather`` callable that
makes the head's weight whole.

:class:`LossHead` takes the loss of a micro-batch from the DeepSpeed engine: chunked from the final hidden states
where the model allows it, else from the model's full logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import distributed as dist
from pipeline.data.formats import IGNORE_INDEX

Gather = Callable[[], AbstractContextManager]


def shifted_targets(labels: Tensor) -> Tensor:
    """The next-token target of every position, flattened: ``[B, S]`` labels -> ``[B * S]`` long.

    Position ``t`` of a row predicts ``labels[:, t + 1]``; the last position of each row predicts nothing
    (IGNORE_INDEX). Shifting the labels rather than slicing the hidden states to ``[:, :-1]`` lets the caller use
    ``hidden.reshape(-1, H)``, a view, where the slice would be a copy.
    """
    targets = torch.full_like(labels, IGNORE_INDEX, dtype=torch.long)
    targets[:, :-1] = labels[:, 1:]
    return targets.reshape(-1)


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[c, V]`` fp32 logits of one chunk: the matmul in the inputs' dtype, as ``lm_head(h).float()`` computes."""
    return F.linear(h, weight, bias).float()


class ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of the cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, chunk by chunk.

    ``forward(ctx, hidden, weight, bias, targets, chunk, gather)``:

    Args:
        hidden: ``[N, H]`` hidden states (any float dtype matching ``weight``), one row per target.
        weight: ``[V, H]`` LM head weight (may be the tied input embedding; may be frozen).
        bias: ``[V]`` or None.
        targets: ``[N]`` long; rows equal to IGNORE_INDEX add no loss and get a zero gradient.
        chunk: the most rows whose logits exist at once (> 0).
        gather: zero-argument callable returning a context manager inside which ``weight`` and ``bias`` hold
            their full values (ZeRO-3: ``deepspeed.zero.GatheredParameters``); None for ``nullcontext``.

    Returns:
        The fp32 scalar sum of the token losses (a sum, not a mean: the loop normalises over the global batch).

    Backward recomputes each chunk's logits from ``hidden`` and each row's saved max and sum of exponentials
    (2N fp32 numbers), so only one chunk's ``[chunk, V]`` temporaries are alive at a time. The weight and bias
    are kept as the parameter objects, never as values: under ZeRO-3 they are empty partitions outside
    ``gather``, so backward enters ``gather`` again. ``gather`` is entered exactly once per forward and once per
    backward whatever N is (zero included), so ranks with different numbers of labelled tokens stay in step on
    its collectives.

    ZeRO-3 and a trainable head: the weight's gradient is full-sized, and autograd accumulates it after this
    backward has left ``gather``. That works for a frozen head (LoRA's case) and for a head tied to the input
    embedding (the embedding module's own backward has it gathered when the sum is accumulated); an untied
    trainable head fails in autograd's shape check ("expected shape compatible with [0]"): use the full path.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                gather: Gather | None = None) -> Tensor:
        if chunk <= 0:
            raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
        if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
            raise ValueError(f"hidden must be [N, H] and targets [N]; got {tuple(hidden.shape)} and "
                             f"{tuple(targets.shape)}")
        gather = gather or contextlib.nullcontext
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0)  # any in-range index; those rows are masked out below
        # Per row: the max logit and the sum of exp(logit - max); backward rebuilds the softmax from them. Kept
        # apart (not as one log-sum-exp) so the softmax's error is relative to |logit - max|, not to |max|.
        row_max = torch.empty(n, dtype=torch.float32, device=hidden.device)
        row_sum = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with gather():
            if hidden.dtype != weight.dtype:
                raise ValueError(f"hidden is {hidden.dtype} but the LM head weight is {weight.dtype}; the full "
                                 f"path's nn.Linear would refuse this too")
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                logits = _chunk_logits(hidden[s:e], weight, bias)
                m = logits.amax(dim=1)
                gap = m - logits.gather(1, safe[s:e, None]).squeeze(1)  # max - target logit, >= 0
                # The sum in place: one [c, V] fp32 block, where torch.logsumexp would make more.
                z = logits.sub_(m[:, None]).exp_().sum(dim=1)
                del logits  # free this chunk's block before the next one is made
                total += torch.where(valid[s:e], gap + z.log(), 0.0).sum()
                row_max[s:e], row_sum[s:e] = m, z
        ctx.save_for_backward(hidden, safe, valid, row_max, row_sum)
        # The parameters themselves (not gathered values); backward gathers them again.
        ctx.weight, ctx.bias = weight, bias
        ctx.chunk, ctx.gather = chunk, gather
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, safe, valid, row_max, row_sum = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        n, chunk = hidden.shape[0], ctx.chunk
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = grad_b = None
        with ctx.gather():
            dtype = weight.dtype
            if need_w:  # allocated inside gather: outside it a ZeRO-3 weight has its partition's shape
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if need_b:
                grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h = hidden[s:e]
                # d(loss)/d(logits) = (softmax - onehot(target)) * g, 0 for ignored rows; built in place.
                p = _chunk_logits(h, weight, bias)
                p.sub_(row_max[s:e, None]).exp_().div_(row_sum[s:e, None])
                p.scatter_add_(1, safe[s:e, None], p.new_full((e - s, 1), -1.0))
                p.mul_((valid[s:e] * grad_out.float())[:, None])
                # Cast before the matmuls, as autograd casts the full path's fp32 logits gradient to bf16.
                p_low = p.to(dtype)
                del p
                if need_h:
                    grad_h[s:e] = p_low @ weight
                if need_w:
                    if dtype == torch.float32:
                        grad_w.addmm_(p_low.T, h)
                    else:
                        grad_w += (p_low.T @ h).float()  # the matmul at the weight's precision, summed in fp32
                if need_b:
                    grad_b += p_low.sum(dim=0, dtype=torch.float32)
                del p_low
        if grad_w is not None:
            grad_w = grad_w.to(dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def token_loss_sum(hidden: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None = None, chunk: int = 1024,
                   gather: Gather | None = None) -> Tensor:
    """Sum of the next-token cross-entropy over the labelled positions of a micro-batch (fp32 scalar).

    The chunked equivalent of :func:`full_token_loss_sum` ``(lm_head(hidden), labels)``: only positions with a
    label reach the LM head (prompts and padding cost no vocabulary-sized compute), at most ``chunk`` of them at
    a time.

    Args:
        hidden: ``[B, S, H]`` final hidden states (after the final norm).
        labels: ``[B, S]`` unshifted labels, IGNORE_INDEX where no loss is taken; position ``t`` predicts
            ``labels[:, t + 1]``.
        weight: ``[V, H]`` LM head weight; bias: ``[V]`` or None.
        chunk: rows of logits alive at once (memory ``~ 6 * chunk * V`` bytes in bf16).
        gather: see :class:`ChunkedCrossEntropy`.

    Returns:
        The fp32 sum; with no labelled token, a zero that is still connected to ``hidden`` and ``weight``.
    """
    targets = shifted_targets(labels)
    idx = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    # Zero labelled tokens still go through the function (N = 0): backward then reaches hidden (zeros) and, under
    # ZeRO-3, this rank enters gather as often as the ranks that did have tokens.
    return ChunkedCrossEntropy.apply(h, weight, bias, targets.index_select(0, idx), chunk, gather)


def full_token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """The unchunked loss from ``[B, S, V]`` logits (``train.loss_chunk=0``): the reference and the fallback."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


# ----------------------------------------------------------------------------------------------------------
# The loss of a micro-batch, taken from the engine


class LossHead:
    """The next-token loss of a micro-batch: chunked from the final hidden states (``train.loss_chunk`` > 0), so the
    whole ``[batch, seq, vocab]`` logits never exist, or from the model's full logits.

    The chunked path runs the model as usual but asks it for the logits of one position only
    (``logits_to_keep``); a forward hook on the decoder keeps its output (the hidden states after the final norm),
    and :func:`token_loss_sum` computes the loss of the labelled positions from them and the LM
    head's weight, a chunk at a time. Under ZeRO-3 that weight (the input embedding, if tied) is made whole for it,
    in the forward and again in the backward: gathered unless ZeRO-3's fetcher has kept it whole since the head's
    own forward, and partitioned again only if gathered here (:func:`pipeline.distributed.whole_for_compute`). A
    model whose logits are more than ``hidden @ W.T + b`` (Gemma-2's soft-capping, Cohere's logit scale), an LM head
    with its own adapter, or a forward without ``logits_to_keep`` falls back to the full-logits loss, with a line
    that says why (``reason``).
    """

    def __init__(self, engine, chunk: int, zero3: bool):
        model = engine.module
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.engine, self.chunk, self.zero3 = engine, chunk, zero3
        self.reason = _why_not_chunked(base, zero3) if chunk > 0 else None
        self.chunked = chunk > 0 and self.reason is None
        self._hidden: torch.Tensor | None = None
        if self.chunked:
            head = base.get_output_embeddings()
            self.weight, self.bias = head.weight, head.bias
            base.get_decoder().register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, args, output) -> None:
        self._hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def _gather(self):
        return dist.whole_for_compute([self.weight] + ([self.bias] if self.bias is not None else []))

    def __call__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Sum of the next-token cross-entropy over the labelled positions (fp32)."""
        if not self.chunked:
            logits = self.engine(**inputs).logits
            ce = full_token_loss_sum(logits, labels)
            del logits  # the loss saved what backward needs; freeing the logits lowers the peak by their size
            return ce
        # The logits of position 0 only, asked for by index: transformers takes the int logits_to_keep=1 as the
        # slice hidden[:, -1:], a strided view, on which torch 2.13's CPU bf16 matmul with the LM head took 1.6 s
        # for 8 rows (SmolLM2's 49,152 x 576 head) against 16 ms on the contiguous copy that an index gives.
        first = torch.zeros(1, dtype=torch.long, device=labels.device)
        kept = self.engine(**inputs, logits_to_keep=first).logits
        hidden, self._hidden = self._hidden, None
        ce = token_loss_sum(hidden, labels, self.weight, self.bias, self.chunk,
                                    gather=self._gather if self.zero3 else None)
        # DeepSpeed starts its backward bookkeeping from hooks on the engine's outputs (engine.py
        # register_output_backward_hooks): without the logits in the graph, BF16_Optimizer never clears its bf16
        # gradients between micro-batches and counts the first ones twice (grad norm 15.5 instead of 10.0 at
        # grad_accum 2, measured). Adding them times zero costs one [batch, 1, vocab] backward.
        return ce + kept.float().sum() * 0.0


    @torch.no_grad()
    def token_logprobs(self, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's log-probability of ``targets[i]`` at position ``(rows[i], cols[i])`` of ``ids`` (``[B, S]``,
        no attention mask: right padding is invisible to a causal model's earlier positions), and whether it is
        the most likely token there: ``([N] fp32, [N] bool)``. The engine's mode is the caller's (eval for
        scoring). Collective under ZeRO-3, as a training forward is.

        Logits exist only at the ``N`` positions asked for, ``chunk`` rows of ``[chunk, vocab]`` fp32 at a time
        (the chunked loss's own bound), computed as the full path would (the head's matmul in the model's dtype,
        then fp32); where the model needs its own logits (``reason``), from those, one position per row kept.
        """
        inputs = {"input_ids": ids, "use_cache": False}
        if not self.chunked:
            logits = self.engine(**inputs).logits
            return _logprobs_of(logits[rows, cols].float(), targets)
        first = torch.zeros(1, dtype=torch.long, device=ids.device)
        self.engine(**inputs, logits_to_keep=first)  # the head runs on one position a row, as in training
        hidden, self._hidden = self._hidden, None
        h = hidden[rows, cols]  # [N, H], a copy: the [B, S, H] states can go
        del hidden
        logp = torch.empty(len(targets), dtype=torch.float32, device=ids.device)
        greedy = torch.empty(len(targets), dtype=torch.bool, device=ids.device)
        with self._gather() if self.zero3 else contextlib.nullcontext():
            for s in range(0, len(targets), self.chunk):
                e = min(s + self.chunk, len(targets))
                logp[s:e], greedy[s:e] = _logprobs_of(_chunk_logits(h[s:e], self.weight, self.bias), targets[s:e])
        return logp, greedy


def _logprobs_of(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``log_softmax(logits)[i, targets[i]]`` and ``argmax(logits[i]) == targets[i]`` for ``[N, V]`` fp32 logits."""
    target = logits.gather(1, targets[:, None]).squeeze(1)
    return target - torch.logsumexp(logits, dim=1), logits.argmax(dim=1) == targets


def _why_not_chunked(base, zero3: bool) -> str | None:
    """Why the chunked loss cannot stand in for this model's own logits, or None if it can."""
    import inspect

    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain Linear layer (an adapter on lm_head?)"
    tied = head.weight is base.get_input_embeddings().weight
    if zero3 and head.weight.requires_grad and not tied:  # see ChunkedCrossEntropy above
        return "its LM head is trained, untied, under ZeRO-3"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep argument"
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"its logits are transformed after the LM head (config.{key}={getattr(config, key)})"
    return None
