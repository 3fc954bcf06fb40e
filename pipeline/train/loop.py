"""The training loop: one function, top to bottom."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline import dist
from pipeline.config import Config
from pipeline.data.formats import IGNORE_INDEX, collate, rank_micro_batches
from pipeline.dist import faults
from pipeline.dist.preempt import StopRequest
from pipeline.errors import RunError
from pipeline.observe.flops import batch_flops, flop_model, peak_tflops
from pipeline.observe.memory import MemoryMeter
from pipeline.observe.metrics import Reporter, Stopwatch
from pipeline.train.loss import full_token_loss_sum
from pipeline.train.loss import token_loss_sum as chunked_token_loss_sum

MAX_CONSECUTIVE_NONFINITE = 10  # with on_nonfinite=skip: past this, the run is not recovering; stop it


@dataclass
class Progress:
    """What the loop carries across a checkpoint besides the engine state (saved in ``trainer_state.json``)."""

    step: int = 0  # optimizer steps done
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss or gradient norm
    elapsed_s: float = 0.0  # training wall time before this start


def model_inputs(b: dict[str, torch.Tensor], device, flatten: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model's keyword arguments for a collated micro-batch, and its labels, on ``device``.

    Packed rows pass ``position_ids`` and no ``attention_mask``: transformers then keeps each document's attention
    inside it (sdpa/eager build a block-diagonal causal mask from the positions). flash-attention reads packing
    from the positions only at batch size 1, so with ``flatten`` the rows become one ``[1, batch * width]`` row
    (each row starts a document whose first label is masked, so no loss crosses rows either).
    """
    labels = b["labels"].to(device)
    if "position_ids" not in b:
        return {"input_ids": b["input_ids"].to(device), "attention_mask": b["attention_mask"].to(device)}, labels
    ids, pos = b["input_ids"].to(device), b["position_ids"].to(device)
    if flatten:
        ids, pos, labels = ids.reshape(1, -1), pos.reshape(1, -1), labels.reshape(1, -1)
    # use_cache=False: with a KV cache transformers ignores the positions' packing and attends across documents.
    return {"input_ids": ids, "position_ids": pos, "use_cache": False}, labels


class LossHead:
    """The next-token loss of a micro-batch: chunked from the final hidden states (``train.loss_chunk`` > 0), so the
    whole ``[batch, seq, vocab]`` logits never exist, or from the model's full logits.

    The chunked path runs the model as usual but asks it for the logits of one position only
    (``logits_to_keep``); a forward hook on the decoder keeps its output (the hidden states after the final norm),
    and :func:`pipeline.train.loss.token_loss_sum` computes the loss of the labelled positions from them and the LM
    head's weight, a chunk at a time. Under ZeRO-3 that weight (the input embedding, if tied) is made whole for it,
    in the forward and again in the backward: gathered unless ZeRO-3's fetcher has kept it whole since the head's
    own forward, and partitioned again only if gathered here (:func:`pipeline.dist.whole_for_compute`). A
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
        ce = chunked_token_loss_sum(hidden, labels, self.weight, self.bias, self.chunk,
                                    gather=self._gather if self.zero3 else None)
        # DeepSpeed starts its backward bookkeeping from hooks on the engine's outputs (engine.py
        # register_output_backward_hooks): without the logits in the graph, BF16_Optimizer never clears its bf16
        # gradients between micro-batches and counts the first ones twice (grad norm 15.5 instead of 10.0 at
        # grad_accum 2, measured). Adding them times zero costs one [batch, 1, vocab] backward.
        return ce + kept.float().sum() * 0.0


def _why_not_chunked(base, zero3: bool) -> str | None:
    """Why the chunked loss cannot stand in for this model's own logits, or None if it can."""
    import inspect

    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain Linear layer (an adapter on lm_head?)"
    tied = head.weight is base.get_input_embeddings().weight
    if zero3 and head.weight.requires_grad and not tied:  # see pipeline.train.loss.ChunkedCrossEntropy
        return "its LM head is trained, untied, under ZeRO-3"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep argument"
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"its logits are transformed after the LM head (config.{key}={getattr(config, key)})"
    return None


def validation_loss(engine, loss_of: LossHead, rows, micro_batch_size: int, info: dist.DistInfo, pad_id: int,
                    flatten: bool) -> tuple[float, int]:
    """Token-weighted loss over the whole validation set, all ranks: (loss, label tokens).

    Rank ``r`` takes rows ``r, r + world, ...``; every rank runs the same number of forward passes (ZeRO-3 gathers
    parameters collectively), a rank past its last row running row 0 with its labels ignored. No gradients,
    dropout off; the engine is back in training mode afterwards.
    """
    world, n = info.world_size, len(rows)
    mine = list(range(info.rank, n, world))
    passes = math.ceil(math.ceil(n / world) / micro_batch_size)  # the busiest rank's micro-batches
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    engine.eval()
    with torch.no_grad():
        for k in range(passes):
            idx = mine[k * micro_batch_size:(k + 1) * micro_batch_size]
            b = collate([rows[i] for i in idx] if idx else [rows[0]], pad_id)
            if not idx:
                b["labels"].fill_(IGNORE_INDEX)
            inputs, labels = model_inputs(b, info.device, flatten)
            total[0] += loss_of(inputs, labels).double()
            total[1] += int((labels[:, 1:] != IGNORE_INDEX).sum())
    engine.train()
    loss_sum, tokens = (float(x) for x in dist.all_reduce_sum(total))
    return loss_sum / max(tokens, 1.0), int(tokens)


def train(engine, samples, cfg: Config, info: dist.DistInfo, reporter: Reporter, pad_id: int,
          save: Callable[[Progress], None], progress: Progress, stop: StopRequest, meter: MemoryMeter | None = None,
          val_rows=None) -> int:
    """Run optimizer steps ``progress.step + 1 .. cfg.train.max_steps``; return 0, or the number of the signal
    that stopped the run early (after a checkpoint of the last finished step was saved).

    ``samples``: the training rows (``len`` and ``[i]`` giving a :class:`pipeline.data.formats.Sample`). ``val_rows``: the
    validation rows, evaluated (:func:`validation_loss`) before the first update of a fresh run, every
    ``train.eval_every`` steps and after the last step.

    Loss normalisation: each step minimises (sum of token losses over the *global* batch) / (label tokens in
    the global batch), whatever the split into ranks and accumulation micro-batches. So ZeRO stages, world
    sizes and ``grad_accum`` settings with the same global batch give the same updates, and long and short
    samples weigh per token (not per micro-batch) as they would in one big batch.

    Non-finite steps: a NaN/inf loss is turned into NaN gradients (no extra CPU-GPU sync), which DeepSpeed's
    ZeRO optimizers detect and skip without touching weights or Adam state; under ZeRO-0 the loop drops the
    gradients itself. The schedule still advances, as it does for the data: step N always means batch N.
    """
    mb, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    world, n = info.world_size, len(samples)
    clock = Stopwatch()
    engine.train()
    consecutive_bad = 0
    fp16 = engine.fp16_enabled()
    fm = flop_model(engine.module)
    peak = peak_tflops(cfg.train.peak_tflops, info.on_gpu)
    checkpointing = cfg.model.gradient_checkpointing
    flatten = cfg.model.attn_implementation == "flash_attention_2"
    loss_of = LossHead(engine, cfg.train.loss_chunk, engine.zero_optimization_partition_weights())
    if loss_of.reason:
        reporter.print(f"train.loss_chunk={cfg.train.loss_chunk} cannot be used with this model: {loss_of.reason}; "
                       f"computing the loss from full logits")

    def validate(step: int) -> None:
        clock_v = Stopwatch()
        loss, tokens = validation_loss(engine, loss_of, val_rows, mb, info, pad_id, flatten)
        reporter.validation({"step": step, "val_loss": loss, "val_tokens": tokens,
                             "time_s": round(clock_v.elapsed(), 3)})

    def prepare(step: int) -> tuple[list[dict], list[float]]:
        """This rank's micro-batches of ``step`` and its counts: label tokens (the loss normaliser), non-padding
        tokens, model and hardware FLOPs."""
        micro = rank_micro_batches(n, cfg.seed, step, mb, ga, info.rank, world)
        batches = [collate([samples[i] for i in idx], pad_id) for idx in micro]
        flops = [batch_flops(fm, b["attention_mask"], checkpointing, b.get("doc_lengths")) for b in batches]
        return batches, [sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
                         sum(int(b["attention_mask"].sum()) for b in batches),
                         sum(f[0] for f in flops), sum(f[1] for f in flops)]

    if val_rows is not None and progress.step == 0:
        validate(0)
    # The loop's own collectives: one exchange at the end of each step carries the step's loss, memory peak and
    # stop signal, and the next step's counts (its batches are collated ahead for that). Only the first step of a
    # start needs an all-reduce of its counts before its backward, and a step that saved asks again for a signal
    # that came during the save.
    ahead: tuple[list[dict], list[float]] | None = None
    for step in range(progress.step, cfg.train.max_steps):
        t0 = time.perf_counter()
        done = step + 1
        if ahead is None:
            batches, mine = prepare(step)
            totals = [float(x) for x in dist.all_reduce_sum(torch.tensor(mine, dtype=torch.float64,
                                                                          device=info.device))]
        else:
            batches, totals = ahead
        label_tokens, tokens, model_flops, hardware_flops = totals
        lrs = dist.current_lrs(engine)  # the lrs this step's update will use (the scheduler moves after it)
        skipped_before = engine.skipped_steps

        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        own_norm = None
        drop = False
        for k, b in enumerate(batches):
            ce = loss_of(*model_inputs(b, info.device, flatten))
            if faults.nonfinite(done, info.rank):
                ce = ce * float("nan")
            faults.during_step(done, info.rank)
            # An inf loss can have finite gradients; scaling by NaN makes sure the overflow check sees it.
            guard = torch.where(torch.isfinite(ce.detach()), 1.0, float("nan"))
            # DeepSpeed averages gradients over ranks; multiplying by the world size turns that average into
            # the sum over ranks, and dividing by the global label count makes it a per-token mean.
            engine.backward(ce * guard * (world / label_tokens), scale_wrt_gas=False)
            if k == ga - 1:
                own_norm = dist.grad_norm_if_untracked(engine)  # ZeRO-0 keeps no norm of its own
                drop = own_norm is not None and not math.isfinite(own_norm)  # ZeRO-0 has no overflow check
            with dist.without_update(engine, enabled=drop):
                engine.step()  # an optimizer step (and scheduler step) only at the accumulation boundary
            loss_sum += ce.detach().double()
        next_batches, next_counts = prepare(done) if done < cfg.train.max_steps else ([], [0.0] * 4)
        peak_mib = meter.peak() // 2 ** 20 if meter else 0
        rows = dist.exchange(torch.cat([loss_sum.reshape(1), torch.tensor(
            [peak_mib, stop.signum, *next_counts], dtype=torch.float64, device=info.device)]))  # CPU-GPU sync
        loss = float(rows[:, 0].sum()) / label_tokens
        mem_mib, signum = (int(x) for x in rows[:, 1:3].max(dim=0).values)  # the busiest rank's peak so far
        ahead = (next_batches, [float(x) for x in rows[:, 3:].sum(dim=0)])
        norm = dist.grad_norm(engine, fallback=own_norm)
        ds_skipped = engine.skipped_steps > skipped_before
        if ds_skipped:
            engine.lr_scheduler.step()  # DeepSpeed holds the schedule on a skipped step; keep it on the step count
        nonfinite = not math.isfinite(loss) or (norm is not None and not math.isfinite(norm))
        if fp16:  # a loss-scale overflow is routine in fp16: skipped, but not a non-finite step
            bad = not math.isfinite(loss)
        else:
            bad = nonfinite or ds_skipped
        if bad and not ds_skipped and own_norm is None:
            # Only possible if DeepSpeed's overflow check was off (read_ds_json refuses the keys that do that).
            raise RunError(f"step {done}: non-finite loss, and DeepSpeed applied the update anyway; the weights "
                           f"may now hold NaN; resume from the newest checkpoint, which predates this step")
        progress.nonfinite_steps += bad
        consecutive_bad = consecutive_bad + 1 if bad else 0

        progress.step = done
        dt = time.perf_counter() - t0
        reporter.step({
            "step": done,
            "loss": loss if math.isfinite(loss) else None,
            "lr_groups": lrs,
            "grad_norm": norm if norm is not None and math.isfinite(norm) else None,
            "tokens": int(tokens),
            "label_tokens": int(label_tokens),
            "tokens_per_s": tokens / dt,
            "elapsed_s": round(progress.elapsed_s + clock.elapsed(), 4),
            "time": round(time.time(), 4),
            "epoch": done * mb * ga * world / n,
            "skipped": bad or ds_skipped,
            "nonfinite_steps": progress.nonfinite_steps,
            "mem_peak_gb": round(mem_mib / 1024, 3) if meter and meter.available else None,
            "mfu": round(model_flops / dt / (peak * 1e12 * world), 5) if peak else None,
            "hfu": round(hardware_flops / dt / (peak * 1e12 * world), 5) if peak and checkpointing else None,
        })
        if bad and cfg.train.on_nonfinite == "stop":
            raise RunError(f"step {done}: non-finite loss or gradient norm (loss {loss}, grad norm {norm}); the "
                           f"update was not applied; stopped because train.on_nonfinite=stop")
        if consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
            raise RunError(f"{consecutive_bad} steps in a row up to step {done} had a non-finite loss or gradient "
                           f"norm and were skipped; the run is not recovering: lower optim.lr or check the data")

        if val_rows is not None and (done == cfg.train.max_steps or (cfg.train.eval_every and
                                                                     done % cfg.train.eval_every == 0)):
            validate(done)
        saved = False
        if done == cfg.train.max_steps or (cfg.train.save_every and done % cfg.train.save_every == 0):
            progress.elapsed_s += clock.lap()
            save(progress)
            saved = True
            signum = dist.max_over_ranks(stop.signum)  # also a signal that came during the save
        if signum:  # seen by any rank: every rank stops
            if not saved:
                progress.elapsed_s += clock.lap()
                save(progress)
            return signum
    return 0
