#!/usr/bin/env python
"""Fine-tune a causal LM with LoRA+ on DeepSpeed ZeRO.

    deepspeed [--num_gpus N] launch/train.py [--config RECIPE.yaml] [--deepspeed_config JSON] [key.sub=value ...]
    python launch/train.py ...          (one process)

Without --config it runs the embedded default: a tiny Llama built offline, the bundled data, ZeRO-2.
An output_dir that already holds the run is resumed from its newest complete checkpoint; --overwrite starts again.
SIGTERM/SIGINT save a checkpoint and exit with status 128 + signal (see pipeline/preempt.py).
"""

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline import distributed as dist  # noqa: E402  (light until init() is called)
from pipeline import checkpoint, loraplus, preempt, resume, scorer, tiny, trackers, watchdog  # noqa: E402
from pipeline.config import make_config, resolve_file, to_dict  # noqa: E402
from pipeline.errors import UserError, exit_on_user_error  # noqa: E402
from pipeline.metrics import quiet_library_warnings  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (default: the embedded tiny default)")
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON; overrides the recipe's deepspeed_config")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run in output_dir and start again (default: resume it)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    return p.parse_intermixed_args(argv)  # overrides may come before and after the flags


@exit_on_user_error
def main(argv=None) -> None:
    # 1. What a user can get wrong in the recipe, JSON, paths and output_dir is checked before DeepSpeed is
    #    imported or a process group exists.
    preempt.exit_at_once()  # a signal before the first step: exit 128 + signal (the loop saves from then on)
    args = parse_args(argv)
    cfg = make_config(args.config, args.overrides, args.deepspeed_config)
    ds_path = resolve_file(cfg.deepspeed_config, "DeepSpeed config", "deepspeed_config")
    ds_json = dist.read_ds_json(ds_path)
    scoring = scorer.enabled(cfg.eval.mmlu, model_is_builtin=cfg.model.name_or_path == tiny.BUILTIN_MODEL)
    if cfg.model.random_init and scoring:
        if cfg.eval.mmlu.every_checkpoint == "true":
            raise UserError("eval.mmlu.every_checkpoint=true cannot score model.random_init runs: their adapters "
                            "have no base model on disk to load with")
        scoring = False
    trackers.check_installed(cfg.logging)
    model_path, data_path = tiny.resolve_builtin(cfg.model.name_or_path, cfg.data.path)
    from pipeline.model import check_model_dir, check_shape, has_tokenizer

    if not cfg.model.random_init:
        check_shape(check_model_dir(model_path), cfg.model.shape, model_path)
    elif not has_tokenizer(model_path):  # random weights: any tokenizer whose ids fit the vocabulary will do
        model_path = str(tiny.ensure_tiny_model())
    output_dir = checkpoint.check_output_dir(cfg.output_dir, args.overwrite)
    val_path = cfg.data.val_path and str(Path(cfg.data.val_path).resolve())
    cfg = dataclasses.replace(cfg, deepspeed_config=str(ds_path), output_dir=str(output_dir),
                              model=dataclasses.replace(cfg.model, name_or_path=str(Path(model_path).resolve())),
                              data=dataclasses.replace(cfg.data, path=str(Path(data_path).resolve()),
                                                       val_path=val_path))
    if scoring:  # bad MMLU data is found now, not in mmlu.log after the first checkpoint
        from pipeline import mmlu

        mmlu.resolve(cfg.eval.mmlu.data, cfg.eval.mmlu.num_fewshot, tiny.cache_dir())
    continuing = checkpoint.holds_run(output_dir) and not args.overwrite
    peer_timeout = watchdog.timeout_from_env()
    if continuing:
        resume.check_same_experiment(output_dir, cfg)

    # 2. Tokenizer and data, before any process group exists: a cache build (once, by whichever process takes
    #    its lock; the others wait) can take as long as it needs with no collective pending.
    on_gpu = dist.select_accelerator()
    kind = loraplus.pick_optimizer(cfg.optim.optimizer, dist.offloads_optimizer(ds_json), on_gpu)
    precision, precision_note = dist.resolve_precision(ds_json, cfg.train.precision, on_gpu, ds_path)
    if cfg.model.attn_implementation == "flash_attention_2" and precision == "fp32":
        raise UserError(f"model.attn_implementation=flash_attention_2 runs in bf16 or fp16 only, and this run trains "
                        f"in fp32 ({ds_path}, train.precision={cfg.train.precision}); set train.precision=bf16 or "
                        f"model.attn_implementation=sdpa")
    scorer.check_device(cfg.eval.mmlu.device, on_gpu, active=scoring)
    quiet_library_warnings()
    import torch

    from pipeline import schedule
    from pipeline.loop import Progress, train
    from pipeline.lora import add_lora
    from pipeline.memory import MemoryMeter
    from pipeline.metrics import Reporter, Stopwatch, describe_load, describe_model
    from pipeline.model import load_model, load_tokenizer
    from pipeline.prepared import prepare
    from pipeline.preempt import StopRequest

    rank0 = dist.env_rank() == 0
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    if cfg.model.random_init and len(tokenizer) > cfg.model.shape.vocab_size:
        raise UserError(f"the tokenizer of {cfg.model.name_or_path} has {len(tokenizer):,} tokens, more than "
                        f"model.shape.vocab_size={cfg.model.shape.vocab_size:,}; use a matching tokenizer")
    data = prepare(cfg.data, tokenizer, cfg.model.name_or_path, cfg.train.seq_len, log=print, announce=rank0)

    # 3. Distributed set-up; output_dir is only probed.
    dist.set_single_process_defaults()
    info = dist.init()
    watch = watchdog.PeerWatch.from_env(info.rank, info.world_size, peer_timeout).start()  # a dead rank ends all
    log = Reporter(info.rank, output_dir / "metrics.jsonl", cfg.train.max_steps)
    checkpoint.probe_output_dir(output_dir, info.rank)  # fail now, not after loading a 70B model
    point = None
    if continuing:  # rank 0 verifies the checkpoints (hashes every file) and tells the others
        point = dist.on_rank0(lambda: checkpoint.find_resume_point(output_dir), info.rank)
        for note in point.notes:
            log.print(note)
        if point.step >= cfg.train.max_steps:
            log.print(f"nothing to do: {output_dir} is at step {point.step} of train.max_steps={cfg.train.max_steps}; "
                      f"raise train.max_steps to train further")
            watch.leave()
            return
        if point.directory is None:
            log.print(f"{output_dir} holds a run without a complete checkpoint: starting it from step 0")
        else:
            cfg, note = resume.fit_global_batch(cfg, point.state, info.world_size, point.directory.name)
            if note:
                log.print(note)
    ds_config = dist.assemble_ds_config(ds_json, cfg, info.world_size, precision)
    if resume.universal_needed(point, info.world_size):
        ds_config["checkpoint"] = {"load_universal": True}  # another world size: see resume.restore
    if precision_note:
        log.print(precision_note)
    if cfg.model.random_init:
        log.print(f"model: random weights of model.shape ({cfg.model.shape.num_hidden_layers} layers, width "
                  f"{cfg.model.shape.hidden_size}; model.random_init=true), tokenizer of {cfg.model.name_or_path}")
    samples, data_id = data.train, data.key
    if point and point.directory:
        resume.check_compatible(point.state, dist.zero_stage(ds_config), precision, data_id, len(samples),
                                point.directory.name)

    # 4. Model, LoRA, LoRA+ groups, optimizer, engine.
    meter = MemoryMeter(info.device)  # from here on, memory is the model's and the training's
    zero3_hook = dist.zero3_load_hook(ds_config)  # noqa: F841  (alive = ZeRO-3 partitions weights at load)
    torch.manual_seed(cfg.seed)  # model.random_init: the same weights on every rank
    model = load_model(cfg.model.name_or_path, getattr(torch, dist.TORCH_DTYPES[precision]),
                       cfg.model.attn_implementation, cfg.model.gradient_checkpointing, cfg.model.trust_remote_code,
                       random_shape=cfg.model.shape if cfg.model.random_init else None,
                       init_device=info.device if info.on_gpu and dist.zero_stage(ds_config) < 3 else None)
    for line in describe_load(model, meter.peak(), dist.local_numel, dist.gather_objects):
        log.print(line)
    model = add_lora(model, cfg.lora, cfg.seed)
    torch.manual_seed(cfg.seed + info.rank)  # init above is identical on all ranks; dropout below is not
    rates = loraplus.LoraPlusRates(cfg.optim.lr, cfg.optim.loraplus_ratio, cfg.optim.loraplus_lr_embedding,
                                   cfg.optim.weight_decay)
    groups = loraplus.param_groups(model.named_parameters(), rates)
    optimizer = dist.build_optimizer(groups, kind, cfg.optim.betas, cfg.optim.eps)
    lr_lambda = schedule.lr_lambda(cfg.schedule.name, cfg.schedule.warmup_steps, cfg.train.max_steps,
                                   cfg.schedule.min_lr_ratio)
    zero3 = dist.zero_stage(ds_config) == 3
    offload = dist.optimizer_offload_device(ds_config)
    for line in describe_model(model, groups, info, dist.zero_stage(ds_config), offload, precision, kind,
                               dist.local_numel):
        log.print(line)  # before initialize: ZeRO-1/2 replace each group's params with one flat tensor
    engine, group_settings = dist.initialize(model, optimizer, lr_lambda, ds_config)

    # 5. Only now, with every input accepted, does output_dir receive (or continue) a run; then train,
    #    checkpointing every train.save_every steps, at the end, and when a signal stops the run.
    checkpoint.start_run(output_dir, args.overwrite, info.rank, cfg, ds_config, point.step if point else None)
    progress = Progress()
    if point and point.directory:
        log.print(resume.restore(engine, point, output_dir, info.rank, info.world_size, lr_lambda, group_settings))
        progress = Progress(point.step, point.state["nonfinite_steps"], point.state["elapsed_s"])
        log.start_at(point.step)
    run_facts = checkpoint.run_facts(cfg, info.world_size, dist.zero_stage(ds_config), precision, len(samples),
                                     data_id)

    log.attach(trackers.Trackers(output_dir, cfg.logging, to_dict(cfg), log.print, active=info.rank == 0))
    mmlu_scorer = scorer.BackgroundScorer(output_dir, cfg.eval.mmlu, active=info.rank == 0 and scoring)
    mmlu_scorer.begin()  # the base model, as step 0

    def save(p: Progress) -> None:
        clock = Stopwatch()
        checkpoint.save(engine, model, cfg, output_dir, p.step, info.rank, zero3, run_facts(p))
        log.print(f"saved checkpoint step-{p.step} in {clock.elapsed():.1f} s")
        if not stop.signum:
            mmlu_scorer.checkpoint_saved()

    try:
        with StopRequest(announce=info.rank == 0) as stop:
            meter.reset()  # the training peak, apart from the loading peak
            signum = train(engine, samples, cfg, info, log, tokenizer.pad_token_id, save, progress, stop, meter,
                           data.val)
    except BaseException:
        mmlu_scorer.stop()
        raise
    watch.leave()  # the others may end now; rank 0 may still score below
    if info.rank == 0:
        from pipeline.mmlu_report import plot_losses

        plot_losses(output_dir)
    if signum:
        mmlu_scorer.stop()
        log.print(f"stopped by {signal.Signals(signum).name} after step {progress.step}, checkpoint saved; run the "
                  f"same command again to resume")
        log.close()
        sys.exit(128 + signum)
    log.print(f"done: {cfg.train.max_steps} steps, {log.loss_summary()}; metrics in {output_dir / 'metrics.jsonl'} "
              f"(plot: loss.png), checkpoints in {output_dir / 'checkpoints'}")
    if mmlu_scorer.active:
        log.print("scoring the checkpoints on MMLU (eval.mmlu; eval.mmlu.every_checkpoint=false turns this off)...")
        log.print(mmlu_scorer.finish() or "")
    log.close()


if __name__ == "__main__":
    main()
