"""lm-eval's model interface served by the live training engine: :class:`EngineLM`.

lm-eval's own ``simple_evaluate`` runs on every rank (as GPT-NeoX's ``eval_adapter.py`` does): each rank builds its
slice of MMLU's documents (``rank::world_size``), the evaluator pads the ranks' request counts and gathers the
per-document metrics to rank 0, which aggregates them (acc, stderr, the groups) as it would in one process. This
class supplies what that needs: tokenising the way lm-eval's ``HFLM`` does (its own helpers, so the requests are
the same tokens), the log-likelihood of each request's continuation, and the collectives.

Why every rank runs lm-eval rather than rank 0 driving it while the others serve forwards (Levanter): lm-eval's
distributed evaluation already exists and is what ``accelerate launch lm_eval`` runs, so the split, the padding and
the gathering are lm-eval's, not ours; the requests never travel between ranks; and the workers need no loop of
their own. What lm-eval does not promise is that every rank makes the same number of forward calls (equal request
counts are not equal batches), and under ZeRO-3 every forward is a collective (parameter all-gathers): this class
agrees the number of batches over the ranks first, and a rank with fewer runs one-token forwards until the others
are done.

The log-likelihoods themselves come from a ``logprobs`` callable (the training loss head's
:meth:`pipeline.train.loss.LossHead.token_logprobs`): logits only at the scored positions, never the whole
``[batch, tokens, vocabulary]`` that ``HFLM`` holds three times over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from lm_eval.api.model import TemplateLM

from pipeline import distributed as dist
from pipeline.distributed import faults

#: ``logprobs(ids [B, S], rows [N], cols [N], targets [N]) -> (log p [N] fp32, is argmax [N] bool)``: the model's
#: log-probability of ``targets[i]`` at position ``(rows[i], cols[i])`` of the batch ``ids``. Collective.
LogProbs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


BATCHES, DONE = 1, 2  # what lm-eval's ranks tell the serving ranks (see EngineLM.serve)


class ScoringStopped(Exception):
    """A stop signal reached some rank while scoring; every rank raises this at the same batch."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum} while scoring")
        self.signum = signum


@dataclass(frozen=True)
class Batching:
    """At most ``rows`` rows and ``tokens`` padded tokens per forward."""

    rows: int
    tokens: int


class EngineLM(TemplateLM):
    """An ``lm_eval.api.model.LM`` whose log-likelihoods the live model computes on every rank.

    Args:
        tokenizer: the run's tokenizer (the base model's).
        config: the model's ``transformers`` config (for lm-eval's maximum length).
        logprobs: see :data:`LogProbs`.
        info: this rank's coordinates (rank, world size, device).
        batching: rows and tokens per forward.
        stop: a collective that returns a stop signal seen by any rank, or 0; asked before every batch.
    """

    def __init__(self, tokenizer, config, logprobs: LogProbs, info: dist.DistInfo, batching: Batching,
                 stop: Callable[[], int]):
        super().__init__()
        from lm_eval.models.utils import resolve_max_length

        self.tokenizer = tokenizer
        self._logprobs, self._batching, self._stop = logprobs, batching, stop
        self._rank, self._world_size, self._device = info.rank, info.world_size, info.device
        self._group = None  # lm-eval's ranks (see take_part); None: all
        # HFLM's rule (lm_eval/models/huggingface.py, max_length): the config's positions, else the tokenizer's.
        self._max_length = resolve_max_length(config, tokenizer, default=2048)
        self.forwards = 0  # forward calls this rank made in the current score (real and stand-ins): equal on all
        self.step = 0  # the step being scored (for the fault injection of the tests)

    # Who runs lm-eval. lm-eval gives each of its ranks a slice of every task's documents and stops on a rank whose
    # slice is empty ("did not find any docs"): with more ranks than a task has questions (a small ``limit``, many
    # GPUs) only the first ``size`` ranks run it, and the others serve forwards (:meth:`serve`).

    def take_part(self, step: int, size: int) -> bool:
        """A score of ``step`` begins; lm-eval runs on ranks ``0 .. size - 1`` (their
        :func:`pipeline.distributed.subgroup`): True on those. Collective: every rank calls it with the same
        ``size`` before each score."""
        self.step, self.forwards = step, 0
        self._group = dist.subgroup(size)
        rank = dist.env_rank()
        self._rank, self._world_size = (rank, size) if rank < size else (0, 1)
        return rank < size

    def stop_signal(self) -> int:
        """A stop signal seen by any rank, or 0. Collective."""
        return self._stop()

    def serve(self) -> None:
        """On a rank outside lm-eval's: make the forwards the others' batches need (one-token stand-ins), until
        they are done (:meth:`done`). Raises :class:`ScoringStopped` with them."""
        while True:
            phase, total = dist.max_over_ranks([0, 0])
            if phase == DONE:
                return
            for _ in range(total):
                self._forward(None, None, [])

    def done(self) -> None:
        """On lm-eval's ranks, after ``simple_evaluate``: let the serving ranks go."""
        dist.max_over_ranks([DONE, 0])

    # What lm-eval's evaluator asks of a distributed LM

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return dist.exchange(tensor.reshape(-1), self._group).reshape(-1)

    def gather_object(self, obj, dst: int = 0):
        return dist.gather_objects_to(obj, dst, self._group)

    def barrier(self) -> None:
        dist.barrier(self._group)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    # Tokens, as HFLM makes them

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # HFLM.prefix_token_id: the context of a request with none
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        """Rows per forward, at most (what lm-eval records as the batch size)."""
        return self._batching.rows

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """``HFLM.tok_encode`` (lm-eval 0.4.13) with lm-eval's own helpers: the tokenizer's default special tokens
        unless told, none added to a string that already starts with the BOS text."""
        from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

        special = _add_special_kwargs(add_special_tokens, None)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    # Scoring

    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """lm-eval's own (``TemplateLM.loglikelihood``: empty contexts, the context/continuation split), without its
        progress bar inside a training run's output."""
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation, whether it is the greedy one) for each ``((context, continuation),
        context tokens, continuation tokens)``, as ``HFLM._loglikelihood_tokens`` computes them: the input is
        ``(context + continuation)[-(max_length + 1):][:-1]`` and the continuation's tokens are read at its last
        positions. Requests with the same input share one forward row (MMLU's four one-token answers: one row a
        question, as HFLM's ``group_by="contexts"``)."""
        inputs: dict[tuple[int, ...], list[int]] = {}  # input tokens -> the requests reading that row
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"request {i}: context of {len(context)} tokens and continuation of "
                                 f"{len(continuation)}: lm-eval never sends these to a causal model")
            inputs.setdefault(tuple((context + continuation)[-(self.max_length + 1):][:-1]), []).append(i)
        order = sorted(inputs, key=lambda toks: (-len(toks), toks))  # longest first, as HFLM's Collator
        batches = self._batches(order)
        # Every rank makes the same number of forwards (ZeRO-3 gathers are collective): the most any rank needs.
        _, total = dist.max_over_ranks([BATCHES, len(batches)])
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for k in range(total):
            real = k < len(batches)
            self._forward(batches[k] if real else None, inputs if real else None, requests, out)
        return out  # type: ignore[return-value]

    def _forward(self, rows, inputs, requests, out=None) -> None:
        """One forward of every rank: ``rows`` of this batch (``None``: a one-token stand-in row, whose result no
        request reads), each request's result into ``out``. A stop signal on any rank stops every rank here."""
        if self.forwards == 0:
            faults.during_scoring(self.step, dist.env_rank())
        signum = self._stop()
        if signum:
            raise ScoringStopped(signum)
        ids, where, targets, owners = self._assemble(rows or [(self.prefix_token_id,)], inputs, requests)
        logp, greedy = self._logprobs(ids, where[0], where[1], targets)
        self.forwards += 1
        for i, span in owners:  # each request's positions: one contiguous span of the flat results
            out[i] = (float(logp[span].sum()), bool(greedy[span].all()))

    def _batches(self, order: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        """Rows longest first, each batch padded to its first row: at most ``rows`` rows and ``tokens`` tokens."""
        batches: list[list[tuple[int, ...]]] = []
        for toks in order:
            if batches and len(batches[-1]) < self._batching.rows and \
                    (len(batches[-1]) + 1) * len(batches[-1][0]) <= self._batching.tokens:
                batches[-1].append(toks)
            else:
                batches.append([toks])
        return batches

    def _assemble(self, rows, inputs, requests):
        """The batch ``[B, L]`` (right-padded: a causal model's positions before the padding see none of it), the
        positions to read, their target tokens, and which span of them is whose request (``inputs`` None: the
        one-token stand-in row, read at its one position, owned by no request)."""
        ids = torch.zeros((len(rows), len(rows[0])), dtype=torch.long)
        r_idx: list[int] = []
        c_idx: list[int] = []
        targets: list[int] = []
        owners: list[tuple[int, slice]] = []
        for r, toks in enumerate(rows):
            ids[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            for i in (inputs[toks] if inputs is not None else [None]):
                cont = list(requests[i][2]) if i is not None else [self.prefix_token_id]
                if i is not None:
                    owners.append((i, slice(len(targets), len(targets) + len(cont))))
                r_idx += [r] * len(cont)
                c_idx += range(len(toks) - len(cont), len(toks))  # position t predicts token t + 1
                targets += cont
        device = self._device

        def as_long(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        return ids.to(device), (as_long(r_idx), as_long(c_idx)), as_long(targets), owners

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the engine runner scores log-likelihood tasks (MMLU); no rolling perplexity")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the engine runner scores log-likelihood tasks (MMLU); no generation")
