#!/usr/bin/env python
"""Will a recipe fit? Per-GPU memory of a training run, item by item, before the job is queued.

    python launch/plan.py --config launch/configs/llama2-70b.yaml --gpus 16 [--gpu-mem 80] [key.sub=value ...]

Nothing is loaded and no GPU is needed: the model of the recipe's ``model.shape`` (or of the config.json in
``model.name_or_path``) is built on PyTorch's meta device. See pipeline/plan/memory_plan.py for what each line counts.
Exit status: 0 when it fits, 3 when it does not, 2 for bad input.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline import distributed as dist  # noqa: E402
from pipeline.config import make_config, resolve_file  # noqa: E402
from pipeline.errors import UserError, exit_on_user_error  # noqa: E402

DOES_NOT_FIT = 3


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (default: the embedded tiny default)")
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON; overrides the recipe's deepspeed_config")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the whole job (all nodes)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU, GiB (default 80)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="plan a GPU run (default) or a CPU run (fp32; what the tests measure)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    return p.parse_intermixed_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1; got {args.gpus}")
    if args.gpu_mem <= 0:
        raise UserError(f"--gpu-mem must be > 0 GiB; got {args.gpu_mem}")
    cfg = make_config(args.config, args.overrides, args.deepspeed_config)
    ds_json = dist.read_ds_json(resolve_file(cfg.deepspeed_config, "DeepSpeed config", "deepspeed_config"))

    from pipeline.observe.metrics import quiet_library_warnings
    from pipeline.plan.memory_plan import render, verdict

    quiet_library_warnings()
    from pipeline.plan.memory_plan import make_plan

    plan = make_plan(cfg, ds_json, args.gpus, args.gpu_mem, args.device)
    title = (f"{args.config or 'embedded default'} on {args.gpus} {'GPU' if args.device == 'gpu' else 'CPU rank'}"
             f"{'s' if args.gpus > 1 else ''} ({args.gpu_mem:g} GiB each), ZeRO-{plan.facts['stage']}, "
             f"{plan.facts['precision']}")
    print(render(plan, title))
    if verdict(plan).startswith("does not fit"):
        sys.exit(DOES_NOT_FIT)


if __name__ == "__main__":
    main()
