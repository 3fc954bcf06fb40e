#!/usr/bin/env python
"""The baseline users would otherwise run: the HF Trainer + DeepSpeed, with PEFT's ``create_loraplus_optimizer``.

    deepspeed --num_gpus N bench/hf_trainer_baseline.py [--config RECIPE] [--deepspeed_config JSON] [key=value ...]

It takes the same recipe, overrides and DeepSpeed JSON as ``launch/train.py`` and trains the same thing the
usual way: ``AutoModelForCausalLM`` + ``get_peft_model`` + ``transformers.Trainer`` with DeepSpeed, LoRA+ from
``peft.optimizers.create_loraplus_optimizer``. The Trainer refuses ``optimizers=`` under DeepSpeed, so the LoRA+
optimizer comes in through ``create_optimizer`` (the override PEFT's docs suggest), and the JSON must hold no
``optimizer`` block (the Trainer would then drop ours: the traps table in README.md).

What is shared with the pipeline, so that both runs do the same math and only the machinery differs:
the recipe parsing, the tokenised samples, the per-rank batches of each step (``rank_micro_batches``, fed to the
Trainer as ready batches: no collation or sampling cost on the baseline's side), the DeepSpeed JSON as the
pipeline assembles it, and the seed before ``get_peft_model`` (so the A matrices start equal). The loss is the
Trainer's own (transformers' causal-LM loss, averaged over the global batch's label tokens, as ours is).

Rank 0 writes ``OUTPUT_DIR/baseline_metrics.jsonl``: per step the loss, each param group's lr, the Unix time at
the step's end, the step's non-padding tokens and model FLOPs over all ranks (``pipeline/observe/flops.py``), and the
busiest rank's peak memory (GPU allocator; on CPU the bench measures the processes instead).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import distributed as dist  # noqa: E402
from pipeline.config import make_config, resolve_file  # noqa: E402
from pipeline.errors import exit_on_user_error  # noqa: E402
from pipeline.model import tiny  # noqa: E402

PEFT_GROUPS = ("lora_A", "lora_embedding", "lora_B", "lora_B_no_decay")  # create_loraplus_optimizer's order


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--deepspeed_config")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    cfg = make_config(args.config, args.overrides, args.deepspeed_config)
    ds_json = dist.read_ds_json(resolve_file(cfg.deepspeed_config, "DeepSpeed config", "deepspeed_config"))
    if "optimizer" in ds_json or "scheduler" in ds_json:
        raise SystemExit("hf_trainer_baseline: the DeepSpeed JSON must not hold an optimizer or scheduler block")
    if cfg.schedule.name != "constant" or cfg.schedule.warmup_steps:
        # HF's schedules differ from ours in shape: its warmup starts at lr 0 (ours at lr / warmup_steps), and
        # its cosine has no min_lr_ratio. Only a constant lr is the same on both sides.
        raise SystemExit(f"hf_trainer_baseline: schedule.name={cfg.schedule.name} schedule.warmup_steps="
                         f"{cfg.schedule.warmup_steps}: use schedule.name=constant schedule.warmup_steps=0, the "
                         f"one schedule both sides run alike")
    model_path, data_path = tiny.resolve_builtin(cfg.model.name_or_path, cfg.data.path)
    if cfg.model.random_init:
        model_path = str(tiny.ensure_tiny_model())  # the tokenizer only, as launch/train.py does
    on_gpu = dist.select_accelerator()
    import torch
    import torch.distributed as tdist
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from pipeline.data.formats import collate, rank_micro_batches
    from pipeline.data.prepared import prepare
    from pipeline.model.load import shape_config
    from pipeline.observe.flops import batch_flops, flop_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    precision, _ = dist.resolve_precision(ds_json, cfg.train.precision, on_gpu, cfg.deepspeed_config)
    ds_config = dist.assemble_ds_config(ds_json, cfg, world, precision)
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    samples = prepare(dataclasses.replace(cfg.data, path=data_path), tokenizer, model_path, cfg.train.seq_len).train

    out = Path(cfg.output_dir)
    training_args = TrainingArguments(
        output_dir=str(out), deepspeed=ds_config, per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum, max_steps=cfg.train.max_steps,
        learning_rate=cfg.optim.lr, lr_scheduler_type="constant",
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.max_grad_norm, bf16=bf16, use_cpu=not on_gpu, logging_steps=1,
        save_strategy="no", report_to=[], seed=cfg.seed, disable_tqdm=True, remove_unused_columns=False,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, ddp_backend=None if on_gpu else "gloo")

    # The model as a user loads it, after TrainingArguments, so that ZeRO-3 partitions it at load
    # (HfDeepSpeedConfig). zero.Init needs DeepSpeed's comm: on GPU accelerate starts it while TrainingArguments
    # sets up the device; with use_cpu accelerate starts only torch.distributed, so start it here.
    if not on_gpu:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(cfg.seed)
    if cfg.model.random_init:
        # Random weights are drawn where they will live (as launch/train.py does), not on the CPU first.
        where = training_args.device if on_gpu and dist.zero_stage(ds_config) < 3 else contextlib.nullcontext()
        with where:
            model = AutoModelForCausalLM.from_config(shape_config(cfg.model.shape), dtype=dtype,
                                                     attn_implementation=cfg.model.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True,
                                                     attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False
    torch.manual_seed(cfg.seed)  # as pipeline/model/lora.py: the adapters start from the same A matrices
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=list(cfg.lora.target_modules), bias="none",
                                             task_type="CAUSAL_LM"), autocast_adapter_dtype=False)

    # The same per-rank batches, step by step (what launch/train.py's loop feeds this rank), and each step's
    # non-padding tokens and model FLOPs over all ranks (pipeline/observe/flops.py's count, for tokens/s and MFU).
    mb, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    fm = flop_model(model)
    batches, step_tokens, step_flops = [], [], []
    for step in range(cfg.train.max_steps):
        tokens = flops = 0.0
        for r in range(world):
            for idx in rank_micro_batches(len(samples), cfg.seed, step, mb, ga, r, world):
                b = collate([samples[i] for i in idx], tokenizer.pad_token_id)
                tokens += float(b["attention_mask"].sum())
                flops += batch_flops(fm, b["attention_mask"], False, b.pop("doc_lengths", None))[0]
                if "position_ids" in b:  # packed rows: documents kept apart by their positions, as in our loop
                    del b["attention_mask"]
                if r == rank:
                    batches.append(b)
        step_tokens.append(int(tokens))
        step_flops.append(flops)

    class LoraPlusTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = create_loraplus_optimizer(
                    model=self.model, optimizer_cls=torch.optim.AdamW, lr=cfg.optim.lr,
                    loraplus_lr_ratio=cfg.optim.loraplus_ratio,
                    loraplus_lr_embedding=cfg.optim.loraplus_lr_embedding,
                    loraplus_weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
                # Name PEFT's groups (in its order), so their lrs can be told apart once DeepSpeed holds them.
                for name, g in zip(PEFT_GROUPS, self.optimizer.param_groups):
                    g["name"] = name
                    if g["params"]:
                        used.append(name)
            return self.optimizer

        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)

    rows: list[dict] = []
    used: list[str] = []  # PEFT's LoRA+ groups that got parameters
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            if on_gpu:
                torch.cuda.synchronize()
            # The lr of each group that holds parameters, as the optimizer DeepSpeed wraps has it now (ZeRO-1/2
            # drop empty groups; ZeRO-3 empties each group's params between steps, so go by name).
            while hasattr(optimizer, "optimizer"):
                optimizer = optimizer.optimizer
            lrs = {g.get("name"): g["lr"] for g in optimizer.param_groups}
            k = state.global_step
            rows.append({"step": k, "time": round(time.time(), 4), "lrs": [lrs.get(n) for n in used],
                         "tokens": step_tokens[k - 1], "model_flops": step_flops[k - 1]})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and rows and rows[-1]["step"] == state.global_step:
                rows[-1]["loss"] = logs["loss"]

        def on_train_end(self, args, state, control, **kw):
            peak = torch.tensor([torch.cuda.max_memory_allocated() if on_gpu else 0], device=device)
            if tdist.is_initialized():
                tdist.all_reduce(peak, op=tdist.ReduceOp.MAX)
            for r in rows:
                r["mem_peak_gb"] = round(float(peak) / 2 ** 30, 3) if on_gpu else None

    trainer = LoraPlusTrainer(model=model, args=training_args, train_dataset=batches, callbacks=[Record()])
    trainer.train()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "baseline_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
