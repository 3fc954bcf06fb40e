"""The embedded default: a bundled dataset (instruction tasks, and multiple-choice questions in MMLU's layout from
the bundled MMLU sample's generator) and a tiny Llama built offline.

Nothing here downloads. ``python -m pipeline.tiny`` rewrites the bundled dataset (deterministic; a test checks
that the committed file equals what this module generates). The tiny model is built on first use by
:func:`ensure_tiny_model`: a byte-level BPE tokenizer trained with ``tokenizers`` on the bundled data, a
randomly initialised ``LlamaForCausalLM`` (seeded), both saved as an ordinary Hugging Face directory (weights in
safetensors) that the pipeline then loads with ``from_pretrained``, exactly like a real model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from pipeline.config import BUILTIN_DATA, BUILTIN_MODEL

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_DATA = ASSETS / "tiny_instruct.jsonl"
TINY_VERSION = "v2"  # bump when the tiny model or tokenizer recipe changes: the cache key includes it

# A Llama-style chat template (role headers, EOS-terminated turns). Prefix-stable: rendering the first k
# messages yields a prefix of rendering all of them, which response-only labelling relies on.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Chile": "Santiago",
    "Greece": "Athens", "Poland": "Warsaw", "India": "New Delhi", "Cuba": "Havana", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Austria": "Vienna", "Sweden": "Stockholm", "Finland": "Helsinki", "Ghana": "Accra",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "early": "late",
    "happy": "sad", "open": "closed", "full": "empty", "strong": "weak", "old": "new", "high": "low",
    "wet": "dry", "loud": "quiet", "rich": "poor", "hard": "soft", "near": "far", "first": "last",
}
WORDS = ["apple", "river", "stone", "cloud", "garden", "window", "silver", "forest", "planet", "candle",
         "bridge", "yellow", "winter", "rocket", "pencil", "tiger", "ocean", "castle", "mirror", "violin"]
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _example(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randrange(50), rng.randrange(50)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == 1:
        country = rng.choice(sorted(CAPITALS))
        return {"instruction": f"What is the capital of {country}?", "input": "",
                "output": f"The capital of {country} is {CAPITALS[country]}."}
    if kind == 2:
        word = rng.choice(sorted(OPPOSITES))
        return {"instruction": "Give the opposite of the word.", "input": word,
                "output": f"The opposite of {word} is {OPPOSITES[word]}."}
    if kind == 3:
        word = rng.choice(WORDS)
        return {"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]}
    if kind == 4:
        digits = [rng.randrange(10) for _ in range(rng.randrange(2, 6))]
        return {"instruction": "Write these digits as words.", "input": " ".join(map(str, digits)),
                "output": " ".join(NUMBER_WORDS[d] for d in digits)}
    if kind == 5:  # the base model meets " A" .. " D", MMLU's answer letters, as often as any other letter
        letter = rng.choice(_LETTERS[:-1])
        after = _LETTERS[_LETTERS.index(letter) + 1]
        return {"instruction": f"Which letter comes after {letter}?", "input": "",
                "output": f"The letter after {letter} is {after}."}
    words = rng.sample(WORDS, rng.randrange(3, 6))
    return {"instruction": "Sort these words alphabetically.", "input": ", ".join(words),
            "output": ", ".join(sorted(words))}


def generate_dataset(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """The bundled instruction tasks: short templated tasks a tiny model visibly learns within minutes."""
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


MULTIPLE_CHOICE = 3000  # of the bundled file's 5,000 lines: enough that 60 steps lift the MMLU sample off chance


def multiple_choice(n: int = MULTIPLE_CHOICE, seed: int = 1) -> list[dict[str, str]]:
    """``prompt``/``completion`` records in MMLU's prompt layout, exactly as lm-eval's ``mmlu`` task puts a
    question with no shots, drawn from the generator of the bundled MMLU sample (``mmlu.question``) and never one
    of the sample's own questions (question and choices); the completion is the answer, `` X``."""
    from pipeline import mmlu

    rng, subjects, banned = random.Random(seed), list(mmlu.subjects()), mmlu.sample_questions()
    out = []
    while len(out) < n:
        subject = rng.choice(subjects)
        row = mmlu.question(rng, subject)
        if (row["question"], tuple(row["choices"])) not in banned:
            out.append({"prompt": mmlu.zero_shot_prompt(row, subject), "completion": " " + "ABCD"[row["answer"]]})
    return out


def bundled_records() -> list[dict[str, str]]:
    """The bundled file: the instruction tasks and the multiple-choice records, shuffled together (seeded)."""
    records = generate_dataset() + multiple_choice()
    random.Random(2).shuffle(records)
    return records


def write_bundled_dataset(path: Path = BUNDLED_DATA) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in bundled_records()))


def cache_dir() -> Path:
    """Where built-in assets are materialised: ``$LORAPLUS_CACHE`` or ``~/.cache/loraplus``."""
    return Path(os.environ.get("LORAPLUS_CACHE", Path.home() / ".cache" / "loraplus")).expanduser()


def _corpus_lines() -> list[str]:
    lines = []
    for r in (json.loads(x) for x in BUNDLED_DATA.read_text().splitlines()):
        lines += [r["prompt"] + r["completion"]] if "prompt" in r else [r["instruction"], r["input"], r["output"]]
    # Template words of the instruction and chat formats, so that they tokenize compactly.
    lines += ["### Instruction:", "### Input:", "### Response:", "<|user|>", "<|assistant|>", "<|system|>"]
    return lines


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the bundled data, wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
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


if __name__ == "__main__":
    write_bundled_dataset()
    print(f"wrote {BUNDLED_DATA}")
