"""Recipes, overrides, validation, and the DeepSpeed JSON helpers (no torch, no DeepSpeed engine)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline import distributed as dist
from pipeline.config import (
    PROJECT_ROOT,
    Config,
    ConfigError,
    LoraConfig,
    OptimConfig,
    TrainConfig,
    all_keys,
    make_config,
    parse_override,
    resolve_file,
    save_config,
)

DS_DIR = PROJECT_ROOT / "deepspeed_configs"
RECIPES = sorted((PROJECT_ROOT / "launch" / "configs").glob("*.yaml"))
REQUIRED_DS = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def raises_config_error(fn, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message: {msg}"
    return msg


# ----------------------------------------------------------------------------------------------------------
# Defaults and precedence


def test_defaults_validate():
    cfg = make_config()
    assert cfg == Config()
    assert cfg.optim.loraplus_ratio == 16.0
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # every leaf key is reachable as an override and is listed by all_keys
    assert "optim.loraplus_ratio" in all_keys() and "train.max_steps" in all_keys()


def test_recipe_then_overrides_then_deepspeed_arg(tmp_path):
    recipe = write(tmp_path / "r.yaml",
                   "deepspeed_config: deepspeed_configs/zero1.json\n"
                   "optim:\n  lr: 1e-3\n  loraplus_ratio: 8\n"
                   "train:\n  max_steps: 10\n  seq_len: 64\n")
    # recipe alone
    cfg = make_config(recipe)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.optim.loraplus_ratio == 8.0 and isinstance(cfg.optim.loraplus_ratio, float)
    assert cfg.train.max_steps == 10 and cfg.train.seq_len == 64
    assert cfg.deepspeed_config == "deepspeed_configs/zero1.json"
    assert cfg.train.micro_batch_size == TrainConfig().micro_batch_size  # untouched keys keep their default

    # overrides beat the recipe, key by key
    cfg = make_config(recipe, ["train.max_steps=20", "deepspeed_config=deepspeed_configs/zero3.json"])
    assert cfg.train.max_steps == 20
    assert cfg.train.seq_len == 64  # sibling key from the recipe survives
    assert cfg.optim.lr == 1e-3
    assert cfg.deepspeed_config == "deepspeed_configs/zero3.json"

    # --deepspeed_config beats both
    cfg = make_config(recipe, ["deepspeed_config=deepspeed_configs/zero3.json"],
                      deepspeed_config="deepspeed_configs/zero0.json")
    assert cfg.deepspeed_config == "deepspeed_configs/zero0.json"

    # a later override of the same key wins
    assert make_config(recipe, ["train.max_steps=5", "train.max_steps=7"]).train.max_steps == 7


def test_override_without_recipe():
    cfg = make_config(overrides=["optim.lr=3e-5", "lora.r=8", "data.packing=true", "seed=1"])
    assert cfg.optim.lr == 3e-5 and cfg.lora.r == 8 and cfg.data.packing is True and cfg.seed == 1


def test_malformed_override_text():
    raises_config_error(lambda: parse_override("train.max_steps"), "train.max_steps", "key.sub=value")
    raises_config_error(lambda: make_config(overrides=["=3"]), "=3")


# ----------------------------------------------------------------------------------------------------------
# Unknown keys


def test_unknown_override_key_names_key_source_and_suggestion():
    raises_config_error(lambda: make_config(overrides=["optim.lr_ratio=4"]),
                        "'optim.lr_ratio'", "command line", "did you mean 'optim.loraplus_ratio'")


def test_unknown_key_in_recipe_names_file(tmp_path):
    recipe = write(tmp_path / "typo.yaml", "optim:\n  lr: 1e-4\n  lr_ratio: 4\n")
    raises_config_error(lambda: make_config(recipe),
                        "'optim.lr_ratio'", str(recipe), "did you mean 'optim.loraplus_ratio'")
    recipe = write(tmp_path / "typo2.yaml", "train:\n  max_step: 5\n")
    raises_config_error(lambda: make_config(recipe), "'train.max_step'", str(recipe),
                        "did you mean 'train.max_steps'")


def test_unknown_section_names_its_source(tmp_path):
    raises_config_error(lambda: make_config(overrides=["optimm.lr=4"]), "'optimm'", "command line", "'optim'")
    recipe = write(tmp_path / "typo.yaml", "optimm:\n  lr: 1e-4\n")
    raises_config_error(lambda: make_config(recipe), "'optimm'", str(recipe))


# ----------------------------------------------------------------------------------------------------------
# Types and values


@pytest.mark.parametrize("override, key, expected", [
    ("train.max_steps=abc", "train.max_steps", "an integer"),
    ("model.gradient_checkpointing=3", "model.gradient_checkpointing", "true or false"),
    ("optim.lr=fast", "optim.lr", "a number"),
    ("lora.target_modules=3", "lora.target_modules", "a list"),
    ("train=3", "train", "a mapping"),
])
def test_wrong_type_names_key(override, key, expected):
    raises_config_error(lambda: make_config(overrides=[override]), f"'{key}'", "command line", expected)


def test_wrong_type_in_recipe_names_file(tmp_path):
    recipe = write(tmp_path / "r.yaml", "model:\n  gradient_checkpointing: 3\n")
    raises_config_error(lambda: make_config(recipe), "'model.gradient_checkpointing'", str(recipe))


@pytest.mark.parametrize("override, key", [
    ("schedule.name=step", "schedule.name"),
    ("lora.r=0", "lora.r"),
    ("optim.optimizer=sgd", "optim.optimizer"),
    ("optim.lr=0", "optim.lr"),
    ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("data.format=csv", "data.format"),
    ("data.too_long=ignore", "data.too_long"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("schedule.warmup_steps=1000", "schedule.warmup_steps"),  # > train.max_steps (60)
])
def test_invalid_values_raise(override, key):
    raises_config_error(lambda: make_config(overrides=[override]), f"'{key}'")


def test_integral_float_accepted_for_int_but_bool_is_not_an_int():
    assert make_config(overrides=["train.max_steps=100.0"]).train.max_steps == 100
    raises_config_error(lambda: make_config(overrides=["train.max_steps=true"]), "'train.max_steps'")
    raises_config_error(lambda: make_config(overrides=["train.max_steps=2.5"]), "'train.max_steps'")


@pytest.mark.parametrize("text", ["lora.target_modules=q_proj,v_proj", "lora.target_modules=[q_proj, v_proj]",
                                  "lora.target_modules= q_proj , v_proj "])
def test_target_modules_list_forms(text):
    assert make_config(overrides=[text]).lora.target_modules == ["q_proj", "v_proj"]


def test_empty_target_modules_rejected():
    raises_config_error(lambda: make_config(overrides=["lora.target_modules=[]"]), "'lora.target_modules'")


# ----------------------------------------------------------------------------------------------------------
# Round trip and YAML errors


def test_save_config_round_trips(tmp_path):
    cfg = make_config(overrides=[
        "optim.lr=3e-5", "optim.eps=1e-10", "optim.loraplus_lr_embedding=1e-7", "optim.betas=[0.8, 0.95]",
        "lora.alpha=8", "lora.target_modules=q_proj,v_proj", "schedule.name=linear", "schedule.min_lr_ratio=0.1",
        "schedule.warmup_steps=3", "train.max_steps=7", "data.packing=true", "output_dir=runs/x y",
        "model.name_or_path=123", "deepspeed_config=deepspeed_configs/zero3.json"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    back = make_config(path)
    assert back == cfg
    assert back != Config()  # the round trip carried real, non-default values
    assert back.model.name_or_path == "123" and isinstance(back.lora.alpha, float)


def test_malformed_yaml_names_file_and_line(tmp_path):
    recipe = write(tmp_path / "bad.yaml", "optim:\n  lr: 1e-4\n bad: 1\n")
    raises_config_error(lambda: make_config(recipe), f"{recipe}:3", "not valid YAML")
    recipe = write(tmp_path / "bad2.yaml", "train:\n  max_steps: 5\noptim:\n  betas: [0.9, 0.99\nseed: 1\n")
    msg = raises_config_error(lambda: make_config(recipe), f"{recipe}:")
    line = int(msg.split(f"{recipe}:", 1)[1].split(":", 1)[0])
    assert line in (4, 5)


def test_recipe_must_be_a_mapping_and_exist(tmp_path):
    raises_config_error(lambda: make_config(write(tmp_path / "list.yaml", "- 1\n- 2\n")), "mapping")
    raises_config_error(lambda: make_config(tmp_path / "missing.yaml"), "not found", "missing.yaml")
    assert make_config(write(tmp_path / "empty.yaml", "")) == Config()


# ----------------------------------------------------------------------------------------------------------
# Shipped recipes and DeepSpeed JSONs


@pytest.mark.parametrize("recipe", [None, *RECIPES], ids=lambda r: "embedded-default" if r is None else r.name)
def test_shipped_recipe_loads_and_its_deepspeed_json_is_valid(recipe):
    cfg = make_config(recipe)
    assert isinstance(cfg, Config)
    path = resolve_file(cfg.deepspeed_config, "DeepSpeed config", "deepspeed_config")
    assert path.is_file()
    ds = dist.read_ds_json(path)
    assert dist.zero_stage(ds) in (0, 1, 2, 3)


def test_required_deepspeed_jsons_exist():
    for name in REQUIRED_DS:
        assert (DS_DIR / f"{name}.json").is_file(), name


@pytest.mark.parametrize("path", sorted(DS_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_json_passes(path):
    ds = dist.read_ds_json(path)
    assert isinstance(ds, dict)


@pytest.mark.parametrize("name, stage, offload", [
    ("zero0", 0, False), ("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)])
def test_deepspeed_json_stage_and_offload(name, stage, offload):
    ds = dist.read_ds_json(DS_DIR / f"{name}.json")
    assert dist.zero_stage(ds) == stage
    assert dist.offloads_optimizer(ds) is offload


def _ds(tmp_path, obj) -> Path:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(obj, indent=2))
    return p


BASE_DS = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}


@pytest.mark.parametrize("extra, needles", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, ("'optimizer'", "LoRA+", "optim.")),
    ({"scheduler": {"type": "WarmupLR"}}, ("'scheduler'", "flatten", "schedule.")),
    ({"train_batch_size": 32}, ("'train_batch_size'", "recipe owns")),
    ({"train_micro_batch_size_per_gpu": 4}, ("'train_micro_batch_size_per_gpu'", "train.micro_batch_size")),
    ({"gradient_accumulation_steps": 2}, ("'gradient_accumulation_steps'", "train.grad_accum")),
    ({"gradient_clipping": 1.0}, ("'gradient_clipping'", "optim.max_grad_norm")),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}},
     ("zero_optimization.stage3_prefetch_bucket_size", "auto")),
    ({"fp16": "auto"}, ("'fp16'", "auto")),
    ({"zero_optimization": {"stage": 4}}, ("stage",)),
])
def test_read_ds_json_refuses(tmp_path, extra, needles):
    path = _ds(tmp_path, {**BASE_DS, **extra})
    raises_config_error(lambda: dist.read_ds_json(path), str(path), *needles)


def test_read_ds_json_malformed_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  "bf16": ,\n  "x": 1\n}\n')
    raises_config_error(lambda: dist.read_ds_json(path), f"{path}:3", "malformed JSON")
    path.write_text("[1, 2]")
    raises_config_error(lambda: dist.read_ds_json(path), "JSON object")


def test_assemble_ds_config_fills_recipe_keys():
    cfg = make_config(overrides=["train.micro_batch_size=3", "train.grad_accum=5", "optim.max_grad_norm=0.5"])
    ds = dist.read_ds_json(DS_DIR / "zero2.json")
    snapshot = json.dumps(ds, sort_keys=True)
    out = dist.assemble_ds_config(ds, cfg, world_size=4, precision="fp32")
    assert out["train_micro_batch_size_per_gpu"] == 3
    assert out["gradient_accumulation_steps"] == 5
    assert out["train_batch_size"] == 3 * 5 * 4
    assert out["gradient_clipping"] == 0.5
    assert out["zero_optimization"] == ds["zero_optimization"]
    assert "bf16" not in out and "fp16" not in out  # the resolved precision, not the JSON's
    assert json.dumps(ds, sort_keys=True) == snapshot  # the input is not modified

    bf16 = dist.assemble_ds_config(ds, cfg, world_size=2, precision="bf16")
    assert bf16["bf16"] == {"enabled": True} and bf16["train_batch_size"] == 3 * 5 * 2
    # A JSON without them still accumulates and reduces gradients in fp32; a JSON's own choice is kept.
    bare = dist.assemble_ds_config({"zero_optimization": {"stage": 2}}, cfg, 1, "bf16")
    assert bare["data_types"] == {"grad_accum_dtype": "fp32"} and bare["communication_data_type"] == "fp32"
    own = dist.assemble_ds_config({"data_types": {"grad_accum_dtype": "bf16"}}, cfg, 1, "bf16")
    assert own["data_types"]["grad_accum_dtype"] == "bf16"
    # The legacy "bfloat16" block is read as bf16, and written back under the current name with its settings.
    legacy = dist.assemble_ds_config({"bfloat16": {"enabled": True, "immediate_grad_update": True}}, cfg, 1,
                                            "bf16")
    assert "bfloat16" not in legacy and legacy["bf16"] == {"enabled": True, "immediate_grad_update": True}

    fp16 = dist.assemble_ds_config({**ds, "bf16": {"enabled": False}, "fp16": {"enabled": True}}, cfg, 1, "fp16")
    assert fp16["fp16"] == {"enabled": True} and "bf16" not in fp16


def test_assemble_ds_config_offload_forces_ds_cpu_optimizer():
    cfg = make_config()
    off = dist.assemble_ds_config(dist.read_ds_json(DS_DIR / "zero3_offload.json"), cfg, 1, "bf16")
    assert off["zero_force_ds_cpu_optimizer"] is True
    plain = dist.assemble_ds_config(dist.read_ds_json(DS_DIR / "zero3.json"), cfg, 1, "bf16")
    assert "zero_force_ds_cpu_optimizer" not in plain


def test_precision():
    resolve = dist.resolve_precision
    bf16 = dist.read_ds_json(DS_DIR / "zero2.json")
    assert resolve(bf16, "auto", False, "z2") == ("fp32", None)  # CPU: fp32 unless asked
    assert resolve(bf16, "auto", True, "z2") == ("bf16", None)
    assert resolve(bf16, "bf16", False, "z2") == ("bf16", None)
    precision, note = resolve(bf16, "fp32", True, "z2.json")
    assert precision == "fp32" and note == "train.precision=fp32 overrides the bf16 of z2.json"
    zero0 = dist.read_ds_json(DS_DIR / "zero0.json")
    assert resolve(zero0, "auto", True, "z0") == ("fp32", None)
    assert resolve({"fp16": {"enabled": True}}, "auto", True, "j") == ("fp16", None)
    assert resolve({"fp16": {"enabled": True}}, "auto", False, "j") == ("fp32", None)
    assert resolve({"bf16": {"enabled": False}}, "auto", True, "j") == ("fp32", None)
    assert resolve({"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 1}}, "auto", True, "j")[0] == "bf16"
    # bf16 under ZeRO-0: DeepSpeed's FP16_UnfusedOptimizer would take a real step on zero gradients at start
    raises_config_error(lambda: resolve(zero0, "bf16", False, "deepspeed_configs/zero0.json"),
                        "deepspeed_configs/zero0.json: bf16 with ZeRO stage 0 is not supported", "zero1.json")
    raises_config_error(lambda: resolve({"bf16": {"enabled": True}}, "auto", True, "mine.json"), "mine.json: bf16")


def test_shipped_bf16_configs_accumulate_and_reduce_in_fp32():
    for name in ("zero1", "zero2", "zero3", "zero3_offload"):
        ds = dist.read_ds_json(DS_DIR / f"{name}.json")
        assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32", name
        assert ds["communication_data_type"] == "fp32", name


def test_train_precision_loss_chunk_and_scorer_device_keys():
    assert make_config(overrides=["train.precision=bf16"]).train.precision == "bf16"
    raises_config_error(lambda: make_config(overrides=["train.precision=fp16"]), "train.precision",
                        "auto, bf16, fp32")
    assert make_config().train.loss_chunk > 0 and make_config(overrides=["train.loss_chunk=0"]).train.loss_chunk == 0
    raises_config_error(lambda: make_config(overrides=["train.loss_chunk=-1"]), "train.loss_chunk", ">= 0")
    assert make_config(overrides=["eval.mmlu.runner=process", "eval.mmlu.device=cuda:3"]).eval.mmlu.device == "cuda:3"
    raises_config_error(lambda: make_config(overrides=["eval.mmlu.device=cuda"]), "eval.mmlu.device",
                        "rank 0's training GPU")
    raises_config_error(lambda: make_config(overrides=["eval.mmlu.device=gpu1"]), "eval.mmlu.device", "cuda:N")


def test_scorer_memory_budget_key(tmp_path):
    """``eval.mmlu.memory_gb``: ``auto`` by default, a number of GiB from a recipe or the command line (YAML reads
    ``4`` as an int: it is kept as text, like the other eval.mmlu keys), anything else one error naming the key."""
    assert make_config().eval.mmlu.memory_gb == "auto"
    assert make_config(overrides=["eval.mmlu.runner=process", "eval.mmlu.memory_gb=2.5"]).eval.mmlu.memory_gb == "2.5"
    recipe = write(tmp_path / "r.yaml", "eval:\n  mmlu:\n    runner: process\n    memory_gb: 4\n")
    assert make_config(recipe).eval.mmlu.memory_gb == "4"
    for bad in ("0", "-1", "lots", "nan", ".inf", "4GB"):
        raises_config_error(lambda bad=bad: make_config(overrides=["eval.mmlu.runner=process",
                                                                   f"eval.mmlu.memory_gb={bad}"]),
                            "'eval.mmlu.memory_gb'", "a number of GiB > 0, or auto")


def test_scorer_runner_and_subject_keys():
    """``eval.mmlu.runner``: engine (default) or process; the process runner's device and memory budget are refused
    with the engine (they would mean nothing); ``eval.mmlu.subjects``: a list of subject names, each once."""
    assert make_config().eval.mmlu.runner == "engine"
    assert make_config(overrides=["eval.mmlu.runner=process"]).eval.mmlu.runner == "process"
    raises_config_error(lambda: make_config(overrides=["eval.mmlu.runner=gpu"]), "eval.mmlu.runner",
                        "process or engine", "'gpu'")
    raises_config_error(lambda: make_config(overrides=["eval.mmlu.runner=engine", "eval.mmlu.device=cuda:1"]),
                        "eval.mmlu.device", "runner=engine", "drop it")
    raises_config_error(lambda: make_config(overrides=["eval.mmlu.runner=engine", "eval.mmlu.memory_gb=4"]),
                        "eval.mmlu.memory_gb", "runner=engine")
    cfg = make_config(overrides=["eval.mmlu.subjects=anatomy, virology"]).eval.mmlu
    assert cfg.parse_subjects(cfg.subjects) == ["anatomy", "virology"]
    raises_config_error(lambda: make_config(overrides=["eval.mmlu.subjects=anatomy,anatomy"]), "eval.mmlu.subjects",
                        "twice")
    raises_config_error(lambda: make_config(overrides=["eval.mmlu.subjects=High School Physics"]),
                        "eval.mmlu.subjects", "not an MMLU subject name")


def test_subjects_are_lm_evals():
    """A well-formed name that is not one of lm-eval's 57 subjects is refused with the nearest one."""
    from pipeline.errors import UserError
    from pipeline.eval.mmlu import check_subjects

    check_subjects(["anatomy", "high_school_physics"])
    with pytest.raises(UserError, match="'anatomi' is not an MMLU subject .did you mean 'anatomy'"):
        check_subjects(["anatomi"])


def test_dataclass_validation_direct():
    with pytest.raises(ConfigError, match="lora.dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="optim.max_grad_norm"):
        OptimConfig(max_grad_norm=-1)


@pytest.mark.parametrize("overrides, needle", [
    (["data.val_fraction=0.6"], "data.val_fraction"),
    (["data.val_fraction=-0.1"], "data.val_fraction"),
    (["data.val_fraction=0.1", "data.val_path=v.jsonl"], "choose one validation set"),
    (["train.eval_every=10"], "needs a validation set"),
    (["data.num_proc=-1"], "data.num_proc"),
    (["data.format=alpaca"], "sharegpt"),
])
def test_data_and_validation_keys_are_checked(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        make_config(None, overrides)
    cfg = make_config(None, ["data.format=sharegpt", "data.val_fraction=0.5", "train.eval_every=5"])
    assert cfg.data.val_fraction == 0.5 and cfg.train.eval_every == 5 and cfg.data.format == "sharegpt"
