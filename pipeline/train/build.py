"""The model a run trains: base weights (partitioned at load under ZeRO-3), LoRA, the LoRA+ groups, the optimizer
and the DeepSpeed engine, with the start-of-run summary. Collective: every rank calls :func:`build`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipeline import distributed as dist
from pipeline.config import Config
from pipeline.optim import loraplus


@dataclass
class Built:
    engine: Any  # the DeepSpeed engine
    model: Any  # the PEFT model it wraps
    lr_lambda: Callable[[int], float]  # the schedule's multiplier of every group's own lr
    group_settings: list[dict]  # each LoRA+ group's settings, as resume.restore puts them back
    meter: Any  # pipeline.observe.memory.MemoryMeter, from before the load
    zero3: bool
    ds_hook: Any  # keeps ZeRO-3's partitioned loading alive for the whole run (dist.zero3_load_hook)
    lora_init: dict  # a fresh PiSSA/OLoRA start: the initial factors (fp32, CPU) for lora.save_init; else empty


def build(cfg: Config, ds_config: dict, info, precision: str, optimizer: str, log, stored_init=None) -> Built:
    """Load the base model, add LoRA, group its parameters for LoRA+ and initialize DeepSpeed on them.

    ``stored_init``: on a resume of a PiSSA/OLoRA run, ``output_dir/lora_init`` (the factors it started from)."""
    import torch

    from pipeline.distributed import faults
    from pipeline.model.load import load_model
    from pipeline.model.lora import add_lora, mutates_base
    from pipeline.observe.memory import MemoryMeter
    from pipeline.observe.metrics import describe_load, describe_model
    from pipeline.optim import schedule

    meter = MemoryMeter(info.device)  # from here on, memory is the model's and the training's
    hook = dist.zero3_load_hook(ds_config)  # alive = ZeRO-3 partitions weights at load
    stage = dist.zero_stage(ds_config)
    torch.manual_seed(cfg.seed)  # model.random_init: the same weights on every rank
    model = load_model(cfg.model.name_or_path, getattr(torch, dist.TORCH_DTYPES[precision]),
                       cfg.model.attn_implementation, cfg.model.gradient_checkpointing, cfg.model.trust_remote_code,
                       random_shape=cfg.model.shape if cfg.model.random_init else None,
                       init_device=info.device if info.on_gpu and stage < 3 else None)
    for line in describe_load(model, meter.peak(), dist.local_numel, dist.gather_objects):
        log.print(line)
    factors: dict = {}
    model = add_lora(model, cfg.lora, cfg.seed, stored_init, factors)
    faults.skew_init(model, info.rank)
    torch.manual_seed(cfg.seed + info.rank)  # init above is identical on all ranks; dropout below is not
    rates = loraplus.LoraPlusRates(cfg.optim.lr, cfg.optim.loraplus_ratio, cfg.optim.loraplus_lr_embedding,
                                   cfg.optim.weight_decay, cfg.optim.dora_magnitude_ratio)
    groups = loraplus.param_groups(model.named_parameters(), rates)
    optim = dist.build_optimizer(groups, optimizer, cfg.optim.betas, cfg.optim.eps)
    lr_lambda = schedule.lr_lambda(cfg.schedule.name, cfg.schedule.warmup_steps, cfg.train.max_steps,
                                   cfg.schedule.min_lr_ratio)
    for line in describe_model(model, groups, info, stage, dist.optimizer_offload_device(ds_config), precision,
                               optimizer, dist.local_numel):
        log.print(line)  # before initialize: ZeRO-1/2 replace each group's params with one flat tensor
    engine, group_settings = dist.initialize(model, optim, lr_lambda, ds_config)
    whole = dist.kept_whole(model, ds_config)
    if whole:
        log.print(whole)
    if mutates_base(cfg.lora):
        log.print(_agree_on_factors(model, stage == 3, info.world_size, cfg.lora.init_lora_weights, stored_init))
    return Built(engine, model, lr_lambda, group_settings, meter, stage == 3, hook, factors if info.rank == 0 else {})


def _agree_on_factors(model, zero3: bool, world_size: int, init: str, stored_init) -> str:
    """Check that every rank trains from the same PiSSA/OLoRA factors (each rank factorised its own weights; rank
    0's reach the others through DeepSpeed's broadcast at ``initialize``). Collective.

    Raises:
        RunError: the ranks hold different factors (a bug: training on would average gradients of different models).
    """
    import hashlib

    from pipeline.errors import RunError

    factors = [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    digest = hashlib.sha256()
    with dist.gathered([p for _, p in factors], enabled=zero3):
        for name, p in factors:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    digests = dist.gather_objects(digest.hexdigest())
    if len(set(digests)) != 1:
        raise RunError(f"the ranks hold different lora.init_lora_weights={init} factors after deepspeed.initialize "
                       f"(sha256 per rank: {', '.join(d[:12] for d in digests)}); please report this")
    source = f"read from {stored_init}" if stored_init else "factorised"
    return (f"lora.init_lora_weights={init}: {len(factors) // 2} adapters {source}, the same on all {world_size} "
            f"rank(s) (sha256 {digests[0][:12]})")
