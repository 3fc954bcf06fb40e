"""The memory plan: what each GPU needs for a recipe, before a job waits in a queue.

Nothing is allocated: the model of the recipe's shape is built on PyTorch's ``meta`` device with the recipe's
LoRA adapters, which gives exact parameter counts per LoRA+ group. Activations are counted, not guessed: one
forward pass and the loss of ``launch/train.py`` run on ``meta`` tensors of the recipe's micro-batch and
sequence length, and every tensor autograd saves for the backward pass is added up (views of one tensor once).
Attention is counted as a fused kernel keeps it (output and log-sum-exp, no seq x seq matrix), as
``sdpa``/``flash_attention_2`` run on a GPU.

Per rank, with N ranks, ZeRO stage S, b bytes per compute element (bf16: 2; CPU: fp32, 4):

- frozen base weights: P_frozen * b, divided by N under ZeRO-3;
- LoRA weights: P_lora * b (/N under ZeRO-3), plus fp32 master copies (4 bytes, /N from ZeRO-1) in bf16;
- gradients: fp32 partitions (/N) from ZeRO-2; else whole in the compute dtype, plus fp32 ones in bf16 (/N at
  ZeRO-1);
- Adam: two fp32 moments per parameter of each LoRA+ group, /N from ZeRO-1 (with optimizer offload these, the
  fp32 masters and fp32 gradients are host memory, listed apart);
- ZeRO buffers, from the DeepSpeed JSON: ZeRO-1/2 reduce buckets (two with ``overlap_comm``); ZeRO-3 one reduce
  bucket, the parameters gathered whole for compute (up to ``stage3_max_live_parameters`` plus a prefetch
  bucket; with the shipped 1e9, every parameter of a model below 1B) and one bucket of all-gather staging;
- activations as counted, with gradient checkpointing: each block's input, one block recomputed, and the rest;
- while one block runs backward, gradients as large as its saved activations;
- the backward's first gradients, which meet the saved activations at the peak: one loss chunk's logits gradient
  (``train.loss_chunk``; ``pipeline/train/loss.py``), or, with the full-logits loss, those of the fp32 logits and of the
  slice they were cut from (the training loop frees the logits themselves once the loss is computed).

On a GPU a buffer counts in full when allocated. On CPU only written pages are resident, so a buffer counts up to
what fills it (``device="cpu"``), which is how ``tests/test_plan.py`` checks the plan against measured runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.observe.memory import GiB

# DeepSpeed's defaults for the keys the plan reads (deepspeed/runtime/zero/config.py).
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "overlap_comm": False, "stage3_prefetch_bucket_size": 5e7,
               "stage3_max_live_parameters": 1e9, "stage3_param_persistence_threshold": 1e5}


@dataclass
class Item:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    """One rank's memory, item by item; ``host`` holds what offload puts in CPU memory instead."""

    items: list[Item] = field(default_factory=list)
    host: list[Item] = field(default_factory=list)
    budget: float = 0.0
    facts: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(i.bytes for i in self.items)

    def get(self, name: str) -> float:
        return sum(i.bytes for i in self.items if i.name == name)


# ----------------------------------------------------------------------------------------------------------
# The model on the meta device


def model_config(cfg: Config):
    """The recipe's architecture: ``model.shape`` if it declares one, else the model directory's config.json."""
    from pathlib import Path

    from transformers import AutoConfig

    from pipeline.model import tiny
    from pipeline.model.load import shape_config

    if not cfg.model.shape.missing():
        return shape_config(cfg.model.shape)
    path, _ = tiny.resolve_builtin(cfg.model.name_or_path, cfg.data.path)
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"cannot size the model: the recipe declares no complete model.shape (missing "
                        f"{', '.join(cfg.model.shape.missing())}) and {path} has no config.json")
    return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.model.trust_remote_code)


def meta_model(cfg: Config, dtype: torch.dtype):
    """The recipe's model with its LoRA adapters, every tensor on ``meta`` (no memory)."""
    from transformers import AutoModelForCausalLM

    from pipeline.model.lora import add_lora

    config = model_config(cfg)
    with torch.device("meta"):
        # sdpa whatever the recipe says: attention is counted as a fused kernel (_FusedAttention) either way,
        # and flash-attn cannot run on meta tensors.
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    model.config.use_cache = False
    with torch.device("meta"):  # PiSSA/OLoRA factors have the default's shapes, and meta tensors have no SVD
        return add_lora(model, dataclasses.replace(cfg.lora, init_lora_weights="default"), cfg.seed)


class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel while counting: saves q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the count needs the forward pass only
        raise NotImplementedError


@contextlib.contextmanager
def _fused_attention():
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        return _FusedAttention.apply(q, k, v)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@dataclass
class Activations:
    saved: float  # everything saved for backward, no checkpointing
    per_block: float  # saved by one decoder block
    blocks: int
    block_input: float  # one block's input (what checkpointing keeps per block)
    logits_grad: float  # the first gradients of the backward pass

    def total(self, checkpointing: bool) -> float:
        if not checkpointing:
            return self.saved
        rest = self.saved - self.blocks * self.per_block
        return self.blocks * self.block_input + self.per_block + rest


def count_activations(model, micro_batch: int, seq_len: int, loss_chunk: int = 0) -> Activations:
    """Bytes autograd saves in one forward pass and loss (as in ``pipeline.loop``) of a full micro-batch.

    ``loss_chunk`` > 0: the loss of ``pipeline.loss`` (the model's logits for the last position only; the loss
    saves the labelled positions' hidden states, every position counted as labelled, and 17 bytes per row), and
    the backward's largest block is one chunk's logits gradient, fp32 plus its bf16 copy. 0: the full logits."""
    import torch.nn.functional as F

    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}
    by_block: dict[int, dict[int, int]] = {}
    current: list[int] = [-1]

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) in params or isinstance(base, torch.nn.Parameter):
            return t
        size = base.numel() * base.element_size()
        saved[id(base)] = size
        by_block.setdefault(current[0], {})[id(base)] = size
        return t

    blocks = _decoder_blocks(model)
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, -1)))
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    labels = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            # A ready-made 4-D mask (free on meta) keeps transformers from inspecting values meta tensors lack.
            mask = torch.zeros(micro_batch, 1, seq_len, seq_len, dtype=next(model.parameters()).dtype, device="meta")
            if loss_chunk:
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
                F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")
    finally:
        for h in hooks:
            h.remove()
    per_block = max((sum(v.values()) for k, v in by_block.items() if k >= 0), default=0)
    hidden = model.config.hidden_size
    dtype_bytes = next(model.parameters()).element_size()
    vocab = model.config.vocab_size
    rows = micro_batch * seq_len
    total = float(sum(saved.values()))
    if loss_chunk:
        total += rows * (hidden * dtype_bytes + 17)  # selected hidden states; max, sum (fp32), target, mask
        first_grads = min(loss_chunk, rows) * vocab * (4 + (2 if dtype_bytes == 2 else 0))
    else:
        first_grads = micro_batch * (seq_len - 1) * vocab * 8
    return Activations(saved=total, per_block=float(per_block), blocks=len(blocks),
                       block_input=float(rows * hidden * dtype_bytes), logits_grad=float(first_grads))


def _decoder_blocks(model) -> list[torch.nn.Module]:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise UserError("cannot find the decoder blocks of this model (no 'layers' list); the plan needs a "
                    "Llama-style architecture")


# ----------------------------------------------------------------------------------------------------------
# The plan


def make_plan(cfg: Config, ds_json: dict, gpus: int, gpu_mem_gb: float = 80.0, device: str = "gpu") -> Plan:
    """One rank's memory for ``cfg`` on ``gpus`` ranks (``device='cpu'``: the CPU layout the tests measure)."""
    from pipeline import distributed as dist
    from pipeline.optim.loraplus import LoraPlusRates, numel, param_groups

    if gpus < 1:
        raise UserError(f"--gpus must be >= 1; got {gpus}")
    on_gpu = device == "gpu"
    precision, _ = dist.resolve_precision(ds_json, cfg.train.precision, on_gpu, cfg.deepspeed_config)
    b = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    dtype = {2: torch.bfloat16, 4: torch.float32}[b]
    stage = dist.zero_stage(ds_json)
    zero = {**DS_DEFAULTS, **ds_json.get("zero_optimization", {})}
    offload = dist.offloads_optimizer(ds_json)
    n = gpus
    shard = n if stage >= 1 else 1

    model = meta_model(cfg, dtype)
    params = list(model.parameters())
    frozen = sum(numel(p) for p in params if not p.requires_grad)
    rates = LoraPlusRates(cfg.optim.lr, cfg.optim.loraplus_ratio, cfg.optim.loraplus_lr_embedding,
                          cfg.optim.weight_decay, cfg.optim.dora_magnitude_ratio)
    groups = {g["name"]: sum(numel(p) for p in g["params"]) for g in param_groups(model.named_parameters(), rates)}
    lora = sum(groups.values())
    total_params = frozen + lora

    def touched(buffer_elems: float, fill_elems: float) -> float:
        """A preallocated buffer: whole on a GPU; on CPU only the pages written (up to what fills it)."""
        return buffer_elems if on_gpu else min(buffer_elems, fill_elems)

    plan = Plan(budget=gpu_mem_gb * GiB)
    add = plan.items.append
    add(Item("frozen base weights", frozen * b / (n if stage == 3 else 1),
             f"{frozen / 1e9:.2f}B params, {precision}" + (f", 1/{n} each (ZeRO-3)" if stage == 3 else ", whole")))
    add(Item("LoRA weights", lora * b / (n if stage == 3 else 1), f"{lora / 1e6:.1f}M params"))
    optimizer_side = []  # what optimizer offload moves to the host: fp32 masters and gradients, Adam states
    if b < 4:
        optimizer_side.append(Item("fp32 master weights", 4 * lora / shard, f"1/{shard}" if shard > 1 else "whole"))
    if stage >= 2:
        optimizer_side.append(Item("gradients", 4 * lora / n, "fp32 partition"))
    else:  # whole gradients in the compute dtype; in bf16 also fp32 ones, partitioned from ZeRO-1
        add(Item("gradients", lora * b, "whole"))
        if b < 4:
            optimizer_side.append(Item("fp32 gradients", 4 * lora / shard, f"1/{shard}" if shard > 1 else "whole"))
    optimizer_side += [Item(f"Adam states ({name})", 8 * count / shard, f"{count / 1e6:.1f}M params x 2 moments "
                            f"fp32") for name, count in groups.items()]
    (plan.host if offload else plan.items).extend(optimizer_side)

    bucket = float(zero["reduce_bucket_size"])
    if stage in (1, 2):
        copies = 2 if zero["overlap_comm"] else 1
        add(Item("ZeRO reduce buckets", copies * touched(bucket, lora) * b, f"{copies} x {bucket:.0e} elements"))
    elif stage == 3:
        add(Item("ZeRO reduce bucket", touched(bucket, lora) * b, f"{bucket:.0e} elements"))
        prefetch = min(float(zero["stage3_prefetch_bucket_size"]), total_params)
        # The cap on live parameters is checked before a fetch, so a prefetch bucket can go past it.
        live = min(float(zero["stage3_max_live_parameters"]) + prefetch, total_params)
        add(Item("ZeRO-3 gathered weights", live * b,
                 f"up to {live / 1e6:,.0f}M params whole at once (stage3_max_live_parameters + a prefetch bucket)"))
        add(Item("ZeRO-3 all-gather staging", prefetch * b, f"one prefetch bucket, {prefetch:.0e} elements"))

    mb, seq = cfg.train.micro_batch_size, cfg.train.seq_len
    acts = count_activations(model, mb, seq, cfg.train.loss_chunk)
    add(Item("activations", acts.total(cfg.model.gradient_checkpointing),
             f"micro-batch {mb} x {seq} tokens, gradient checkpointing "
             f"{'on' if cfg.model.gradient_checkpointing else 'off'}"))
    add(Item("backward of one block", acts.per_block, "gradients of one block's activations, while it runs"))
    chunk = cfg.train.loss_chunk
    add(Item("logits gradients", acts.logits_grad,
             f"one loss chunk: {min(chunk, mb * seq)} x {model.config.vocab_size} (train.loss_chunk)" if chunk else
             f"{mb} x {seq} x {model.config.vocab_size} x 2 fp32 (train.loss_chunk=0)"))
    plan.facts = {"precision": precision, "stage": stage, "gpus": n, "offload": offload, "frozen": frozen,
                  "lora": lora, "groups": groups, "activations_with_gc": acts.total(True),
                  "activations_without_gc": acts.total(False), "micro_batch": mb, "seq_len": seq,
                  "checkpointing": cfg.model.gradient_checkpointing, "device": device}
    return plan


# What is outside the plan on a GPU: the CUDA context and NCCL buffers (about 1-2 GiB), and the allocator's
# fragmentation. The verdict keeps this much of the GPU free.
HEADROOM = 0.10


def verdict(plan: Plan) -> str:
    """``fits`` with the margin, or what to change."""
    total, budget = plan.total, plan.budget * (1 - HEADROOM)
    f = plan.facts
    if total <= budget:
        return (f"fits: {total / GiB:.1f} GiB of {plan.budget / GiB:.0f} GiB per GPU "
                f"({(budget - total) / GiB:.1f} GiB to spare after {HEADROOM:.0%} headroom for the CUDA context, "
                f"NCCL and fragmentation)")
    advice = []
    acts = plan.get("activations")
    if not f["checkpointing"] and f["activations_with_gc"] < acts:
        advice.append(f"model.gradient_checkpointing=true (activations {acts / GiB:.1f} -> "
                      f"{f['activations_with_gc'] / GiB:.1f} GiB)")
    if f["micro_batch"] > 1:
        advice.append(f"train.micro_batch_size={f['micro_batch'] // 2} with train.grad_accum doubled (same "
                      f"global batch)")
    if f["stage"] < 3:
        advice.append("deepspeed_configs/zero3.json (partitions the frozen weights over the GPUs)")
    else:
        weights = plan.get("frozen base weights")
        room = budget - (total - weights)  # what is left for the weights' share after everything else
        if room <= 0:
            advice.append("less memory per GPU outside the weights (activations and buffers alone overflow it; "
                          "more GPUs do not help)")
        elif f["gpus"] * weights / room > f["gpus"]:
            advice.append(f"more GPUs: about {math.ceil(f['gpus'] * weights / room)} under ZeRO-3 for the frozen "
                          f"weights' share to fit")
    if not f["offload"] and f["stage"] >= 1:
        adam = sum(i.bytes for i in plan.items if i.name.startswith("Adam"))
        if adam > 0.05 * total:
            advice.append("deepspeed_configs/zero3_offload.json (Adam states to the host)")
    return (f"does not fit: {total / GiB:.1f} GiB needed, {budget / GiB:.1f} GiB usable of {plan.budget / GiB:.0f} "
            f"GiB; try " + "; or ".join(advice or ["a GPU with more memory"]))


def render(plan: Plan, title: str) -> str:
    lines = [title, f"{'item':<28} {'GiB':>9}  note", "-" * 78]
    for item in plan.items:
        lines.append(f"{item.name:<28} {item.bytes / GiB:>9.3f}  {item.note}")
    lines.append("-" * 78)
    lines.append(f"{'total per GPU':<28} {plan.total / GiB:>9.3f}")
    for item in plan.host:
        lines.append(f"{'host: ' + item.name:<28} {item.bytes / GiB:>9.3f}  {item.note} (offloaded)")
    f = plan.facts
    lines.append(f"activations: {f['activations_without_gc'] / GiB:.2f} GiB without gradient checkpointing, "
                 f"{f['activations_with_gc'] / GiB:.2f} GiB with")
    lines.append(verdict(plan))
    return "\n".join(lines)
