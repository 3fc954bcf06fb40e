"""Bad input: one clear ``error:`` line naming what and where, exit status 2, no traceback, and nothing in
output_dir that could pass for a result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_train

RESULTS = ("metrics.jsonl", "checkpoints", "config.yaml")


def assert_refused(proc, out: Path, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not any((out / name).exists() for name in RESULTS), sorted(p.name for p in out.iterdir())
    return errors[0]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"})


def test_misspelled_key_names_it_and_suggests(tmp_path):
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", "optim.lr_ratio=4"], check=False)
    assert_refused(proc, out, "optim.lr_ratio", "command line", "did you mean 'optim.loraplus_ratio'")


def test_misspelled_key_in_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_step: 3\n")
    out = tmp_path / "o"
    proc = run_train(["--config", str(recipe), f"output_dir={out}"], check=False)
    assert_refused(proc, out, "train.max_step", str(recipe), "train.max_steps")


def test_missing_model_directory(tmp_path):
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", f"model.name_or_path={tmp_path / 'nope'}"], check=False)
    assert_refused(proc, out, "model directory not found", str(tmp_path / "nope"), "model.name_or_path")


def test_malformed_data_line_names_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, '{"instruction": "x", "output": '])
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", f"data.path={data}"], check=False)
    assert_refused(proc, out, f"{data}:3", "malformed")


def test_empty_dataset(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [])
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", f"data.path={data}"], check=False)
    assert_refused(proc, out, "empty")


def test_missing_field_names_field_and_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, json.dumps({"prompt": "x", "output": "y"})])
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", f"data.path={data}", "data.format=instruction"], check=False)
    assert_refused(proc, out, f"{data}:2", "'instruction'")


def test_too_long_sample_refused_when_the_recipe_says_so(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, json.dumps({"instruction": "word " * 200, "output": "x"})])
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", f"data.path={data}", "data.too_long=refuse", "train.seq_len=64"],
                     check=False)
    assert_refused(proc, out, f"{data}:2", "train.seq_len=64")


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_deepspeed_json_with_optimizer_or_scheduler_block(tmp_path, block):
    ds = json.loads((REPO / "deepspeed_configs" / "zero2.json").read_text())
    ds[block] = {"type": "AdamW" if block == "optimizer" else "WarmupLR", "params": {}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    out = tmp_path / "o"
    proc = run_train(["--deepspeed_config", str(path), f"output_dir={out}"], check=False)
    assert_refused(proc, out, str(path), f"'{block}' block")


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = blocker / "run"  # cannot be created, even by root
    proc = run_train([f"output_dir={out}", "train.max_steps=1"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not writable" in errors[0] and str(out) in errors[0], proc.stderr[-2000:]
    assert blocker.read_text() == "not a directory"


def test_existing_run_is_not_overwritten_without_the_flag(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_train([f"output_dir={out}"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--overwrite" in proc.stderr and "holds files of a run" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # the user's work is untouched


def test_run_with_another_recipe_is_not_resumed_or_overwritten(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 1\noptim:\n  lr: 0.5\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_train([f"output_dir={out}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "different recipe" in errors[0] and "optim.lr" in errors[0], proc.stderr[-2000:]
    assert "--overwrite" in errors[0]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n' and "lr: 0.5" in (out / "config.yaml").read_text()


def test_non_empty_directory_without_a_run_is_refused(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run_train([f"output_dir={out}"], check=False)
    assert_refused(proc, out, "not empty", "notes.txt", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("section,key", [("zero_optimization", "compute_grad_norm"), ("bf16", "check_grad_overflow")])
def test_deepspeed_json_that_turns_off_the_overflow_check(tmp_path, section, key):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, section: {key: False}}))
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", "--deepspeed_config", str(ds)], check=False)
    assert_refused(proc, out, f"{section}.{key}", "NaN")


def test_override_without_equals_sign(tmp_path):
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", "train.max_steps"], check=False)
    assert_refused(proc, out, "train.max_steps", "key.sub=value")


def test_bad_input_under_the_launcher_is_one_line_from_rank_0(tmp_path):
    """One rank finds the error while it builds the data cache and prints it; the other, waiting on that build,
    stops without repeating it; the launcher exits non-zero."""
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, "not json"])
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", f"data.path={data}"], nprocs=2, check=False)
    assert_refused(proc, out, f"{data}:2")


# Errors found late (after the model is loaded) must leave output_dir as empty as early ones do.


def test_lora_target_that_matches_nothing_leaves_no_run_behind(tmp_path):
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", "lora.target_modules=[nonexistent]", "--deepspeed_config",
                      "deepspeed_configs/zero0.json"], check=False)
    assert_refused(proc, out, "lora.target_modules", "q_proj")  # lists the names that do exist
    proc = run_train([f"output_dir={out}", "train.max_steps=1", "--deepspeed_config", "deepspeed_configs/zero0.json"])
    assert (out / "metrics.jsonl").is_file()  # the corrected rerun is not refused as "already holds a run"


def test_flash_attention_without_flash_attn(tmp_path):
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", "model.attn_implementation=flash_attention_2", "train.precision=bf16"],
                     check=False)
    assert_refused(proc, out, "flash_attention_2", "sdpa")


@pytest.mark.parametrize("case", ["fa2-fp32", "bf16-zero0"])
def test_precision_that_cannot_work_is_refused(tmp_path, case):
    out = tmp_path / "o"
    if case == "fa2-fp32":  # flash-attention kernels have no fp32 version: the first forward would fail
        proc = run_train([f"output_dir={out}", "model.attn_implementation=flash_attention_2"], check=False)
        assert_refused(proc, out, "flash_attention_2 runs in bf16 or fp16 only", "train.precision=bf16")
    else:
        proc = run_train([f"output_dir={out}", "train.precision=bf16", "--deepspeed_config",
                          "deepspeed_configs/zero0.json"], check=False)
        assert_refused(proc, out, "zero0.json: bf16 with ZeRO stage 0 is not supported", "zero1.json")


def _copy_model(tiny_model_dir: Path, dest: Path, skip=()) -> Path:
    dest.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name not in skip:
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_model_dir_without_tokenizer(tmp_path, tiny_model_dir):
    model = _copy_model(tiny_model_dir, tmp_path / "m", skip=("tokenizer.json", "tokenizer_config.json"))
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", f"model.name_or_path={model}"], check=False)
    assert_refused(proc, out, str(model), "tokenizer")


def test_model_config_without_model_type(tmp_path, tiny_model_dir):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    (model / "config.json").write_text("{}")
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", f"model.name_or_path={model}"], check=False)
    assert_refused(proc, out, "config.json", "model_type")


def test_data_line_that_is_not_utf8(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes((GOOD + "\n").encode() + b'{"instruction": "\xff\xfe", "output": "x"}\n')
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", f"data.path={data}"], check=False)
    assert_refused(proc, out, f"{data}:2", "UTF-8")


def test_deepspeed_config_that_is_a_directory(tmp_path):
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", "--deepspeed_config", "deepspeed_configs"], check=False)
    assert_refused(proc, out, "directory", "deepspeed_config")


def test_seed_out_of_range(tmp_path):
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", "seed=18446744073709551616"], check=False)
    assert_refused(proc, out, "'seed'")


SHARE_OK = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})


@pytest.mark.parametrize("case", ["sharegpt-role", "sharegpt-value", "val-empty", "val-format", "val-fraction",
                                  "cache-dir"])
def test_bad_data_settings_are_one_line(tmp_path, case):
    """The data issue's bad inputs, through launch/train.py: exit 2, one line naming the file and line (or key)."""
    out = tmp_path / "o"
    train = write_jsonl(tmp_path / "t.jsonl", [GOOD, GOOD])
    args, needles = [f"data.path={train}", f"data.cache_dir={tmp_path / 'cache'}"], []
    if case.startswith("sharegpt"):
        turn = {"from": "robot", "value": "x"} if case == "sharegpt-role" else {"from": "gpt"}
        bad = write_jsonl(tmp_path / "s.jsonl", [SHARE_OK, json.dumps({"conversations": [turn]})])
        args = [f"data.path={bad}", "data.format=sharegpt", args[1]]
        needles = [f"{bad}:2", "'robot'" if case == "sharegpt-role" else "no 'value'"]
    elif case == "val-empty":
        empty = write_jsonl(tmp_path / "v.jsonl", [])
        args.append(f"data.val_path={empty}")
        needles = [str(empty), "empty", "data.val_path"]
    elif case == "val-format":
        chat = write_jsonl(tmp_path / "v.jsonl", [json.dumps({"messages": [{"role": "user", "content": "x"}]})])
        args += [f"data.val_path={chat}", "data.format=instruction"]  # the training file's format, not auto
        needles = [f"{chat}:1", "'instruction'"]
    elif case == "val-fraction":
        args.append("data.val_fraction=0.6")
        needles = ["data.val_fraction", "(0, 0.5]"]
    else:
        (tmp_path / "file").write_text("")
        args[1] = f"data.cache_dir={tmp_path / 'file' / 'cache'}"
        needles = ["data.cache_dir", str(tmp_path / "file" / "cache")]
    proc = run_train([f"output_dir={out}", *args], check=False)
    assert proc.returncode == 2
    assert_refused(proc, out, *needles)
    assert not (out / "val.jsonl").exists()


# A model directory that is broken on disk: each is refused by check_model_dir (start.check_request, every rank,
# before any process group) or, for the tokenizer, where it is loaded (before dist.init), in one line that names the
# file and the fix. The checkpoints come from a small 2-layer Llama saved here (not the real-model tier's SmolLM2).

SMALL_VOCAB = 640  # more rows than the tiny tokenizer's 512 tokens: padded vocabularies are normal and accepted


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory, tiny_model_dir) -> Path:
    """A 2-layer, width-64 Llama in 3 safetensors shards with the tiny model's tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("small") / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(
        out, max_shard_size="250KB")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    assert len(sorted(out.glob("model-*.safetensors"))) == 3
    return out


def test_small_llama_with_a_padded_vocabulary_passes_the_checks(small_llama):
    """The checks refuse nothing that loads: a complete sharded checkpoint, an embedding with more rows than tokens."""
    from types import SimpleNamespace

    from pipeline.model.load import check_model_dir, load_run_tokenizer

    assert check_model_dir(str(small_llama))["vocab_size"] == SMALL_VOCAB
    model = SimpleNamespace(name_or_path=str(small_llama), trust_remote_code=False, random_init=False)
    assert len(load_run_tokenizer(SimpleNamespace(model=model))) == 512


@pytest.mark.parametrize("case", ["gguf-only", "gguf-file", "missing-shard", "truncated", "corrupt-header",
                                  "tokenizer-too-large"])
def test_broken_model_dir_is_one_line(tmp_path, small_llama, case):
    """Each of these ended in a traceback (IndexError mid-run, FileNotFoundError, SafetensorError) or in a bare
    "no config.json"; now one line that names the file and the fix, exit 2, nothing in output_dir."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(small_llama, model)
    shards = sorted(model.glob("model-*.safetensors"))
    if case in ("gguf-only", "gguf-file"):
        shutil.rmtree(model)
        model.mkdir()
        gguf = model / "SmolLM2-135M-Instruct.Q4_1.gguf"
        gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
        if case == "gguf-file":
            model = gguf
        needles = [str(gguf), f"python launch/import_gguf.py {gguf} OUT_DIR", "model.name_or_path=OUT_DIR"]
    elif case == "missing-shard":
        shards[1].unlink()
        needles = [str(model / "model.safetensors.index.json"), shards[1].name, "missing", "copy the complete"]
    elif case == "truncated":
        size = shards[2].stat().st_size
        with open(shards[2], "r+b") as f:
            f.truncate(size - 1000)
        needles = [str(shards[2]), "is truncated", f"describes {size:,} bytes, the file has {size - 1000:,}",
                   "copy it again"]
    elif case == "corrupt-header":
        data = bytearray(shards[0].read_bytes())
        data[8:10] = b"#!"  # the JSON header's first bytes
        shards[0].write_bytes(bytes(data))
        needles = [str(shards[0]), "not a valid safetensors header", "copy it again"]
    else:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
        needles = [str(model / "tokenizer.json"), str(model / "config.json"), "512 tokens", "256 embedding rows",
                   "use the tokenizer that came with these weights"]
    out = tmp_path / "o"
    proc = run_train([f"output_dir={out}", f"model.name_or_path={model}", "--deepspeed_config",
                      "deepspeed_configs/zero0.json"], check=False)
    assert proc.returncode == 2
    assert_refused(proc, out, *needles)


def test_import_gguf_refuses_a_non_gguf_and_a_directory_that_holds_files(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "launch" / "import_gguf.py"), *map(str, args)],
                              check=False, cwd=REPO, capture_output=True, text=True, timeout=120)

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    gguf = tmp_path / "real.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("my work")
    for args, needles in [((not_gguf, tmp_path / "new"), [str(not_gguf), "not a GGUF file"]),
                          ((gguf, taken), [str(taken), "not an empty directory", "nothing was written"]),
                          ((gguf,), ["FILE.gguf OUT_DIR"])]:
        proc = run(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and all(n in errors[0] for n in needles), proc.stderr
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"] and (taken / "notes.txt").read_text() == "my work"


@pytest.mark.parametrize("case", ["runner", "engine-device", "subject"])
def test_bad_mmlu_scoring_settings_are_refused_at_the_start(tmp_path, case):
    """eval.mmlu.* for the engine runner, through launch/train.py: refused before any process group, one line."""
    out = tmp_path / "o"
    args, needles = {
        "runner": (["eval.mmlu.runner=ranks"], ["eval.mmlu.runner", "process or engine"]),
        "engine-device": (["eval.mmlu.runner=engine", "eval.mmlu.device=cuda:0"], ["eval.mmlu.device", "drop it"]),
        "subject": (["eval.mmlu.runner=engine", "eval.mmlu.subjects=anatomy,astronmy"],
                    ["eval.mmlu.subjects", "'astronmy' is not an MMLU subject", "'astronomy'"]),
    }[case]
    proc = run_train([f"output_dir={out}", "eval.mmlu.every_checkpoint=true", *args], check=False)
    assert_refused(proc, out, *needles)
