#!/usr/bin/env python
"""Tokenise (and pack) a recipe's data into the cache ahead of a job, on any machine that sees the cache.

    python launch/prepare_data.py [--config RECIPE.yaml] [key.sub=value ...]

It takes the same recipe and overrides as launch/train.py (only the data, tokenizer and train.seq_len matter),
builds the cache entry that training with them will read (data.cache_dir; see pipeline/data/prepared.py), prints the
report (samples, tokens, truncated, dropped, share of tokens with loss, packing) and, last, the cache's path.
With a warm cache it only checks it. launch/train.py with the same recipe then starts without tokenising.
Exit status 2 for bad input (the file and line named).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.config import make_config  # noqa: E402
from pipeline.errors import UserError, exit_on_user_error  # noqa: E402
from pipeline.model import tiny  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (default: the embedded tiny default)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    return p.parse_intermixed_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = make_config(args.config, args.overrides)
    model_path, data_path = tiny.resolve_builtin(cfg.model.name_or_path, cfg.data.path)
    from pipeline.data.prepared import prepare
    from pipeline.model.load import has_tokenizer, load_tokenizer
    from pipeline.observe.metrics import quiet_library_warnings

    if cfg.model.random_init and not has_tokenizer(model_path):
        model_path = str(tiny.ensure_tiny_model())  # as launch/train.py: the embedded tokenizer
    elif not has_tokenizer(model_path):
        raise UserError(f"model.name_or_path: {model_path} holds no tokenizer (tokenizer.json or "
                        f"tokenizer_config.json); the data is tokenised with the model's tokenizer")
    quiet_library_warnings()
    clock = time.perf_counter()
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    data_cfg = dataclasses.replace(cfg.data, path=str(Path(data_path).resolve()),
                                   val_path=cfg.data.val_path and str(Path(cfg.data.val_path).resolve()))
    prepared = prepare(data_cfg, tokenizer, model_path, cfg.train.seq_len, log=print)
    print(f"ready in {time.perf_counter() - clock:.1f} s; launch/train.py with this recipe reads it from:")
    print(prepared.directory)


if __name__ == "__main__":
    main()
