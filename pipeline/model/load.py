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

    Cheap on every rank (called before any process group exists): it reads ``config.json``, the shard index and
    each weight file's header, never the weights.

    Raises:
        UserError: not a directory (or a GGUF file, which it says how to convert), no ``config.json``, no tokenizer,
            no safetensors weights, a shard the index names that is missing, or a weight file that is truncated or
            whose header is not a safetensors header.
    """
    p = Path(path).expanduser()
    if p.is_file() and _is_gguf(p):
        raise UserError(_gguf_hint(p, f"model.name_or_path={p} is a GGUF file, not a model directory"))
    if not p.is_dir():
        raise UserError(f"model directory not found: {p} (config key 'model.name_or_path'; models are loaded "
                        f"from local directories only, nothing is downloaded)")
    cfg_file = p / "config.json"
    ggufs = sorted(f for f in p.glob("*.gguf") if f.is_file())
    if not cfg_file.is_file():
        if ggufs:
            raise UserError(_gguf_hint(ggufs[0], f"{p} holds a GGUF file ({ggufs[0].name}) and no config.json"))
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
    files = weight_files(p)
    if not files:
        if ggufs:
            raise UserError(_gguf_hint(ggufs[0], f"{p} holds a GGUF file ({ggufs[0].name}) and no *.safetensors "
                                                 f"weights"))
        raise UserError(f"{p} has no *.safetensors weights; this pipeline does not unpickle .bin/.pt weights. "
                        f"Convert them once (load and save_pretrained(safe_serialization=True)) in a trusted "
                        f"environment")
    for file in files:
        safetensors_header(file)  # a truncated or corrupt file fails here, not mid-load on one rank
    return config


def _is_gguf(file: Path) -> bool:
    try:
        with open(file, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf_hint(gguf_file: Path, what: str) -> str:
    return (f"{what}: this pipeline trains Hugging Face safetensors directories; convert it once with "
            f"`python launch/import_gguf.py {gguf_file} OUT_DIR`, then set model.name_or_path=OUT_DIR")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads from ``path``: ``model.safetensors``, else every shard that
    ``model.safetensors.index.json`` names, else whatever ``*.safetensors`` the directory holds.

    Raises:
        UserError: an index that is not one, or that names shard files the directory does not hold.
    """
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(_read_index(index).values()))
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UserError(f"{index} names {len(shards)} shard files and {len(missing)} of them "
                            f"{'is' if len(missing) == 1 else 'are'} missing from {path}: {shown}; copy the "
                            f"complete checkpoint (every file the index names) again")
        return [path / name for name in shards]
    return sorted(f for f in path.glob("*.safetensors") if f.is_file())


SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too


def _read_index(index: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a ``model.safetensors.index.json``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
        return dict(weight_map)
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{index}: not a safetensors index (expected a 'weight_map' of tensor -> file); copy "
                        f"it again with the shards it came with") from None


def safetensors_header(file: Path) -> dict[str, dict]:
    """A safetensors file's tensors (name -> ``dtype``, ``shape``, ``data_offsets``), read from its header alone.

    The format: 8 bytes, the little-endian length N of a JSON header; N bytes of that header; then the data, where
    each tensor's ``data_offsets`` (relative to the data's start) must lie. A file cut short (an interrupted copy or
    download) fails here in microseconds instead of mid-load, on one rank, with a library traceback.

    Raises:
        UserError: a file too short for its header or for the data its header describes, or a header that is not a
            safetensors header (a Git LFS pointer is named as such).
    """
    again = "copy it again (or download it again) from where the model came from"
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if head[:7] == b"version" and b"git-lfs" in f.read(100):
            raise UserError(f"{file} is a Git LFS pointer ({size} bytes), not the weights; fetch them with "
                            f"`git lfs pull` in the model's repository, or download the file itself")
        if len(head) < 8:
            raise UserError(f"{file} is truncated: {size} bytes, too short even for a safetensors header; {again}")
        n = int.from_bytes(head, "little")
        if n > SAFETENSORS_MAX_HEADER:
            raise UserError(f"{file} is not a safetensors file (its first 8 bytes give a {n:,}-byte header); {again}")
        if 8 + n > size:
            raise UserError(f"{file} is truncated: its header alone needs {8 + n:,} bytes, the file has {size:,}; "
                            f"{again}")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
        tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
        end = max((int(e["data_offsets"][1]) for e in tensors.values()), default=0)
        if not all(isinstance(e["shape"], list) for e in tensors.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # JSONDecodeError is a ValueError
        raise UserError(f"{file}: its header is not a valid safetensors header (bytes 8 to {8 + n:,} should hold "
                        f"JSON naming each tensor's dtype, shape and data_offsets); {again}") from None
    if 8 + n + end > size:
        raise UserError(f"{file} is truncated: its header describes {8 + n + end:,} bytes, the file has {size:,} "
                        f"({8 + n + end - size:,} missing); {again}")
    return tensors


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
    """The run's tokenizer (``model.name_or_path``), checked against the embedding it will index.

    Raises:
        UserError: a tokenizer with more tokens than the model has embedding rows (``model.shape.vocab_size`` for
            random weights, else the ``vocab_size`` of the directory's ``config.json``): its highest ids would index
            past the embedding mid-run. More rows than tokens is normal (padded vocabularies).
    """
    path = Path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(str(path), cfg.model.trust_remote_code)
    if cfg.model.random_init:
        if len(tokenizer) > cfg.model.shape.vocab_size:
            raise UserError(f"the tokenizer of {path} has {len(tokenizer):,} tokens, more than "
                            f"model.shape.vocab_size={cfg.model.shape.vocab_size:,}; use a matching tokenizer")
        return tokenizer
    vocab = config_vocab_size(json.loads((path / "config.json").read_text()))  # checked by check_model_dir
    if vocab is not None and len(tokenizer) > vocab:
        tok_file = next(path / name for name in TOKENIZER_FILES if (path / name).is_file())
        raise UserError(f"the tokenizer in {tok_file} has {len(tokenizer):,} tokens, more than the model's "
                        f"{vocab:,} embedding rows (vocab_size in {path / 'config.json'}): ids {vocab:,} and up "
                        f"would index past the embedding; use the tokenizer that came with these weights")
    return tokenizer


def config_vocab_size(config: dict) -> int | None:
    """The number of embedding rows a ``config.json`` declares (its ``text_config``'s for a nested config)."""
    text = config.get("text_config")
    vocab = text.get("vocab_size") if isinstance(text, dict) and "vocab_size" in text else config.get("vocab_size")
    return vocab if isinstance(vocab, int) else None


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
        from transformers.integrations.deepspeed import (
            deepspeed_config,
            prevent_arange_dtype_change,
        )
        from transformers.modeling_utils import set_zero3_state
    except ImportError:
        yield
        return
    with no_init_weights(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=deepspeed_config()), set_zero3_state():
        yield


def _weight_map(path: Path) -> dict[str, str] | None:
    """Tensor name -> shard file, from ``model.safetensors.index.json`` or the single ``model.safetensors``."""
    single = path / "model.safetensors"
    if single.is_file():  # what from_pretrained reads first, as weight_files
        return {name: single.name for name in safetensors_header(single)}
    index = path / SAFETENSORS_INDEX
    return _read_index(index) if index.is_file() else None


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
        header = safetensors_header(path / file)
        for name in names:
            if name not in header:
                raise UserError(f"{path / SAFETENSORS_INDEX} puts tensor {name} in {file}, whose header does not "
                                f"list it; copy the checkpoint again, index and shards together")
            have, want = tuple(header[name]["shape"]), tuple(getattr(params[name], "ds_shape", params[name].shape))
            if have != want:
                raise UserError(f"{path / file}: tensor {name} has shape {have}, the model's config.json needs {want}")
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
