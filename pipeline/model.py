"""Loading a local Hugging Face causal LM.

No DeepSpeed here. Under ZeRO-3 the caller keeps DeepSpeed's Hugging Face hook alive while this runs
(``distributed.zero3_load_hook``), and ``from_pretrained`` then builds the model inside ``deepspeed.zero.Init``:
each rank materialises only its partition of the frozen base weights, never a full copy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from pipeline.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return any((p / name).is_file() for name in TOKENIZER_FILES)


def check_model_dir(path: str) -> dict:
    """Validate a model directory without loading it; return its ``config.json``.

    Raises:
        UserError: not a directory, no ``config.json``, or no safetensors weights.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"model directory not found: {p} (config key 'model.name_or_path'; models are loaded "
                        f"from local directories only, nothing is downloaded)")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{p} is not a Hugging Face model directory: no config.json (config key "
                        f"'model.name_or_path')")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{cfg_file}: no 'model_type', so transformers cannot tell the architecture (expected "
                        f"e.g. \"model_type\": \"llama\")")
    if not has_tokenizer(p):
        raise UserError(f"{p} has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the tokenizer files of the "
                        f"base model into it")
    if not any(p.glob("*.safetensors")):
        raise UserError(f"{p} has no *.safetensors weights; this pipeline does not unpickle .bin/.pt weights. "
                        f"Convert them once (load and save_pretrained(safe_serialization=True)) in a trusted "
                        f"environment")
    return config


def check_shape(config: dict, shape, path: str) -> None:
    """Refuse a model directory whose ``config.json`` disagrees with the recipe's declared ``model.shape``."""
    wrong = [f"{key}: recipe {want}, {path}/config.json {config_value(config, key)}"
             for key, want in shape.declared().items() if config_value(config, key) != want]
    if wrong:
        raise UserError(f"the model directory is not the architecture the recipe is sized for ({'; '.join(wrong)}); "
                        f"point model.name_or_path at the right weights, or use a recipe for this model")


LLAMA_ROPE_THETA = 10000.0  # transformers' LlamaConfig default, what a config.json without the key means


def config_value(config: dict, key: str):
    """A dimension from a ``config.json`` mapping, whichever transformers version wrote it."""
    if key == "num_key_value_heads":  # absent means one KV head per query head
        return config.get(key) or config.get("num_attention_heads")
    if key == "rope_theta":  # transformers 5 nests it in rope_parameters; Llama-2's 4.31-era file omits it
        return config.get(key) or (config.get("rope_parameters") or {}).get(key) or LLAMA_ROPE_THETA
    return config.get(key)


def shape_config(shape, **kwargs):
    """A ``transformers.LlamaConfig`` of a declared ``model.shape``, without weights (``kwargs`` override)."""
    from transformers import LlamaConfig

    return LlamaConfig(**shape.declared(), **kwargs)


def load_run_tokenizer(cfg):
    """The run's tokenizer (``model.name_or_path``), checked against ``model.shape`` for random weights."""
    from pipeline.errors import UserError

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    if cfg.model.random_init and len(tokenizer) > cfg.model.shape.vocab_size:
        raise UserError(f"the tokenizer of {cfg.model.name_or_path} has {len(tokenizer):,} tokens, more than "
                        f"model.shape.vocab_size={cfg.model.shape.vocab_size:,}; use a matching tokenizer")
    return tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise UserError(f"{path}: the tokenizer defines no EOS token; samples could never end")
    return tok


def load_model(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa",
               gradient_checkpointing: bool = False, trust_remote_code: bool = False,
               random_shape=None, init_device: torch.device | None = None) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` on a local directory, base weights frozen.

    Args:
        path: local model directory (validated by :func:`check_model_dir`).
        dtype: parameter dtype (bf16 on GPU, fp32 on CPU; chosen by the caller from the DeepSpeed JSON).
        random_shape: a complete ``model.shape``: build that Llama with random weights instead (``from_config``,
            which under ZeRO-3 also partitions at construction); ``path`` is then not read.
        init_device: where ``random_shape`` weights are drawn (the GPU: drawing 8B random weights on the CPU first
            takes minutes); None for the default device.
    """
    from transformers import AutoModelForCausalLM

    if attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
            raise UserError("model.attn_implementation=flash_attention_2 needs a CUDA GPU and the flash-attn "
                            "package (pip install flash-attn --no-build-isolation); or use sdpa")
    if random_shape is not None:
        with init_device if init_device is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(shape_config(random_shape), dtype=dtype,
                                                     attn_implementation=attn_implementation)
    elif _zero3_active() and (weight_map := _weight_map(Path(path))) is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        _import_model_class(config)  # before zero.Init: see its docstring
        with _partitioned_without_init():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
            # no_init_weights also skips the tying: tie now, so that a tied LM head (SmolLM2, Qwen2's small
            # releases) is the one stored embedding and the names match the checkpoint's
            model.tie_weights()
        if _stream_into_partitions(model, Path(path), weight_map):
            model.tie_weights()
        else:
            del model
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                use_safetensors=True, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            use_safetensors=True, local_files_only=True)
    model.requires_grad_(False)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads hack needed).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ----------------------------------------------------------------------------------------------------------
# ZeRO-3 loading, one shard at a time
#
# transformers (5.x, ``modeling_utils._load_pretrained_model``) loads a ZeRO-3 model by memory-mapping *every*
# shard on rank 0 at once, so rank 0's resident memory reaches a whole copy of the checkpoint plus its own
# partition (measured: 2.05 GB on a 1.21 GB model at world size 2). Here the model is built partitioned
# (``from_config`` inside ``deepspeed.zero.Init``) and each parameter is gathered, filled by rank 0 from the one
# open shard, and re-partitioned (``GatheredParameters(modifier_rank=0)``, as transformers does per module), so
# rank 0 holds its partition, one parameter and one shard's pages. Checkpoints whose tensor names are not
# exactly the model's parameter names go through transformers' loader instead.


def _zero3_active() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _import_model_class(config) -> None:
    """Import the architecture's modeling module now, outside ``deepspeed.zero.Init``.

    Root cause of ``AttributeError: 'LlamaAttention' object has no attribute '_kernel_funcs'`` at the first ZeRO-3
    forward on a pretrained SmolLM2 (transformers 5.x with ``kernels`` installed). transformers imports modeling
    modules lazily, on first use. When that first use is ``from_config`` inside ``zero.Init``, every ``nn.Module``
    class the import creates passes through ``zero.Init``'s ``__init_subclass__`` hook, which saves the class's
    ``__init__`` as ``_old_init`` *at class creation* and wraps it. Only then do class decorators run:
    ``@use_kernelized_func`` (kernels, on the attention classes) replaces ``__init__`` with one that also sets
    ``self._kernel_funcs``, and ``forward`` with one that reads it. Modules built inside that ``zero.Init`` are
    fine; but on leaving it DeepSpeed puts ``_old_init`` back (``partition_parameters.py``: ``_disable_class``), the
    undecorated ``__init__``, while the decorated ``forward`` stays, so every model of that class built *afterwards*
    in the process lacks the attribute its ``forward`` reads. Tied checkpoints met it: their names did not match the
    untied build (see ``load_model``), so they went on to transformers' own loader, a second build. A module
    imported before ``zero.Init`` is entered keeps its decorated ``__init__`` through any number of builds.
    A model from ``trust_remote_code`` is imported by ``from_config`` as before.
    """
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM._model_mapping[type(config)]  # the lazy mapping imports the modeling module
    except KeyError:
        pass


@contextlib.contextmanager
def _partitioned_without_init():
    """Build under ``deepspeed.zero.Init`` without initialising weights the checkpoint overwrites anyway.

    ``from_config`` alone would gather every module, random-initialise it on rank 0 and broadcast it
    (``initialize_weights_zero3``): a wasted pass over all the weights (140 GB of broadcasts at 70B). These are the
    contexts transformers 5.x itself enters for ZeRO-3 construction, minus that pass; where they are missing (another
    transformers version), the model is built the ordinary way.
    """
    try:
        import deepspeed
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import deepspeed_config, prevent_arange_dtype_change
        from transformers.modeling_utils import set_zero3_state
    except ImportError:
        yield
        return
    with no_init_weights(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=deepspeed_config()), set_zero3_state():
        yield


def _weight_map(path: Path) -> dict[str, str] | None:
    """Tensor name -> shard file, from ``model.safetensors.index.json`` or the single ``model.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index}: not a safetensors index (expected a 'weight_map' of tensor -> file)") from None
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single.name for name in f.keys()}
    return None


def _stream_into_partitions(model: torch.nn.Module, path: Path, weight_map: dict[str, str]) -> bool:
    """Fill a ZeRO-3-partitioned ``model`` from its shards; False (nothing loaded) if the names do not match."""
    import deepspeed
    import torch.distributed as tdist
    from safetensors import safe_open

    params = dict(model.named_parameters())  # tied weights appear once
    stored = {n for n in weight_map if not n.endswith("rotary_emb.inv_freq")}  # old checkpoints kept a buffer
    if set(params) - stored or stored - set(params):
        return False
    rank0 = tdist.get_rank() == 0
    by_file: dict[str, list[str]] = {}
    for name in params:
        by_file.setdefault(weight_map[name], []).append(name)
    # Every rank checks the shapes from the shard headers (cheap) before the first collective, so a bad checkpoint
    # stops all ranks with one message instead of leaving the others waiting in an all-gather.
    for file, names in sorted(by_file.items()):
        try:
            with safe_open(str(path / file), framework="pt") as shard:
                for name in names:
                    have, want = tuple(shard.get_slice(name).get_shape()), tuple(getattr(params[name], "ds_shape",
                                                                                         params[name].shape))
                    if have != want:
                        raise UserError(f"{path / file}: tensor {name} has shape {have}, the model's config.json "
                                        f"needs {want}")
        except (OSError, RuntimeError, ValueError) as e:  # safetensors raises SafetensorError (a RuntimeError)
            raise UserError(f"{path / file}: cannot read the safetensors shard ({e})") from None
    for file, names in sorted(by_file.items()):
        shard = safe_open(str(path / file), framework="pt") if rank0 else None
        try:
            for name in names:
                param = params[name]
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank0:
                        param.data.copy_(shard.get_tensor(name))
        finally:
            del shard  # unmaps the file
    return True
