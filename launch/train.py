#!/usr/bin/env python
"""Fine-tune a causal LM with LoRA+ on DeepSpeed ZeRO.

    deepspeed [--num_gpus N] launch/train.py [--config RECIPE.yaml] [--deepspeed_config JSON] [key.sub=value ...]
    python launch/train.py ...          (one process)

Without --config it runs the embedded default: a tiny Llama built offline, the bundled data, ZeRO-2.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline import distributed as dist  # noqa: E402  (light until init() is called)
from pipeline import loraplus, tiny  # noqa: E402
from pipeline.checkpoint import check_output_dir  # noqa: E402
from pipeline.config import make_config, resolve_file  # noqa: E402
from pipeline.errors import exit_on_user_error  # noqa: E402
from pipeline.metrics import quiet_library_warnings  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (default: the embedded tiny default)")
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON; overrides the recipe's deepspeed_config")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in output_dir and start again")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    return p.parse_intermixed_args(argv)  # overrides may come before and after the flags


@exit_on_user_error
def main(argv=None) -> None:
    # 1. What a user can get wrong in the recipe, JSON, paths and output_dir is checked before DeepSpeed is
    #    imported or a process group exists.
    args = parse_args(argv)
    cfg = make_config(args.config, args.overrides, args.deepspeed_config)
    ds_path = resolve_file(cfg.deepspeed_config, "DeepSpeed config", "deepspeed_config")
    ds_json = dist.read_ds_json(ds_path)
    model_path, data_path = tiny.resolve_builtin(cfg.model.name_or_path, cfg.data.path)
    from pipeline.model import check_model_dir

    check_model_dir(model_path)
    output_dir = check_output_dir(cfg.output_dir, args.overwrite)
    cfg = dataclasses.replace(cfg, deepspeed_config=str(ds_path), output_dir=str(output_dir),
                              model=dataclasses.replace(cfg.model, name_or_path=str(Path(model_path).resolve())),
                              data=dataclasses.replace(cfg.data, path=str(Path(data_path).resolve())))

    # 2. Distributed set-up and data. Data errors are found on every rank alike; output_dir is only probed.
    on_gpu = dist.select_accelerator()
    kind = loraplus.pick_optimizer(cfg.optim.optimizer, dist.offloads_optimizer(ds_json), on_gpu)
    quiet_library_warnings()
    import torch

    from pipeline import checkpoint, schedule
    from pipeline.data import load_samples
    from pipeline.loop import train
    from pipeline.lora import add_lora
    from pipeline.metrics import Reporter, describe_model
    from pipeline.model import load_model, load_tokenizer

    dist.set_single_process_defaults()
    info = dist.init()
    log = Reporter(info.rank, output_dir / "metrics.jsonl", cfg.train.max_steps)
    checkpoint.probe_output_dir(output_dir, info.rank)  # fail now, not after loading a 70B model
    ds_config = dist.assemble_ds_config(ds_json, cfg, info.world_size, info.on_gpu)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    samples, data_report = load_samples(cfg.data, tokenizer, cfg.train.seq_len, show_progress=info.rank == 0)
    log.print(f"data: {data_report}")

    # 3. Model, LoRA, LoRA+ groups, optimizer, engine.
    zero3_hook = dist.zero3_load_hook(ds_config)  # noqa: F841  (alive = ZeRO-3 partitions weights at load)
    precision = dist.precision(ds_config, info.on_gpu)
    model = load_model(cfg.model.name_or_path, getattr(torch, dist.TORCH_DTYPES[precision]),
                       cfg.model.attn_implementation, cfg.model.gradient_checkpointing, cfg.model.trust_remote_code)
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
    engine, _ = dist.initialize(model, optimizer, lr_lambda, ds_config)

    # 4. Only now, with every input accepted, does output_dir receive a run; then train, checkpointing every
    #    train.save_every steps and at the end.
    checkpoint.start_run(output_dir, args.overwrite, info.rank, cfg, ds_config)
    train(engine, samples, cfg, info, log, tokenizer.pad_token_id,
          save=lambda step: checkpoint.save(engine, model, cfg, output_dir, step, info.rank, zero3))
    log.print(f"done: {cfg.train.max_steps} steps, {log.loss_summary()}; metrics in {output_dir / 'metrics.jsonl'}, "
              f"checkpoints in {output_dir / 'checkpoints'}")
    log.close()


if __name__ == "__main__":
    main()
