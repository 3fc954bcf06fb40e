"""LoRA+ parameter groups, chosen by name (pipeline.loraplus), checked on real PEFT models and simulated ZeRO-3."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import ConfigError
from pipeline.optim.loraplus import (
    GROUP_ORDER,
    LoraPlusRates,
    classify,
    describe,
    numel,
    param_groups,
    pick_optimizer,
)

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, RATIO, LR_EMB, WD = 2e-4, 16.0, 1e-6, 0.01
RATES = LoraPlusRates(lr=LR, ratio=RATIO, lr_embedding=LR_EMB, weight_decay=WD)


def tiny_lora(extra_targets=(), biases=False, seed=0, **lora_kwargs):
    """The tiny Llama of the brief, wrapped in PEFT LoRA r=4 on every projection (plus ``extra_targets``)."""
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, attention_bias=biases, mlp_bias=biases)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=PROJ + list(extra_targets),
                                                **lora_kwargs))


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def by_name(groups):
    return {g["name"]: g for g in groups}


def lr_by_id(param_groups_):
    return {id(p): g["lr"] for g in param_groups_ for p in g["params"]}


def check_invariants(groups, model):
    """Full coverage by identity, exactly once, frozen excluded, no empty group, GROUP_ORDER respected."""
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for _, p in trainable(model)}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen and not frozen & set(ids)
    assert all(g["params"] for g in groups)
    names = [g["name"] for g in groups]
    assert names == [n for n in GROUP_ORDER if n in names]
    for g in groups:
        assert len(g["param_names"]) == len(g["params"])
        assert all(classify(n) == g["name"] for n in g["param_names"])


# ----------------------------------------------------------------------------------------------------------
# Plain LoRA on every projection


def test_plain_lora_groups():
    model = tiny_lora()
    groups = param_groups(model.named_parameters(), RATES)
    check_invariants(groups, model)
    assert [g["name"] for g in groups] == ["lora_A", "lora_B"]  # no empty embedding / no_decay / other group
    g = by_name(groups)
    assert g["lora_A"]["lr"] == LR
    assert g["lora_B"]["lr"] == LR * RATIO
    assert g["lora_A"]["weight_decay"] == WD and g["lora_B"]["weight_decay"] == WD
    n_adapted = 2 * len(PROJ)  # 2 layers x 7 projections
    assert len(g["lora_A"]["params"]) == n_adapted and len(g["lora_B"]["params"]) == n_adapted
    assert all(".lora_A." in n and n.endswith(".weight") for n in g["lora_A"]["param_names"])
    assert all(".lora_B." in n and n.endswith(".weight") for n in g["lora_B"]["param_names"])
    # A is [r, in], B is [out, r]
    assert all(p.shape[0] == 4 for p in g["lora_A"]["params"])
    assert all(p.shape[1] == 4 for p in g["lora_B"]["params"])


def test_param_groups_accepts_any_iterable_and_ignores_frozen():
    model = tiny_lora()
    named = list(model.named_parameters())
    groups = param_groups(iter(named), RATES)
    assert sum(len(g["params"]) for g in groups) == len(trainable(model)) < len(named)


def test_no_trainable_params_raises():
    model = tiny_lora()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(model.named_parameters(), RATES)
    with pytest.raises(ValueError):
        param_groups([], RATES)


def test_same_param_twice_raises():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="twice"):
        param_groups([("a.lora_A.default.weight", p), ("b.lora_A.default.weight", p)], RATES)


def test_group_order_with_every_group():
    def par(shape):
        return torch.nn.Parameter(torch.zeros(*shape))

    named = [  # deliberately scrambled
        ("m.layers.0.input_layernorm.weight", par((8,))),
        ("m.lm_head.weight", par((16, 8))),
        ("m.embed_tokens.lora_embedding_B.default", par((8, 4))),
        ("m.q_proj.lora_B.default.bias", par((8,))),
        ("m.q_proj.lora_B.default.weight", par((8, 4))),
        ("m.q_proj.lora_A.default.weight", par((4, 8))),
        ("m.q_proj.base_layer.bias", par((8,))),
        ("m.embed_tokens.lora_embedding_A.default", par((4, 16))),
        ("m.q_proj.lora_magnitude_vector.default.weight", par((8,))),
    ]
    groups = param_groups(named, RATES)
    assert tuple(g["name"] for g in groups) == GROUP_ORDER
    g = by_name(groups)
    assert g["lora_B_no_decay"]["param_names"] == ["m.q_proj.lora_B.default.bias"]
    assert g["other"]["param_names"] == ["m.lm_head.weight"]
    assert g["no_decay"]["param_names"] == ["m.layers.0.input_layernorm.weight", "m.q_proj.base_layer.bias"]
    assert g["lora_embedding"]["param_names"] == ["m.embed_tokens.lora_embedding_B.default",
                                                  "m.embed_tokens.lora_embedding_A.default"]
    lrs = {k: v["lr"] for k, v in g.items()}
    assert lrs == {"lora_A": LR, "lora_B": LR * RATIO, "lora_B_no_decay": LR * RATIO, "magnitude": LR,
                   "lora_embedding": LR_EMB, "other": LR, "no_decay": LR}
    wds = {k: v["weight_decay"] for k, v in g.items()}
    assert wds == {"lora_A": WD, "lora_B": WD, "lora_B_no_decay": 0.0, "magnitude": 0.0, "lora_embedding": WD,
                   "other": WD, "no_decay": 0.0}


# ----------------------------------------------------------------------------------------------------------
# Simulated ZeRO-3: empty 1-D partitions, grouping must go by name


def _partitioned(shape):
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_shape = torch.Size(shape)
    p.ds_numel = math.prod(shape)
    return p


def test_zero3_partitioned_params_grouped_by_name():
    pre = "base_model.model.model.layers.0"
    named = [
        (f"{pre}.self_attn.q_proj.lora_A.default.weight", _partitioned((4, 32))),
        (f"{pre}.self_attn.q_proj.lora_B.default.weight", _partitioned((32, 4))),
        (f"{pre}.self_attn.q_proj.base_layer.weight", _partitioned((32, 32))),
        (f"{pre}.mlp.down_proj.lora_A.default.weight", _partitioned((4, 64))),
        (f"{pre}.mlp.down_proj.lora_B.default.weight", _partitioned((32, 4))),
    ]
    # Every one of them looks like a bias to a shape test (PEFT's ``ndim == 1`` rule would put all in B).
    assert all(p.ndim == 1 and p.numel() == 0 for _, p in named)
    groups = by_name(param_groups(named, RATES))
    assert list(groups) == ["lora_A", "lora_B", "other"]
    assert groups["lora_A"]["param_names"] == [named[0][0], named[3][0]]
    assert groups["lora_B"]["param_names"] == [named[1][0], named[4][0]]
    assert groups["other"]["param_names"] == [named[2][0]]
    assert groups["other"]["weight_decay"] == WD and groups["other"]["lr"] == LR
    assert groups["lora_B"]["lr"] == LR * RATIO
    ids = {id(p) for g in groups.values() for p in g["params"]}
    assert ids == {id(p) for _, p in named}


def test_numel_and_describe_use_ds_numel():
    p = _partitioned((32, 4))
    assert p.numel() == 0 and numel(p) == 128
    assert numel(torch.zeros(3, 5)) == 15
    named = [("x.lora_A.default.weight", _partitioned((4, 32))), ("y.lora_A.default.weight", _partitioned((4, 64))),
             ("x.lora_B.default.weight", p)]
    lines = describe(param_groups(named, RATES))
    assert len(lines) == 2
    assert lines[0].startswith("lora_A") and "384 params" in lines[0] and "2 tensors" in lines[0]
    assert lines[1].startswith("lora_B") and "128 params" in lines[1]


# ----------------------------------------------------------------------------------------------------------
# Embedding adapters, biases, norms


def test_embedding_lora_group():
    model = tiny_lora(extra_targets=["embed_tokens"])
    groups = param_groups(model.named_parameters(), RATES)
    check_invariants(groups, model)
    g = by_name(groups)
    emb = g["lora_embedding"]
    assert sorted(n.rsplit(".", 2)[-2] for n in emb["param_names"]) == ["lora_embedding_A", "lora_embedding_B"]
    assert emb["lr"] == LR_EMB and emb["weight_decay"] == WD
    # and the embedding adapters did not leak into A or B
    assert not any("embed" in n for n in g["lora_A"]["param_names"] + g["lora_B"]["param_names"])


def test_bias_all_goes_to_no_decay_at_lr():
    model = tiny_lora(biases=True, bias="all")
    groups = param_groups(model.named_parameters(), RATES)
    check_invariants(groups, model)
    g = by_name(groups)
    assert [x["name"] for x in groups] == ["lora_A", "lora_B", "no_decay"]
    nd = g["no_decay"]
    assert nd["param_names"] and all(n.endswith(".bias") for n in nd["param_names"])
    assert len(nd["params"]) == 2 * len(PROJ)  # every projection has a bias with attention_bias & mlp_bias
    assert nd["lr"] == LR and nd["weight_decay"] == 0.0  # NOT lr * ratio (PEFT puts 1-D params in B)


def test_trainable_norm_goes_to_no_decay():
    model = tiny_lora()
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    for p in norms:
        p.requires_grad_(True)
    groups = param_groups(model.named_parameters(), RATES)
    check_invariants(groups, model)
    nd = by_name(groups)["no_decay"]
    assert {id(p) for p in nd["params"]} == {id(p) for p in norms}
    assert nd["lr"] == LR and nd["weight_decay"] == 0.0


def test_trainable_non_lora_matrix_goes_to_other():
    model = tiny_lora()
    model.base_model.model.lm_head.weight.requires_grad_(True)
    groups = param_groups(model.named_parameters(), RATES)
    check_invariants(groups, model)
    other = by_name(groups)["other"]
    assert [id(p) for p in other["params"]] == [id(model.base_model.model.lm_head.weight)]
    assert other["lr"] == LR and other["weight_decay"] == WD


def test_lora_bias_goes_to_lora_b_no_decay():
    model = tiny_lora(biases=True, lora_bias=True)
    groups = param_groups(model.named_parameters(), RATES)
    check_invariants(groups, model)
    g = by_name(groups)
    assert [x["name"] for x in groups] == ["lora_A", "lora_B", "lora_B_no_decay"]
    bnd = g["lora_B_no_decay"]
    assert len(bnd["params"]) == 2 * len(PROJ)
    assert all(".lora_B." in n and n.endswith(".bias") for n in bnd["param_names"])
    assert bnd["lr"] == LR * RATIO and bnd["weight_decay"] == 0.0
    assert all(n.endswith(".weight") for n in g["lora_B"]["param_names"])


def test_weight_decay_zero_everywhere_when_zero():
    model = tiny_lora(biases=True, bias="all")
    groups = param_groups(model.named_parameters(), LoraPlusRates(LR, RATIO, LR_EMB, 0.0))
    assert all(g["weight_decay"] == 0.0 for g in groups)


# ----------------------------------------------------------------------------------------------------------
# lambda = 1 is plain LoRA


def _train(model, opt, steps=3):
    gen = torch.Generator().manual_seed(123)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_ratio_one_equals_plain_lora():
    rates = LoraPlusRates(lr=1e-2, ratio=1.0, lr_embedding=1e-2, weight_decay=0.01)
    m1, m2, m3 = tiny_lora(seed=3), tiny_lora(seed=3), tiny_lora(seed=3)
    start = {n: p.detach().clone() for n, p in m1.named_parameters()}
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    opt1 = torch.optim.AdamW(param_groups(m1.named_parameters(), rates), foreach=False)
    opt2 = torch.optim.AdamW([p for _, p in trainable(m2)], lr=1e-2, weight_decay=0.01, foreach=False)
    opt3 = torch.optim.AdamW(param_groups(m3.named_parameters(), LoraPlusRates(1e-2, 16.0, 1e-2, 0.01)),
                             foreach=False)
    _train(m1, opt1)
    _train(m2, opt2)
    _train(m3, opt3)
    moved = 0
    for (n, p1), (_, p2), (_, p3) in zip(m1.named_parameters(), m2.named_parameters(), m3.named_parameters()):
        assert torch.equal(p1, p2), n
        moved += not torch.equal(p1, start[n])
    assert moved == len(trainable(m1))  # every adapter matrix (A and B) actually changed
    # and the comparison is sensitive: lambda = 16 gives different weights
    assert any(not torch.equal(p1, p3) for (n, p1), (_, p3) in zip(m1.named_parameters(), m3.named_parameters())
               if ".lora_B." in n)


# ----------------------------------------------------------------------------------------------------------
# Parity with PEFT's create_loraplus_optimizer


def _peft_lrs(model):
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                    loraplus_lr_embedding=LR_EMB)
    return lr_by_id(opt.param_groups)


@pytest.mark.parametrize("kwargs", [dict(), dict(extra_targets=["embed_tokens"]),
                                    dict(biases=True, lora_bias=True)], ids=["plain", "embedding", "lora_bias"])
def test_lr_parity_with_peft(kwargs):
    model = tiny_lora(**kwargs)
    ours = lr_by_id(param_groups(model.named_parameters(), RATES))
    peft = _peft_lrs(model)
    compared = 0
    for name, p in trainable(model):
        if any(k in name for k in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")):
            assert ours[id(p)] == peft[id(p)], name
            compared += 1
    assert compared == len(trainable(model))
    assert set(ours.values()) >= {LR, LR * RATIO}
    if "extra_targets" in kwargs:
        assert LR_EMB in ours.values()


def test_documented_difference_from_peft_for_1d_non_lora_params():
    """PEFT's ``param.ndim == 1`` rule gives a trainable bias or norm weight lr * ratio; ours gives lr (they are
    not LoRA B matrices, and the name-based rule must also survive ZeRO-3's 1-D partitions)."""
    model = tiny_lora(biases=True, bias="all")
    model.base_model.model.model.norm.weight.requires_grad_(True)
    ours = lr_by_id(param_groups(model.named_parameters(), RATES))
    peft = _peft_lrs(model)
    one_d = [(n, p) for n, p in trainable(model) if "lora_" not in n]
    assert one_d and all(p.ndim == 1 for _, p in one_d)
    for name, p in one_d:
        assert peft[id(p)] == LR * RATIO, name
        assert ours[id(p)] == LR, name


# ----------------------------------------------------------------------------------------------------------
# Optimizer choice


def test_pick_optimizer():
    assert pick_optimizer("auto", offload_optimizer=True, on_gpu=True) == "cpu_adam"
    assert pick_optimizer("auto", offload_optimizer=True, on_gpu=False) == "cpu_adam"
    assert pick_optimizer("auto", offload_optimizer=False, on_gpu=True) == "adamw_fused"
    assert pick_optimizer("auto", offload_optimizer=False, on_gpu=False) == "adamw"
    assert pick_optimizer("adamw", offload_optimizer=False, on_gpu=True) == "adamw"
    assert pick_optimizer("adamw_fused", offload_optimizer=False, on_gpu=True) == "adamw_fused"
    assert pick_optimizer("cpu_adam", offload_optimizer=True, on_gpu=False) == "cpu_adam"
    with pytest.raises(ConfigError, match="adamw_fused"):
        pick_optimizer("adamw_fused", offload_optimizer=False, on_gpu=False)
    with pytest.raises(ConfigError, match="offload"):
        pick_optimizer("adamw", offload_optimizer=True, on_gpu=True)
    with pytest.raises(ConfigError, match="offload"):
        pick_optimizer("adamw", offload_optimizer=True, on_gpu=False)
    with pytest.raises(ConfigError, match="offload"):
        pick_optimizer("adamw_fused", offload_optimizer=True, on_gpu=True)


def test_cpu_adam_on_gpu_needs_offload():
    with pytest.raises(ConfigError, match="offload_optimizer"):
        pick_optimizer("cpu_adam", offload_optimizer=False, on_gpu=True)
    assert pick_optimizer("cpu_adam", offload_optimizer=False, on_gpu=False) == "cpu_adam"  # CPU params: fine


# ----------------------------------------------------------------------------------------------------------
# The LoRA family: DoRA's magnitudes in a group of their own, rsLoRA's scaling


def test_dora_magnitudes_get_their_own_group_and_lr():
    """A real PEFT DoRA model: every magnitude vector (one per adapted layer) in ``magnitude`` at
    lr_A x dora_magnitude_ratio without weight decay; A and B as in LoRA+. Under simulated ZeRO-3 (empty 1-D
    partitions) the same groups."""
    model = tiny_lora(use_dora=True)
    rates = LoraPlusRates(lr=LR, ratio=RATIO, lr_embedding=LR_EMB, weight_decay=WD, magnitude_ratio=4.0)
    groups = param_groups(trainable(model), rates)
    check_invariants(groups, model)
    g = by_name(groups)
    assert list(g) == ["lora_A", "lora_B", "magnitude"]
    assert len(g["magnitude"]["params"]) == len(g["lora_A"]["params"]) == 2 * len(PROJ)
    assert all("lora_magnitude_vector" in n for n in g["magnitude"]["param_names"])
    assert (g["magnitude"]["lr"], g["magnitude"]["weight_decay"]) == (LR * 4.0, 0.0)
    assert (g["lora_B"]["lr"], g["lora_B"]["weight_decay"]) == (LR * RATIO, WD)
    partitioned = [(n, _partitioned(tuple(p.shape))) for n, p in trainable(model)]
    assert [(x["name"], x["param_names"]) for x in param_groups(partitioned, rates)] == \
           [(x["name"], x["param_names"]) for x in groups]


def test_peft_puts_dora_magnitudes_into_b_at_lambda():
    """The trap this group avoids, shown on PEFT's own LoRA+ optimizer: DoRA's 1-D magnitudes land in B's group
    (lr_A x lambda, B's weight decay)."""
    model = tiny_lora(use_dora=True)
    opt = create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                    weight_decay=WD)
    lrs = lr_by_id(opt.param_groups)
    magnitudes = [p for n, p in trainable(model) if "lora_magnitude_vector" in n]
    assert magnitudes and {lrs[id(p)] for p in magnitudes} == {LR * RATIO}


def test_rslora_scales_by_alpha_over_sqrt_r():
    """``lora.use_rslora``: PEFT's scaling alpha / sqrt(r) (8 / 2 at r=4), against alpha / r (2) without it."""
    from pipeline.config import LoraConfig as OurLora
    from pipeline.model.lora import add_lora

    def scaling(use_rslora: bool) -> set[float]:
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128)
        model = add_lora(LlamaForCausalLM(cfg), OurLora(r=4, alpha=8.0, use_rslora=use_rslora), seed=0)
        assert model.peft_config["default"].use_rslora is use_rslora
        return {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}

    assert scaling(True) == {4.0} and scaling(False) == {2.0}
