"""Run by ``tests/test_distributed.py::test_bf16_gradients_accumulate_exactly`` as one process (a world of one):
how exactly DeepSpeed accumulates LoRA gradients over 8 micro-batches in bf16, under the DeepSpeed configs
``launch/train.py`` would hand it.

For each case, the engine's accumulated gradient at the boundary (``deepspeed.utils.safe_get_full_grad``, before
the step) is compared with the reference: each micro-batch's gradient as the same stage computes it (an engine
stepping at every micro-batch with lr 0), summed in float64. (Plain autograd is no reference for ZeRO-3, whose
linear layers compute the bf16 weight gradient in another order: 8.6e-3 apart on one micro-batch.) Prints one
JSON line: case -> largest relative error over the LoRA tensors.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import distributed as dist  # noqa: E402

MICRO = 8


def main() -> None:
    dist.set_single_process_defaults()
    dist.select_accelerator()
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_grad

    from pipeline.config import PROJECT_ROOT, make_config
    from pipeline.model.load import load_model
    from pipeline.model.lora import add_lora
    from pipeline.model.tiny import ensure_tiny_model
    from pipeline.optim.loraplus import LoraPlusRates, param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = make_config(None, [f"train.grad_accum={MICRO}", "train.micro_batch_size=1"], None)
    base = add_lora(load_model(str(ensure_tiny_model()), torch.bfloat16, "sdpa", False, False), cfg.lora, 0)
    with torch.no_grad():  # B starts at zero; give it values so that A's gradients are not zero
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    batches = [torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(k)) for k in range(MICRO)]

    def loss_of(model, ids):
        logits = model(input_ids=ids).logits.float()
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum") / 400.0

    one = make_config(None, ["train.grad_accum=1", "train.micro_batch_size=1"], None)

    def engine_for(stage: str, recipe, change: dict, lr: float):
        ds = dist.assemble_ds_config(dist.read_ds_json(PROJECT_ROOT / "deepspeed_configs" / f"{stage}.json"), recipe,
                                     1, "bf16")
        ds.update(change)
        model = copy.deepcopy(base)
        groups = param_groups(model.named_parameters(), LoraPlusRates(lr, 16.0, lr, 0.0))
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups), config=ds)
        return engine

    def grads(engine) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                # BF16_Optimizer's fp32 buffer (its safe_get_full_grad rounds through the bf16 gradient)
                hp = getattr(p, "_hp_grad", None)
                out[name] = (hp if hp is not None else safe_get_full_grad(p)).double().flatten()
        return out

    cases = (("zero1", "zero1", {}), ("zero2", "zero2", {}), ("zero3", "zero3", {}),
             ("zero2-bf16-accum", "zero2", {"data_types": {"grad_accum_dtype": "bf16"}}),
             ("zero1-bf16-reduce", "zero1", {"communication_data_type": "bf16"}))
    errors = {}
    for case, stage, change in cases:
        # The reference: each micro-batch's gradient as this stage computes it (a boundary every micro-batch,
        # lr 0 so the weights stay), summed in float64.
        engine = engine_for(stage, one, change, 0.0)
        reference: dict[str, torch.Tensor] = {}
        for ids in batches:
            engine.backward(loss_of(engine, ids), scale_wrt_gas=False)
            for name, g in grads(engine).items():
                reference[name] = reference.get(name, 0) + g
            engine.step()
        engine.destroy()
        engine = engine_for(stage, cfg, change, 1e-3)
        for k, ids in enumerate(batches):
            engine.backward(loss_of(engine, ids), scale_wrt_gas=False)
            if k < MICRO - 1:
                engine.step()  # not a boundary: DeepSpeed only accumulates
        errors[case] = max(float((g - reference[name]).norm() / reference[name].norm())
                           for name, g in grads(engine).items())
        engine.destroy()
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
