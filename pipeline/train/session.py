"""The run around the loop: ``output_dir`` receives (or continues) the run, the resumed state is loaded, and the
loop trains with its wiring: a checkpoint every ``train.save_every`` steps, at the end and when a signal stops
the run (``preempt.StopRequest``), the background MMLU scorer after each save, the trackers; then the end of the
run (``loss.png``, the MMLU table, exit status 128 + signal after a stop). Collective: every rank calls
:func:`run`."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    pad_id: int


def run(r: Run) -> None:
    """Train ``r.built`` from ``r.plan`` to ``train.max_steps``, or until a signal stops it (then exit 128 +
    signal, a checkpoint saved)."""
    from pipeline.distributed.preempt import StopRequest
    from pipeline.observe.metrics import Stopwatch
    from pipeline.train.loop import Progress, Rows, Wiring, train

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
    mmlu_scorer = scorer.BackgroundScorer(output_dir, cfg.eval.mmlu, active=info.rank == 0 and req.scoring)
    mmlu_scorer.begin()  # the base model, as step 0

    def save(p: Progress) -> None:
        clock = Stopwatch()
        checkpoint.save(engine, built.model, cfg, output_dir, p.step, info.rank, built.zero3, run_facts(p))
        log.print(f"saved checkpoint step-{p.step} in {clock.elapsed():.1f} s")
        if not stop.signum:
            mmlu_scorer.checkpoint_saved()

    try:
        with StopRequest(announce=info.rank == 0) as stop:
            built.meter.reset()  # the training peak, apart from the loading peak
            signum = train(engine, cfg, info, Rows(data.train, data.val, r.pad_id), Wiring(log, save, stop, built.meter),
                           progress)
    except BaseException:
        mmlu_scorer.stop()
        raise
    watch.leave()  # the others may end now; rank 0 may still score below
    from pipeline.eval.report import plot_losses

    if signum:  # say so first: the launcher may forward the signal again (then the exit is at once, as 128 + it)
        mmlu_scorer.stop()
        log.print(f"stopped by {signal.Signals(signum).name} after step {progress.step}, checkpoint saved; run the "
                  f"same command again to resume")
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
    log.close()
