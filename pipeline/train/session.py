"""The run around the loop: ``output_dir`` receives (or continues) the run, the resumed state is loaded, and the
loop trains with its wiring: a checkpoint every ``train.save_every`` steps, at the end and when a signal stops
the run (``preempt.StopRequest``), MMLU at the start and after each save (on the training ranks,
``eval.mmlu.runner=engine``, or by the background process), the trackers; then the end of the run (``loss.png``,
the MMLU table, exit status 128 + signal after a stop). Collective: every rank calls :func:`run`."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import distributed as dist
from pipeline.config import to_dict
from pipeline.eval import scorer
from pipeline.observe import trackers
from pipeline.rundir import LORA_INIT
from pipeline.train import checkpoint, resume

if TYPE_CHECKING:
    from pipeline.data.prepared import Prepared
    from pipeline.distributed.watchdog import PeerWatch
    from pipeline.observe.metrics import Reporter
    from pipeline.train.build import Built
    from pipeline.train.start import Request, Runtime, Start


@dataclass(frozen=True)
class Run:
    """Everything a start has settled before the run begins, from :mod:`pipeline.cli.train`'s phases."""

    req: Request  # the checked recipe, DeepSpeed JSON, output_dir
    rt: Runtime  # the precision and optimizer this machine resolved
    plan: Start  # fresh or resumed, and the config the run trains with
    built: Built  # the engine, the PEFT model, the schedule, the memory meter
    ds_config: dict  # the DeepSpeed config handed to deepspeed.initialize
    info: dist.DistInfo
    log: Reporter
    watch: PeerWatch
    data: Prepared  # the train and validation rows
    tokenizer: Any  # the run's tokenizer (its pad id for the batches; the engine scorer tokenises with it)


def run(r: Run) -> None:
    """Train ``r.built`` from ``r.plan`` to ``train.max_steps``, or until a signal stops it (then exit 128 +
    signal, a checkpoint saved)."""
    from pipeline.distributed.preempt import StopRequest
    from pipeline.eval.engine_scorer import ScoringStopped
    from pipeline.observe.metrics import Stopwatch
    from pipeline.train.loop import Progress, Rows, Wiring, loss_head, train

    req, rt, plan, built, ds_config, info, log, watch, data = (r.req, r.rt, r.plan, r.built, r.ds_config, r.info,
                                                                r.log, r.watch, r.data)
    cfg, output_dir, engine = plan.cfg, req.output_dir, built.engine
    checkpoint.start_run(output_dir, req.overwrite, info.rank, cfg, ds_config, plan.resume_step)
    if built.lora_init:  # a fresh PiSSA/OLoRA start, rank 0: before any checkpoint, whose adapter needs them
        from pipeline.model.lora import save_init

        save_init(built.model, built.lora_init, output_dir / LORA_INIT)
        built.lora_init.clear()
    dist.barrier()
    progress = Progress()
    if plan.kind == "resume":
        point = plan.point
        log.print(resume.restore(engine, point, output_dir, info.rank, info.world_size, built.lr_lambda,
                                 built.group_settings))
        progress = Progress(point.step, point.state["nonfinite_steps"], point.state["elapsed_s"])
        log.start_at(point.step)
    run_facts = checkpoint.run_facts(cfg, info.world_size, dist.zero_stage(ds_config), rt.precision,
                                     len(data.train), data.key)
    log.attach(trackers.Trackers(output_dir, cfg.logging, to_dict(cfg), log.print, active=info.rank == 0))
    on_engine = req.scoring and cfg.eval.mmlu.runner == "engine"
    mmlu_scorer = scorer.BackgroundScorer(output_dir, cfg.eval.mmlu, active=info.rank == 0 and req.scoring and
                                          not on_engine)
    mmlu_scorer.begin()  # the base model, as step 0
    loss_of = loss_head(engine, cfg, log)
    engine_scorer = None

    def save(p: Progress) -> None:
        clock = Stopwatch()
        checkpoint.save(engine, built.model, cfg, output_dir, p.step, info.rank, built.zero3, run_facts(p))
        log.print(f"saved checkpoint step-{p.step} in {clock.elapsed():.1f} s")
        if not stop.signum:
            mmlu_scorer.checkpoint_saved()
        if engine_scorer is not None:  # every rank: a signal seen by one rank stops all of them in there
            try:
                engine_scorer.after_save(p.step)
            except ScoringStopped:  # the loop sees the signal next; the checkpoint is saved, its score is not
                log.print(f"step-{p.step} is not scored (stopping); the next start scores it first")

    signum, before_training = 0, False
    try:
        with StopRequest(announce=info.rank == 0) as stop:
            if on_engine:
                engine_scorer = _engine_scorer(r, loss_of, stop)
                try:
                    engine_scorer.at_start(progress.step if plan.kind == "resume" else None)
                except ScoringStopped as e:
                    signum, before_training = e.signum, True
            if not signum:
                built.meter.reset()  # the training peak, apart from the loading peak
                signum = train(engine, cfg, info, Rows(data.train, data.val, r.tokenizer.pad_token_id),
                               Wiring(log, save, stop, built.meter), progress, loss_of)
    except BaseException:
        mmlu_scorer.stop()
        raise
    watch.leave()  # the others may end now; rank 0 may still score below
    from pipeline.eval.report import plot_losses

    if signum:  # say so first: the launcher may forward the signal again (then the exit is at once, as 128 + it)
        mmlu_scorer.stop()
        saved = f"after step {progress.step}, checkpoint saved" if not before_training else \
            f"while scoring MMLU at step {progress.step}, before training on: nothing new to save"
        log.print(f"stopped by {signal.Signals(signum).name} {saved}; run the same command again to resume")
        log.close()
        if info.rank == 0:
            plot_losses(output_dir)
        sys.exit(128 + signum)
    if info.rank == 0:
        plot_losses(output_dir)
    log.print(f"done: {cfg.train.max_steps} steps, {log.loss_summary()}; metrics in {output_dir / 'metrics.jsonl'} "
              f"(plot: loss.png), checkpoints in {output_dir / 'checkpoints'}")
    if mmlu_scorer.active:
        log.print("scoring the checkpoints on MMLU (eval.mmlu; eval.mmlu.every_checkpoint=false turns this off)...")
        log.print(mmlu_scorer.finish() or "")
    elif engine_scorer is not None:
        log.print(engine_scorer.table() or "")
    log.close()


def _engine_scorer(r: Run, loss_of, stop):
    """The MMLU scorer on the training ranks (``eval.mmlu.runner=engine``): lm-eval's model served by the live
    engine through the loss head's log-probabilities, batches from the training batch, stops seen at every batch."""
    from pathlib import Path

    from pipeline.eval import score
    from pipeline.eval.engine_lm import Batching, EngineLM
    from pipeline.eval.engine_scorer import EngineScorer
    from pipeline.model.lora import mutates_base

    cfg = r.plan.cfg
    mmlu, base = cfg.eval.mmlu, r.built.model.get_base_model()
    rows = int(mmlu.batch_size) if mmlu.batch_size.isdigit() else 64
    # auto: no more tokens a forward than a training micro-batch holds (one row at least): measured on SmolLM2 (CPU,
    # fp32, 5-shot), four times that raised a rank's peak by 1.4-1.7 GiB over training's (attention's scores grow
    # with the square of a row's length; bench/README.md, "MMLU on the training engine").
    tokens = 2 ** 62 if mmlu.batch_size.isdigit() else cfg.train.micro_batch_size * cfg.train.seq_len
    lm = EngineLM(r.tokenizer, base.config, loss_of.token_logprobs, r.info, Batching(rows, tokens),
                  lambda: dist.max_over_ranks(stop.signum))
    return EngineScorer(r.req.output_dir, score.configured_setting(mmlu), mmlu.log_samples, lm, r.built.engine,
                        r.built.model, Path(cfg.model.name_or_path), not mutates_base(cfg.lora), r.info, r.log)
