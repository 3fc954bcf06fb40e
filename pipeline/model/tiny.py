"""The embedded default model: a tiny Llama built offline, on first use, by :func:`ensure_tiny_model`: a byte-level BPE
tokenizer trained with ``tokenizers`` on the bundled data (:mod:`pipeline.data.builtin`), a randomly initialised
``LlamaForCausalLM`` (seeded) given a short pretraining, both saved as an ordinary Hugging Face directory (weights in
safetensors) that the pipeline then loads with ``from_pretrained``, exactly like a real model."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from pipeline.config import BUILTIN_DATA, BUILTIN_MODEL
from pipeline.data.builtin import BUNDLED_DATA, corpus_lines, generate_dataset
from pipeline.files import cache_dir

TINY_VERSION = "v2"  # bump when the tiny model or tokenizer recipe changes: the cache key includes it


# A Llama-style chat template (role headers, EOS-terminated turns). Prefix-stable: rendering the first k
# messages yields a prefix of rendering all of them, which response-only labelling relies on.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the bundled data, wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    # BOS first when special tokens are asked for, as Llama's tokenizers do: lm-eval encodes with the tokenizer's
    # defaults, so a scored prompt starts as a training sample does (the pipeline adds BOS itself).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=1024)


def build_tiny_model(vocab_size: int, seed: int = 0):
    """A 2-layer Llama (hidden 64, GQA 4 heads / 2 KV heads), randomly initialised from ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretrain(model, tokenizer, steps: int = 400, batch_size: int = 16, lr: float = 3e-3, seed: int = 0) -> float:
    """A short full-parameter pretraining on plain text, so the tiny base knows the words but not the
    instruction format, and has never seen a multiple-choice question (it scores near chance on the MMLU sample):
    the LoRA fine-tune then has something real to learn. Returns the last loss."""
    import torch

    rng = random.Random(seed + 1)
    texts = [" ".join(x for x in (r["instruction"], r["input"], r["output"]) if x)
             for r in generate_dataset(4000, seed=seed + 1)]
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = tokenizer([tokenizer.bos_token + t + tokenizer.eos_token for t in rng.sample(texts, batch_size)],
                          add_special_tokens=False, padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def ensure_tiny_model() -> Path:
    """Build the tiny model directory once and return its path.

    Safe under many concurrent ranks: each builds into its own temporary directory and renames it into place;
    the build is deterministic, so whichever rename wins, every rank sees the same files.
    """
    target = cache_dir() / f"tiny-llama-{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_tiny_model(len(tokenizer))
        pretrain(model, tokenizer)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another rank got there first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_builtin(model_path: str, data_path: str) -> tuple[str, str]:
    """Map the ``builtin:`` names of the embedded default to real paths; other paths pass through."""
    if model_path == BUILTIN_MODEL:
        model_path = str(ensure_tiny_model())
    if data_path == BUILTIN_DATA:
        data_path = str(BUNDLED_DATA)
    return model_path, data_path
