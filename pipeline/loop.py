"""The training loop: one function, top to bottom."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline import distributed as dist
from pipeline.config import Config
from pipeline.data import IGNORE_INDEX, Sample, collate, rank_micro_batches
from pipeline.metrics import Reporter, Stopwatch


def train(engine, samples: list[Sample], cfg: Config, info: dist.DistInfo, reporter: Reporter, pad_id: int,
          save: Callable[[int], None], start_step: int = 0) -> None:
    """Run optimizer steps ``start_step .. cfg.train.max_steps - 1``.

    Loss normalisation: each step minimises (sum of token losses over the *global* batch) / (label tokens in
    the global batch), whatever the split into ranks and accumulation micro-batches. So ZeRO stages, world
    sizes and ``grad_accum`` settings with the same global batch give the same updates, and long and short
    samples weigh per token (not per micro-batch) as they would in one big batch.
    """
    mb, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    world, n = info.world_size, len(samples)
    clock = Stopwatch()
    engine.train()
    for step in range(start_step, cfg.train.max_steps):
        t0 = time.perf_counter()
        micro = rank_micro_batches(n, cfg.seed, step, mb, ga, info.rank, world)
        batches = [collate([samples[i] for i in idx], pad_id) for idx in micro]

        # One all-reduce for the step's normalisers: label tokens and non-padding tokens, all ranks.
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
                               sum(int(b["attention_mask"].sum()) for b in batches)], dtype=torch.float64,
                              device=info.device)
        label_tokens, tokens = (float(x) for x in dist.all_reduce_sum(counts))  # CPU-GPU sync point
        lrs = dist.current_lrs(engine)  # the lrs this step's update will use (the scheduler moves after it)

        loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
        own_norm = None
        for k, b in enumerate(batches):
            b = {key: v.to(info.device) for key, v in b.items()}
            logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
            # DeepSpeed averages gradients over ranks; multiplying by the world size turns that average into
            # the sum over ranks, and dividing by the global label count makes it a per-token mean.
            engine.backward(ce * (world / label_tokens), scale_wrt_gas=False)
            if k == ga - 1:
                own_norm = dist.grad_norm_if_untracked(engine)  # ZeRO-0 keeps no norm of its own
            engine.step()  # an optimizer step (and scheduler step) only at the accumulation boundary
            loss_sum += ce.detach().double()
        loss = float(dist.all_reduce_sum(loss_sum)) / label_tokens  # CPU-GPU sync point

        done = step + 1
        dt = time.perf_counter() - t0
        reporter.step({
            "step": done,
            "loss": loss,
            "lr_groups": lrs,
            "grad_norm": dist.grad_norm(engine, fallback=own_norm),
            "tokens": int(tokens),
            "label_tokens": int(label_tokens),
            "tokens_per_s": tokens / dt,
            "elapsed_s": round(clock.elapsed(), 4),
            "epoch": done * mb * ga * world / n,
        })
        if done == cfg.train.max_steps or (cfg.train.save_every and done % cfg.train.save_every == 0):
            save(done)
