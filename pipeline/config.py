"""Typed training recipes: dataclasses, YAML files, ``key.sub=value`` overrides and validation.

This module is the ground floor: it imports nothing heavy (no torch, no DeepSpeed), so a misspelled key is
reported in well under a second, before any process group or model exists.

A recipe is a YAML mapping with the sections below; every field is optional and documented on its dataclass.
Unknown keys are errors that name the nearest valid key (a typo must never silently switch a feature off).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

#: Root of the source tree (where ``deepspeed_configs/`` and ``launch/configs/`` live), in a checkout.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: The same folders as an installed wheel carries them, inside the package (pyproject.toml's ``package-dir``).
SHIPPED = {"deepspeed_configs": Path(__file__).resolve().parent / "deepspeed_configs",
           "launch/configs": Path(__file__).resolve().parent / "recipes"}


def shipped_candidates(path: str | os.PathLike) -> list[Path]:
    """Where a relative path may be found besides the working directory: in the checkout, and, for the shipped
    recipes and DeepSpeed JSONs (``launch/configs/X.yaml``, ``deepspeed_configs/X.json``), in the installed
    package. A bare recipe name (``llama3-8b``, ``llama3-8b.yaml``) means the shipped recipe of that name."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return []
    out = [PROJECT_ROOT / p]
    text = p.as_posix()
    for prefix, folder in SHIPPED.items():
        if text.startswith(prefix + "/"):
            out.append(folder / text[len(prefix) + 1:])
    if len(p.parts) == 1:
        name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
        out += [PROJECT_ROOT / "launch" / "configs" / name, SHIPPED["launch/configs"] / name]
    return out

BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATA = "builtin:tiny-instruct"

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(UserError):
    """A recipe, override or DeepSpeed JSON is invalid."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def _check_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"must be one of {', '.join(choices)}; got '{value}'")


@dataclass
class ModelShapeConfig:
    """The architecture a recipe is sized for (Llama layout; 0 = not declared). When declared, the model
    directory's ``config.json`` must agree (a 13B path under a 7B recipe is refused); ``launch/plan.py`` sizes
    memory from it without weights, and ``model.random_init`` builds a model of this shape."""

    hidden_size: int = 0
    """Model width (d_model)."""
    num_hidden_layers: int = 0
    """Transformer blocks."""
    num_attention_heads: int = 0
    """Query heads."""
    num_key_value_heads: int = 0
    """Key/value heads (fewer than query heads: grouped-query attention)."""
    intermediate_size: int = 0
    """MLP width (gate/up/down projections)."""
    vocab_size: int = 0
    """Tokenizer vocabulary (embedding and LM-head rows)."""
    max_position_embeddings: int = 0
    """Longest context the model was trained for."""
    rope_theta: float = 0.0
    """RoPE base frequency."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check(value >= 0, f"model.shape.{f.name}", f"must be >= 0 (0: not declared); got {value}")
        if self.num_attention_heads and self.hidden_size:
            _check(self.hidden_size % self.num_attention_heads == 0, "model.shape.num_attention_heads",
                   f"({self.num_attention_heads}) must divide model.shape.hidden_size ({self.hidden_size})")
        if self.num_attention_heads and self.num_key_value_heads:
            _check(self.num_attention_heads % self.num_key_value_heads == 0, "model.shape.num_key_value_heads",
                   f"({self.num_key_value_heads}) must divide model.shape.num_attention_heads "
                   f"({self.num_attention_heads})")

    def declared(self) -> dict[str, int | float]:
        """The fields a recipe sets, as ``transformers`` config keys."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name)}

    def missing(self) -> list[str]:
        """Dimensions still 0 that a model built from the shape alone needs (the others have Llama defaults)."""
        needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size")
        return [f"model.shape.{name}" for name in needed if not getattr(self, name)]


@dataclass
class ModelConfig:
    """The base model."""

    name_or_path: str = BUILTIN_MODEL
    """Local Hugging Face model directory (Llama 2/3, Mistral, Qwen2 layouts). ``builtin:tiny-llama`` builds a
    tiny Llama and tokenizer offline, once, into the cache (``LORAPLUS_CACHE`` or ``~/.cache/loraplus``)."""
    attn_implementation: str = "sdpa"
    """``sdpa``, ``eager`` or ``flash_attention_2`` (the last needs the flash-attn package and a GPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    trust_remote_code: bool = False
    """Run Python code shipped inside the model directory. Off unless you trust the directory."""
    random_init: bool = False
    """Build a Llama of ``model.shape`` with random weights instead of loading ``name_or_path`` (benchmarks and
    memory checks without weights). The tokenizer comes from ``name_or_path`` if it is a model directory, else
    from the embedded tiny model."""
    shape: ModelShapeConfig = field(default_factory=ModelShapeConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path), "model.name_or_path", "must name a local model directory")
        _check_choice(self.attn_implementation, "model.attn_implementation", ("sdpa", "eager", "flash_attention_2"))
        if self.random_init:
            _check(not self.shape.missing(), "model.random_init",
                   f"needs the whole model.shape; missing: {', '.join(self.shape.missing())}")


@dataclass
class DataConfig:
    """The training data."""

    path: str = BUILTIN_DATA
    """A ``.jsonl``, ``.json`` or ``.parquet`` file, or a directory written by ``datasets.save_to_disk``.
    ``builtin:tiny-instruct`` is the small instruction set bundled with the project."""
    format: str = "auto"
    """``auto`` (the default: each sample in the format its fields name: ``messages``, ``conversations``, ``prompt``/
    ``completion``, ``instruction``, ``text``, in that order), ``text`` (field ``text``; loss on every token),
    ``instruction`` (Alpaca: ``instruction``, optional ``input``, ``output``; loss on the output only),
    ``prompt_completion`` (``prompt`` and ``completion``, no template; loss on the completion only, as TRL's
    prompt-completion type), ``chat`` (OpenAI ``messages`` with ``role``/``content``) or
    ``sharegpt`` (``conversations`` with ``from``/``value``; roles ``system``, ``human``/``user``,
    ``gpt``/``assistant``). The last two are rendered by the tokenizer's chat template, loss on assistant turns
    only."""
    split: str = "train"
    """Split to read when ``path`` is a saved ``DatasetDict``."""
    packing: bool = False
    """Fill rows of up to ``train.seq_len`` tokens with whole samples (best-fit bin packing; a sample is split
    over rows only when it is longer than a row). Samples in a row do not attend to each other: positions restart
    at each sample and attention stays inside it."""
    too_long: str = "truncate"
    """Without packing, a sample longer than ``train.seq_len``: ``truncate`` (counted and reported) or ``refuse``
    (stop with an error naming the sample)."""
    cache_dir: str = ""
    """Where prepared (tokenised, packed) data is cached, keyed by the data's content, the tokenizer and these
    settings; empty: ``$LORAPLUS_CACHE/data`` (default ``~/.cache/loraplus/data``). On a cluster, a shared
    filesystem: one job builds it, every rank of every later job memory-maps it."""
    num_proc: int = 0
    """Processes that tokenise while the cache builds (``datasets.map(num_proc=...)``); 0: one per core, up to 8
    (one for small files)."""
    val_path: str = ""
    """A held-out validation file in the training data's format (same kinds of file as ``path``)."""
    val_fraction: float = 0.0
    """Instead of ``val_path``: hold out this fraction of the training samples, in (0, 0.5], as the validation
    set (a fixed seeded split, the same whatever ``seed``; never trained on). 0: none."""

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.path", "must name a data file or directory")
        _check_choice(self.format, "data.format", ("auto", "text", "instruction", "prompt_completion", "chat",
                                                   "sharegpt"))
        _check_choice(self.too_long, "data.too_long", ("truncate", "refuse"))
        _check(self.num_proc >= 0, "data.num_proc", f"must be >= 0 (0: one per core); got {self.num_proc}")
        _check(self.val_fraction == 0 or 0 < self.val_fraction <= 0.5, "data.val_fraction",
               f"must be in (0, 0.5] (or 0 for none); got {self.val_fraction}")
        _check(not (self.val_path and self.val_fraction), "data.val_fraction",
               "and data.val_path both set; choose one validation set")


#: ``lora.init_lora_weights`` values besides ``pissa_niter_<N>``.
LORA_INITS = ("default", "gaussian", "pissa", "olora")


@dataclass
class LoraConfig:
    """The LoRA adapter (injected by PEFT)."""

    r: int = 16
    """Rank of each adapter."""
    alpha: float = 32.0
    """Scaling numerator: the update is ``(alpha / r) * B @ A``."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    """Module names to adapt; the default is every attention and MLP projection of a Llama block."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski, arXiv 2312.03732): scale the update by ``alpha / sqrt(r)`` instead of
    ``alpha / r`` (PEFT's ``use_rslora``, saved as such in the adapter's config)."""
    use_dora: bool = False
    """DoRA (Liu et al., arXiv 2402.09353): each adapted weight as a magnitude vector times a LoRA-updated
    direction (PEFT's ``use_dora``). The magnitudes train in a group of their own, at ``optim.dora_magnitude_ratio``
    times lr_A, without weight decay."""
    init_lora_weights: str = "default"
    """How the adapters start. ``default``: PEFT's default (A Kaiming-uniform, B zero), the behaviour before this
    key existed; ``gaussian``: PEFT's ``gaussian`` (A ~ N(0, 1/r), B zero); ``pissa``: PiSSA (Meng et al., arXiv
    2404.02948), A and B from the r principal singular vectors of each adapted weight, the weight keeping the
    residual; ``pissa_niter_<N>``: the same by a randomised SVD of N subspace iterations (faster on large weights);
    ``olora``: OLoRA (Buyukakyuz, arXiv 2406.01775), A and B from a QR decomposition of the weight. With the last
    three the run keeps the initial factors in ``output_dir/lora_init/`` and every saved adapter is converted
    (PEFT's PiSSA/OLoRA conversion, rank 2r) to apply to the original base model."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", f"must be >= 1; got {self.r}")
        init = self.init_lora_weights
        niter = init.removeprefix("pissa_niter_")
        _check(init in LORA_INITS or (niter != init and niter.isdigit() and int(niter) >= 1),
               "lora.init_lora_weights", f"must be one of {', '.join(LORA_INITS)} or pissa_niter_<N> (N >= 1 "
               f"subspace iterations); got '{init}'")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0; got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1); got {self.dropout}")
        _check(len(self.target_modules) > 0, "lora.target_modules", "must list at least one module name")


@dataclass
class OptimConfig:
    """The LoRA+ optimizer."""

    lr: float = 1e-3
    """Learning rate of the LoRA A matrices (and of any other trainable non-LoRA parameter). The default suits
    the embedded tiny model; the shipped 7B-70B recipes set 5e-5 to 1e-4."""
    loraplus_ratio: float = 16.0
    """lambda = lr_B / lr_A. 1 gives plain LoRA."""
    loraplus_lr_embedding: float = 1e-6
    """Learning rate of LoRA adapters on embedding layers (both A and B), as in the LoRA+ reference code."""
    dora_magnitude_ratio: float = 16.0
    """lr of DoRA's magnitude vectors / lr_A (``lora.use_dora``), without weight decay. 16 was measured best of 1 and
    16 on SmolLM2 (DoRA with lambda 16) and of 0-64 on the paper's toy extended to DoRA, where with lambda 16 the
    magnitudes want 16-64 times lr_A and with lambda 1 anything from 1 to 16 does (bench/README.md). Peers put the
    magnitudes into B's group (lambda times lr_A, with B's weight decay) because they are 1-D: at lambda 16 the
    same lr, but not at another lambda, and decayed."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices; biases and norms never decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (DeepSpeed ``gradient_clipping``); 0 disables clipping."""
    optimizer: str = "auto"
    """``auto`` (DeepSpeedCPUAdam when the DeepSpeed JSON offloads the optimizer, fused torch AdamW on GPU,
    torch AdamW on CPU), ``adamw``, ``adamw_fused`` or ``cpu_adam``."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0; got {self.lr}")
        _check(self.loraplus_ratio > 0, "optim.loraplus_ratio", f"must be > 0; got {self.loraplus_ratio}")
        _check(self.loraplus_lr_embedding >= 0, "optim.loraplus_lr_embedding", "must be >= 0")
        _check(self.dora_magnitude_ratio > 0, "optim.dora_magnitude_ratio",
               f"must be > 0; got {self.dora_magnitude_ratio}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0; got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               f"must be two numbers in [0, 1); got {self.betas}")
        _check(self.eps > 0, "optim.eps", "must be > 0")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _check_choice(self.optimizer, "optim.optimizer", ("auto", "adamw", "adamw_fused", "cpu_adam"))


@dataclass
class ScheduleConfig:
    """The learning-rate schedule: a multiplier applied to every group's own base lr."""

    name: str = "cosine"
    """``constant``, ``linear`` or ``cosine`` (after warmup)."""
    warmup_steps: int = 0
    """Linear warmup from ``1/warmup_steps`` of each group's lr to its full lr."""
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of each group's base lr (linear and cosine)."""

    def __post_init__(self) -> None:
        _check_choice(self.name, "schedule.name", ("constant", "linear", "cosine"))
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0; got {self.warmup_steps}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")


@dataclass
class TrainConfig:
    """Steps, batch shape and checkpoint cadence."""

    max_steps: int = 150
    """Optimizer steps to run."""
    micro_batch_size: int = 8
    """Samples per rank per forward pass (DeepSpeed ``train_micro_batch_size_per_gpu``)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Global batch = micro_batch_size * grad_accum * world size."""
    seq_len: int = 256
    """Longest sample, in tokens (see ``data.too_long``)."""
    save_every: int = 50
    """Save a checkpoint every N steps (0: only at the end). The final step is always saved, and so is the step
    at which a SIGTERM/SIGINT stops the run. The default gives the embedded default's 60 steps three checkpoints
    to score; the shipped recipes for real models set their own."""
    keep_last: int = 0
    """Keep only the newest K checkpoints (0: keep all). Older ones are deleted only after a newer one is
    complete."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one GPU (or CPU rank) for ``mfu``/``hfu`` in ``metrics.jsonl``. 0: from the GPU name
    (H100/H200 989, A100 312, L40S 362; bf16 dense); on CPU or another GPU ``mfu`` is then null."""
    eval_every: int = 0
    """With a validation set (``data.val_path`` or ``data.val_fraction``): its loss is computed before the first
    update (step 0), every N steps and at the end, into ``output_dir/val.jsonl``. 0: at step 0 and at the end."""
    precision: str = "auto"
    """``bf16`` or ``fp32`` weights and compute, whatever the DeepSpeed JSON says (a JSON that disagrees is
    overridden, with one line saying so); ``auto``: the JSON's precision on GPU, fp32 on CPU. bf16 runs on CPU too
    (DeepSpeed's CPU accelerator), slower but the same code path as a GPU run. bf16 needs ZeRO stage 1 or more."""
    loss_chunk: int = 1024
    """The loss is computed from the final hidden states in chunks of at most this many labelled tokens, each
    chunk's logits in fp32 and freed before the next, so the whole ``[batch, seq, vocab]`` logits never exist
    (with Llama-3's 128k vocabulary they are the largest tensor of a step). 0: the full-logits loss."""
    on_nonfinite: str = "skip"
    """A step whose loss or gradient norm is NaN/inf: ``skip`` it (no update; counted in ``metrics.jsonl``) or
    ``stop`` the run with an error. Either way the optimizer state and the checkpoints stay finite."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum", "seq_len"):
            value = getattr(self, key)
            _check(value >= 1, f"train.{key}", f"must be >= 1; got {value}")
        _check(self.peak_tflops >= 0, "train.peak_tflops",
               f"must be >= 0 (0: from the GPU name); got {self.peak_tflops}")
        for key in ("save_every", "keep_last", "eval_every"):
            _check(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0; got {getattr(self, key)}")
        _check_choice(self.precision, "train.precision", ("auto", "bf16", "fp32"))
        _check(self.loss_chunk >= 0, "train.loss_chunk",
               f"must be >= 0 (0: the full-logits loss); got {self.loss_chunk}")
        _check(self.on_nonfinite in ("skip", "stop"), "train.on_nonfinite",
               f"must be 'skip' or 'stop'; got {self.on_nonfinite!r}")


@dataclass
class MmluEvalConfig:
    """MMLU scoring of checkpoints while the run trains (lm-evaluation-harness; see ``eval/``)."""

    every_checkpoint: str = "auto"
    """Score the base model (step 0) and each checkpoint after it is saved (``runner`` says how); the run ends by
    printing the table. ``true``, ``false``, or ``auto``: on for the embedded tiny model only."""
    runner: str = "engine"
    """Who scores: ``engine`` (default), the training ranks themselves, on the live DeepSpeed engine (training
    pauses; every rank scores its share of the questions on the model it already holds, sharded as it trains: no
    second copy, no reload), or ``process``, a background process started by rank 0 that loads the base model and
    the checkpoint's adapter again, on ``device`` (training does not wait; what ``loraplus-watch`` runs on another
    node). Measured: the embedded default ends in 31 s with ``engine`` and 40 s with ``process``; SmolLM2's job
    peaks at 5.55 GiB against 12.19 (bench/README.md). See docs/evaluation.md."""
    data: str = "sample"
    """A local cais/mmlu copy (hub or CSV layout), or ``sample`` (the bundled stand-in, for the tiny default)."""
    num_fewshot: str = "auto"
    """Shots per question, from each subject's dev split: a number, or ``auto``: 5 (MMLU's standard), and 0 for the
    embedded tiny model (2 layers, pretrained on ~20-token texts: a 300-token 5-shot prompt is beyond it)."""
    limit: int = 0
    """Score only the first K questions of each subject (0: all)."""
    subjects: str = ""
    """Score only these MMLU subjects, comma-separated (``anatomy,virology``); empty: all 57, with MMLU's groups.
    A score of some subjects is recorded as such, and is not the MMLU score."""
    log_samples: bool = False
    """Also write each request's log-likelihood beside each score (``mmlu_samples.jsonl``): what two scorers of
    one checkpoint can be compared on, request by request."""
    batch_size: str = "auto"
    """Rows per forward: a number (it wins), or ``auto``. ``process``: lm-eval's own search on a GPU, and on CPU the
    largest batch that keeps the scorer within ``memory_gb`` for the requests at hand (sized again as they get
    shorter). ``engine``: up to 64 rows and ``train.micro_batch_size`` x ``train.seq_len`` tokens a forward (one row
    at least), what a training micro-batch holds."""
    device: str = "cpu"
    """Where the background scorer runs: ``cpu`` (default, leaves the training GPUs alone) or ``cuda:N``, GPU N of
    the node as the launcher numbers them (the scorer sees only that GPU). Pick one no training rank uses."""
    memory_gb: str = "auto"
    """CPU scoring with ``batch_size: auto``: the most resident memory (GiB) the scorer process may hold, its model
    included; each batch is sized from the model's vocabulary and the requests' length to what is left
    (``pipeline/eval/score.py``, ``MemoryBudgetHFLM``). A number > 0, or ``auto``: half of the memory available
    (``MemAvailable``) when the scorer starts, leaving the other half to the training ranks beside it. Not used on
    a GPU (lm-eval's own search) or with a numeric ``batch_size``."""

    def __post_init__(self) -> None:
        _check(self.every_checkpoint in ("auto", "true", "false"), "eval.mmlu.every_checkpoint",
               f"must be true, false or auto; got {self.every_checkpoint!r}")
        _check(self.num_fewshot == "auto" or self.num_fewshot.isdigit(), "eval.mmlu.num_fewshot",
               f"must be a number >= 0 or auto; got {self.num_fewshot!r}")
        _check(self.limit >= 0, "eval.mmlu.limit", f"must be >= 0; got {self.limit}")
        _check(self.batch_size == "auto" or self.batch_size.isdigit(), "eval.mmlu.batch_size",
               f"must be a number or 'auto'; got {self.batch_size!r}")
        try:
            self.parse_memory_gb(self.memory_gb)
        except ValueError as e:
            _check(False, "eval.mmlu.memory_gb", str(e))
        plain = "; plain 'cuda' is GPU 0, rank 0's training GPU: name the one to use" if self.device == "cuda" else ""
        _check(self.device == "cpu" or re.fullmatch(r"cuda:\d+", self.device) is not None, "eval.mmlu.device",
               f"must be cpu or cuda:N (a GPU index); got {self.device!r}{plain}")
        _check(self.runner in ("process", "engine"), "eval.mmlu.runner",
               f"must be process or engine; got {self.runner!r}")
        if self.runner == "engine":  # the process runner's own settings mean nothing to the training ranks
            _check(self.device == "cpu", "eval.mmlu.device", f"is the process runner's; with eval.mmlu.runner=engine "
                   f"(the default) the training ranks score on their own devices (got {self.device!r}): drop it, or "
                   f"set eval.mmlu.runner=process")
            _check(self.memory_gb == "auto", "eval.mmlu.memory_gb", f"is the process runner's; with "
                   f"eval.mmlu.runner=engine (the default) batches follow the training batch (got "
                   f"{self.memory_gb!r}): drop it, or set eval.mmlu.runner=process")
        try:
            self.parse_subjects(self.subjects)
        except ValueError as e:
            _check(False, "eval.mmlu.subjects", str(e))

    @staticmethod
    def parse_subjects(text: str) -> list[str]:
        """``subjects`` (``eval.mmlu.subjects``, ``--subjects``) as a list; empty for all. Whether each is one of
        lm-eval's subjects is :func:`pipeline.eval.mmlu.check_subjects`'s to say (it reads lm-eval's task files).

        Raises:
            ValueError: a name that is not a subject's form (lower-case words joined by ``_``), or one given twice.
        """
        chosen = [x.strip() for x in text.split(",") if x.strip()]
        for name in chosen:
            if re.fullmatch(r"[a-z_]+", name) is None:
                raise ValueError(f"{name!r} is not an MMLU subject name (such as high_school_physics); got {text!r}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"names a subject twice; got {text!r}")
        return chosen

    @staticmethod
    def parse_memory_gb(text: str) -> float | None:
        """``memory_gb`` (``eval.mmlu.memory_gb``, ``--memory-gb``) in GiB; ``None`` for ``auto``.

        Raises:
            ValueError: neither a finite number > 0 nor ``auto``; the message ends with the value given.
        """
        if text == "auto":
            return None
        try:
            gib = float(text)
        except ValueError:
            gib = float("nan")
        if not 0 < gib < float("inf"):  # NaN compares false
            raise ValueError(f"must be a number of GiB > 0, or auto; got {text!r}")
        return gib


@dataclass
class EvalConfig:
    """Evaluation of checkpoints."""

    mmlu: MmluEvalConfig = field(default_factory=MmluEvalConfig)


@dataclass
class LoggingConfig:
    """Experiment trackers, beside ``metrics.jsonl`` (which is always written). Rank 0 logs; see
    ``pipeline/observe/trackers.py``."""

    tensorboard: bool = False
    """TensorBoard event files under ``output_dir/tensorboard/`` (``tensorboard --logdir`` that directory)."""
    wandb: bool = False
    """A Weights & Biases run (``WANDB_MODE=offline`` and ``WANDB_DIR`` are W&B's own and honoured; the default
    directory is ``output_dir``). A resumed run, and ``eval/watch.py``, log into the same W&B run."""
    wandb_project: str = ""
    """W&B project (empty: ``WANDB_PROJECT``, else W&B's default)."""
    wandb_name: str = ""
    """W&B run name (empty: the name of ``output_dir``)."""


@dataclass
class Config:
    """A whole training recipe."""

    output_dir: str = "runs/tiny-default"
    """Where ``config.yaml``, ``metrics.jsonl`` and ``checkpoints/`` go."""
    seed: int = 42
    """Model and LoRA initialisation use this seed on every rank; data order uses (seed, epoch)."""
    deepspeed_config: str = "deepspeed_configs/zero2.json"
    """DeepSpeed JSON (ZeRO, offload and precision only). Relative paths are tried from the working directory,
    then from the project root. ``--deepspeed_config`` on the command line overrides it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "output_dir", "must not be empty")
        _check(0 <= self.seed < 2 ** 32, "seed", f"must be in [0, 2**32); got {self.seed}")
        _check(bool(self.deepspeed_config), "deepspeed_config", "must name a DeepSpeed JSON file")
        longest = self.model.shape.max_position_embeddings
        _check(not longest or self.train.seq_len <= longest, "train.seq_len",
               f"({self.train.seq_len}) exceeds the model's context, model.shape.max_position_embeddings ({longest})")
        _check(not self.train.eval_every or bool(self.data.val_path or self.data.val_fraction), "train.eval_every",
               "needs a validation set: set data.val_path or data.val_fraction")
        _check(self.schedule.warmup_steps <= self.train.max_steps, "schedule.warmup_steps",
               f"({self.schedule.warmup_steps}) must not exceed train.max_steps ({self.train.max_steps})")


# ----------------------------------------------------------------------------------------------------------
# Building a Config from nested mappings, with typed coercion and helpful errors


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config dataclass, e.g. ``optim.loraplus_ratio``."""
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key(key: str, where: str) -> ConfigError:
    valid = all_keys() + [f.name for f in dataclasses.fields(Config)]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a typo in the last part only: compare leaf names
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in all_keys()}
        hit = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[hit[0]]] if hit else []
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(all_keys())}"
    return ConfigError(f"unknown config key '{key}' ({where}){hint}")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Coerce a YAML value to a field's declared type, or raise a ConfigError that names the key."""
    origin = typing.get_origin(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}' ({where}) must be {expected}; got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if tp is str:
        if isinstance(value, bool):  # YAML's true/false, for keys such as eval.mmlu.every_checkpoint (true/false/auto)
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad("a string")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # "q_proj,v_proj" on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return [_coerce(v, item_tp, key, where) for v in value]
    raise TypeError(f"unsupported field type {tp} for {key}")  # a bug in this module, not user input


def _source(where: dict[str, str], key: str) -> str:
    """Where a key (or, for a section, any key below it) was set: a recipe path or 'command line'."""
    if key in where:
        return where[key]
    return next((src for k, src in where.items() if k.startswith(key + ".")), "recipe")


def _build(cls: type, values: dict[str, Any], prefix: str, where: dict[str, str]) -> Any:
    types = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types:
            raise _unknown_key(key, _source(where, key))
        tp = types[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' ({_source(where, key)}) must be a mapping of "
                                  f"{', '.join(_field_types(tp))}; got {value!r}")
            kwargs[name] = _build(tp, value, f"{key}.", where)
        else:
            kwargs[name] = _coerce(value, tp, key, _source(where, key))
    for name, tp in types.items():  # sections absent from the recipe still get validated defaults
        if dataclasses.is_dataclass(tp) and name not in kwargs:
            kwargs[name] = tp()
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}' (command line): '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.sub=value`` into the key and a YAML-typed value (``3`` -> int, ``[a, b]`` -> list)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"cannot read command-line argument '{text}': overrides are written key.sub=value "
                          f"(e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe into a nested dict; errors name the file and line."""
    p = Path(path).expanduser()
    if not p.is_file():
        found = [c for c in shipped_candidates(p) if c.is_file()]
        if not found:
            shipped = sorted(x.stem for x in SHIPPED["launch/configs"].glob("*.yaml")) or sorted(
                x.stem for x in (PROJECT_ROOT / "launch" / "configs").glob("*.yaml"))
            raise ConfigError(f"recipe file not found: {p} (a path, or the name of a shipped recipe: "
                              f"{', '.join(shipped)})")
        p = found[0]
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: a recipe must be a YAML mapping of sections, got {type(tree).__name__}")
    return tree


def make_config(recipe: str | os.PathLike | None = None, overrides: list[str] = (),
                deepspeed_config: str | None = None) -> Config:
    """Resolve a Config: built-in defaults < recipe YAML < ``key=value`` overrides < ``--deepspeed_config``.

    Raises:
        ConfigError: unknown key (with the nearest valid one), wrong type, invalid value, unreadable recipe.
    """
    tree: dict[str, Any] = {}
    where: dict[str, str] = {}
    if recipe is not None:
        tree = load_recipe(recipe)
        where.update({k: str(recipe) for k in _flat_keys(tree)})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        where[key] = "command line"
    if deepspeed_config is not None:
        tree["deepspeed_config"] = deepspeed_config
        where["deepspeed_config"] = "--deepspeed_config"
    return _build(Config, tree, "", where)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML; ``make_config(path)`` reads it back to an equal Config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def resolve_file(path: str, what: str, key: str) -> Path:
    """Find a relative path from the working directory, then from the project root, then among the files the
    installed package ships (:func:`shipped_candidates`)."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, *shipped_candidates(p)]
    for c in candidates:
        if c.is_file():
            return c.resolve()
        if c.exists():
            raise ConfigError(f"{what} '{path}' is a directory, not a file (config key '{key}')")
    tried = " or ".join(str(c) for c in candidates)
    raise ConfigError(f"{what} not found: '{path}' (config key '{key}'; looked for {tried})")
