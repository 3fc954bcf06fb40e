"""The training loop: one function, top to bottom (:func:`train`), with its inputs as two typed values (the rows
it reads, the wiring it reports to); the micro-batches of a step (:func:`accumulate`), the verdict on a
non-finite step (:func:`judge`), and the validation loss."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import distributed as dist
from pipeline.config import Config
from pipeline.data.formats import IGNORE_INDEX, collate, rank_micro_batches
from pipeline.distributed import faults
from pipeline.distributed.preempt import StopRequest
from pipeline.errors import RunError
from pipeline.observe.flops import batch_flops, flop_model, peak_tflops
from pipeline.observe.memory import MemoryMeter
from pipeline.observe.metrics import Reporter, Stopwatch
from pipeline.train.loss import LossHead

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


@dataclass(frozen=True)
class Rows:
    """The data the loop reads: training rows (``len`` and ``[i]`` giving a :class:`pipeline.data.formats.Sample`),
    the validation rows or None, and the tokenizer's pad id."""

    train: Any
    val: Any | None
    pad_id: int


@dataclass(frozen=True)
class Wiring:
    """What the loop hands its results to, built by :mod:`pipeline.train.session`: ``report`` (console,
    ``metrics.jsonl``, ``val.jsonl``, trackers), ``save`` (a checkpoint of the steps done; the session also starts
    the MMLU scorer there), ``stop`` (a signal asked the run to stop), ``meter`` (this rank's memory peak)."""

    report: Reporter
    save: Callable[[Progress], None]
    stop: StopRequest
    meter: MemoryMeter | None = None


@dataclass
class Step:
    """One optimizer step's outcome, as every rank agrees on it after the step's exchange."""

    loss: float
    grad_norm: float | None
    mem_mib: int  # the busiest rank's memory peak so far
    signum: int  # a stop signal seen by any rank, or 0
    bad: bool  # non-finite: the update was not applied
    ds_skipped: bool  # DeepSpeed skipped the update (overflow check, or an fp16 loss-scale overflow)


def loss_head(engine, cfg: Config, report: Reporter) -> LossHead:
    """The run's loss head (``train.loss_chunk``), with a line where the model cannot take the chunked loss."""
    loss_of = LossHead(engine, cfg.train.loss_chunk, engine.zero_optimization_partition_weights())
    if loss_of.reason:
        report.print(f"train.loss_chunk={cfg.train.loss_chunk} cannot be used with this model: {loss_of.reason}; "
                     f"computing the loss from full logits")
    return loss_of


def train(engine, cfg: Config, info: dist.DistInfo, rows: Rows, wiring: Wiring, progress: Progress,
          loss_of: LossHead) -> int:
    """Run optimizer steps ``progress.step + 1 .. cfg.train.max_steps`` with the loss of ``loss_of``
    (:func:`loss_head`); return 0, or the number of the signal that stopped the run early (after a checkpoint of the
    last finished step was saved).

    The validation rows are evaluated (:func:`validation_loss`) before the first update of a fresh run, every
    ``train.eval_every`` steps and after the last step.

    Loss normalisation: each step minimises (sum of token losses over the *global* batch) / (label tokens in
    the global batch), whatever the split into ranks and accumulation micro-batches. So ZeRO stages, world
    sizes and ``grad_accum`` settings with the same global batch give the same updates, and long and short
    samples weigh per token (not per micro-batch) as they would in one big batch.

    Non-finite steps: a NaN/inf loss is turned into NaN gradients (no extra CPU-GPU sync), which DeepSpeed's
    ZeRO optimizers detect and skip without touching weights or Adam state; under ZeRO-0 the loop drops the
    gradients itself. The schedule still advances, as it does for the data: step N always means batch N.
    """
    mb, ga, world, n = cfg.train.micro_batch_size, cfg.train.grad_accum, info.world_size, len(rows.train)
    clock = Stopwatch()
    engine.train()
    fm, peak = flop_model(engine.module), peak_tflops(cfg.train.peak_tflops, info.on_gpu)
    checkpointing = cfg.model.gradient_checkpointing
    flatten = cfg.model.attn_implementation == "flash_attention_2"

    def validate(step: int) -> None:
        clock_v = Stopwatch()
        loss, tokens = validation_loss(engine, loss_of, rows.val, mb, info, rows.pad_id, flatten)
        wiring.report.validation({"step": step, "val_loss": loss, "val_tokens": tokens,
                                  "time_s": round(clock_v.elapsed(), 3)})

    def prepare(step: int) -> tuple[list[dict], list[float]]:
        """This rank's micro-batches of ``step`` and its counts: label tokens (the loss normaliser), non-padding
        tokens, model and hardware FLOPs."""
        micro = rank_micro_batches(n, cfg.seed, step, mb, ga, info.rank, world)
        batches = [collate([rows.train[i] for i in idx], rows.pad_id) for idx in micro]
        flops = [batch_flops(fm, b["attention_mask"], checkpointing, b.get("doc_lengths")) for b in batches]
        return batches, [sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
                         sum(int(b["attention_mask"].sum()) for b in batches),
                         sum(f[0] for f in flops), sum(f[1] for f in flops)]

    if rows.val is not None and progress.step == 0:
        validate(0)
    # The loop's own collectives: one exchange at the end of each step carries the step's loss, memory peak and
    # stop signal, and the next step's counts (its batches are collated ahead for that). Only the first step of a
    # start needs an all-reduce of its counts before its backward, and a step that saved asks again for a signal
    # that came during the save.
    ahead: tuple[list[dict], list[float]] | None = None
    consecutive_bad = 0
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

        # forward, backward and (at the last micro-batch) the update
        loss_sum, own_norm = accumulate(engine, loss_of, batches, done, info, world / label_tokens, flatten)

        # one exchange: the step's loss, memory and stop signal, and the next step's counts
        next_batches, next_counts = prepare(done) if done < cfg.train.max_steps else ([], [0.0] * 4)
        peak_mib = wiring.meter.peak() // 2 ** 20 if wiring.meter else 0
        exchanged = dist.exchange(torch.cat([loss_sum.reshape(1), torch.tensor(
            [peak_mib, wiring.stop.signum, *next_counts], dtype=torch.float64, device=info.device)]))  # CPU-GPU sync
        ahead = (next_batches, [float(x) for x in exchanged[:, 3:].sum(dim=0)])
        mem_mib, signum = (int(x) for x in exchanged[:, 1:3].max(dim=0).values)
        outcome = judge(engine, float(exchanged[:, 0].sum()) / label_tokens, own_norm,
                        engine.skipped_steps > skipped_before, done)
        outcome.mem_mib, outcome.signum = mem_mib, signum
        progress.nonfinite_steps += outcome.bad
        consecutive_bad = consecutive_bad + 1 if outcome.bad else 0

        # report
        progress.step = done
        dt = time.perf_counter() - t0
        wiring.report.step({
            "step": done,
            "loss": outcome.loss if math.isfinite(outcome.loss) else None,
            "lr_groups": lrs,
            "grad_norm": outcome.grad_norm if outcome.grad_norm is not None and math.isfinite(outcome.grad_norm)
            else None,
            "tokens": int(tokens),
            "label_tokens": int(label_tokens),
            "tokens_per_s": tokens / dt,
            "elapsed_s": round(progress.elapsed_s + clock.elapsed(), 4),
            "time": round(time.time(), 4),
            "epoch": done * mb * ga * world / n,
            "skipped": outcome.bad or outcome.ds_skipped,
            "nonfinite_steps": progress.nonfinite_steps,
            "mem_peak_gb": round(mem_mib / 1024, 3) if wiring.meter and wiring.meter.available else None,
            "mfu": round(model_flops / dt / (peak * 1e12 * world), 5) if peak else None,
            "hfu": round(hardware_flops / dt / (peak * 1e12 * world), 5) if peak and checkpointing else None,
        })
        if outcome.bad and cfg.train.on_nonfinite == "stop":
            raise RunError(f"step {done}: non-finite loss or gradient norm (loss {outcome.loss}, grad norm "
                           f"{outcome.grad_norm}); the update was not applied; stopped because "
                           f"train.on_nonfinite=stop")
        if consecutive_bad >= MAX_CONSECUTIVE_NONFINITE:
            raise RunError(f"{consecutive_bad} steps in a row up to step {done} had a non-finite loss or gradient "
                           f"norm and were skipped; the run is not recovering: lower optim.lr or check the data")

        # validate, save, stop
        if rows.val is not None and (done == cfg.train.max_steps or (cfg.train.eval_every and
                                                                     done % cfg.train.eval_every == 0)):
            validate(done)
        saved = False
        if done == cfg.train.max_steps or (cfg.train.save_every and done % cfg.train.save_every == 0):
            progress.elapsed_s += clock.lap()
            wiring.save(progress)
            saved = True
            signum = dist.max_over_ranks(wiring.stop.signum)  # also a signal that came during the save
        if signum:  # seen by any rank: every rank stops
            if not saved:
                progress.elapsed_s += clock.lap()
                wiring.save(progress)
            return signum
    return 0


def accumulate(engine, loss_of: LossHead, batches: list[dict], done: int, info: dist.DistInfo, scale: float,
               flatten: bool) -> tuple[torch.Tensor, float | None]:
    """Forward and backward of this rank's micro-batches of step ``done``, and the optimizer step at the last
    (``engine.step`` updates only at the accumulation boundary). ``scale`` turns each micro-batch's loss sum into
    its share of the global per-token mean: DeepSpeed averages gradients over ranks, so world size / global label
    tokens.

    Returns:
        This rank's loss sum (fp64, not yet reduced), and the gradient norm the loop measured itself where
        DeepSpeed keeps none (ZeRO-0; else None).
    """
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
        engine.backward(ce * guard * scale, scale_wrt_gas=False)
        if k == len(batches) - 1:
            own_norm = dist.grad_norm_if_untracked(engine)  # ZeRO-0 keeps no norm of its own
            drop = own_norm is not None and not math.isfinite(own_norm)  # ZeRO-0 has no overflow check
        with dist.without_update(engine, enabled=drop):
            engine.step()  # an optimizer step (and scheduler step) only at the accumulation boundary
        loss_sum += ce.detach().double()
    return loss_sum, own_norm


def judge(engine, loss: float, own_norm: float | None, ds_skipped: bool, done: int) -> Step:
    """Whether step ``done`` was non-finite (its update not applied), from the global loss and the gradient norm.
    A step DeepSpeed skipped keeps the schedule on the step count.

    Raises:
        RunError: a non-finite step whose update DeepSpeed applied anyway (only with its overflow check off).
    """
    norm = dist.grad_norm(engine, fallback=own_norm)
    if ds_skipped:
        engine.lr_scheduler.step()  # DeepSpeed holds the schedule on a skipped step; keep it on the step count
    nonfinite = not math.isfinite(loss) or (norm is not None and not math.isfinite(norm))
    if engine.fp16_enabled():  # a loss-scale overflow is routine in fp16: skipped, but not a non-finite step
        bad = not math.isfinite(loss)
    else:
        bad = nonfinite or ds_skipped
    if bad and not ds_skipped and own_norm is None:
        # Only possible if DeepSpeed's overflow check was off (read_ds_json refuses the keys that do that).
        raise RunError(f"step {done}: non-finite loss, and DeepSpeed applied the update anyway; the weights "
                       f"may now hold NaN; resume from the newest checkpoint, which predates this step")
    return Step(loss, norm, 0, 0, bad, ds_skipped)
