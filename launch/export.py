#!/usr/bin/env python
"""Export a checkpoint as a standalone PEFT adapter, or (--merge) as a merged Hugging Face model.

    python launch/export.py --checkpoint OUTPUT_DIR/checkpoints/step-N --out DIR [--merge] [--base MODEL_DIR]
    python launch/export.py --checkpoint OUTPUT_DIR --best --out DIR [--merge]

--checkpoint may also name a run's output_dir (its newest complete checkpoint is taken; with --best, the one
checkpoints/best names: the highest MMLU accuracy, else the lowest validation loss). The checkpoint's files
are verified against its manifest first. DIR must not exist yet (or be empty); it is written under a temporary
name and renamed when complete. The adapter export holds adapter_config.json, adapter_model.safetensors and the
tokenizer; --merge folds the adapter into the base weights (in the base's dtype) and writes a model that
AutoModelForCausalLM.from_pretrained loads without PEFT, as safetensors.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline import rundir
from pipeline.errors import UserError, exit_on_user_error  # noqa: E402
from pipeline.train import checkpoint  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step-N directory, or a run's output_dir")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--best", action="store_true",
                   help="with --checkpoint OUTPUT_DIR: the checkpoint checkpoints/best names, not the newest")
    p.add_argument("--merge", action="store_true", help="write base + adapter merged into one model")
    p.add_argument("--base", help="base model directory (default: the one recorded in the adapter)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow the base model's own code to run")
    return p.parse_args(argv)


def pick_checkpoint(path: Path, best: bool = False) -> Path:
    """A step directory that verifies; an output_dir resolves to its newest one that does (``best``: to the one
    ``checkpoints/best`` names)."""
    if not path.is_dir():
        raise UserError(f"--checkpoint {path} is not a directory")
    if best:
        name = rundir.best_name(path)
        if (path / checkpoint.MANIFEST).is_file() or rundir.STEP_RE.fullmatch(path.name):
            raise UserError(f"--best picks a checkpoint of a run: give --checkpoint the run's output_dir, not "
                            f"the checkpoint {path}")
        if name is None:
            raise UserError(f"--best: {path} has no checkpoints/best (no checkpoint has an MMLU score or a "
                            f"validation loss yet); name one with --checkpoint {path}/checkpoints/step-N")
        path = rundir.checkpoints_dir(path) / name
        if not path.is_dir():
            raise UserError(f"--best: checkpoints/best names {name}, which is not in {path.parent}")
    if (path / checkpoint.MANIFEST).is_file() or rundir.STEP_RE.fullmatch(path.name):
        reason = checkpoint.verify(path)
        if reason:
            raise UserError(f"--checkpoint {path} is not a usable checkpoint: {reason}")
        return path
    for _, step in rundir.sealed_steps(path):
        if checkpoint.verify(step) is None:
            return step
    raise UserError(f"--checkpoint {path} is neither a checkpoint (checkpoints/step-N) nor an output_dir holding one")


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    ckpt = pick_checkpoint(Path(args.checkpoint).expanduser().resolve(), args.best)
    out = Path(args.out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory (nothing was written)")
    adapter = ckpt / "adapter"
    base = args.base or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    from pipeline.model.load import check_model_dir

    check_model_dir(base)

    from pipeline import distributed as dist
    from pipeline.observe.metrics import quiet_library_warnings

    dist.select_accelerator()  # PEFT imports DeepSpeed when installed; let it find no GPU without guessing
    quiet_library_warnings()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(ckpt, base, adapter, tmp, out, args)
    except OSError as e:
        raise UserError(f"could not write {out}: {e.strerror or e}; nothing was left there") from None
    except Exception as e:  # a full disk under safetensors is a SafetensorError, not an OSError
        if type(e).__name__ != "SafetensorError":
            raise
        raise UserError(f"could not write {out}: {e}; nothing was left there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kind = "merged model" if args.merge else "PEFT adapter"
    print(f"exported {ckpt.name} of {ckpt.parent.parent} as a {kind} to {out}")


def write(ckpt: Path, base: str, adapter: Path, tmp: Path, out: Path, args) -> None:
    """Everything into ``tmp``, then one rename to ``out``."""
    from transformers import AutoTokenizer

    if args.merge:
        merge(base, adapter, tmp, args.trust_remote_code)
    else:
        for f in adapter.iterdir():
            shutil.copy2(f, tmp / f.name)
    AutoTokenizer.from_pretrained(base, local_files_only=True,
                                  trust_remote_code=args.trust_remote_code).save_pretrained(tmp)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (tmp / "export.json").write_text(json.dumps({
        "checkpoint": str(ckpt), "step": state["step"], "base_model": str(Path(base).resolve()),
        "merged": args.merge}, indent=1) + "\n")
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(tmp, out)


def merge(base: str, adapter: Path, out: Path, trust_remote_code: bool) -> None:
    """Base in its own dtype + adapter, merged by PEFT (``merge_and_unload``), saved as safetensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", local_files_only=True, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    main()
