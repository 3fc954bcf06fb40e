"""Fine-tune a causal LM with LoRA+ on DeepSpeed ZeRO.

    loraplus-train [--num_gpus N ...] [--config RECIPE.yaml] [--deepspeed_config JSON] [key.sub=value ...]
    deepspeed [--num_gpus N] launch/train.py [--config RECIPE.yaml] ...     (from a checkout)
    python -m pipeline.cli.train ...     (one process)

This module is what each rank runs; ``loraplus-train`` (:mod:`pipeline.cli.launch`) starts the DeepSpeed launcher
around it.

Without --config it runs the embedded default: a tiny Llama built offline, the bundled data, ZeRO-2.
An output_dir that already holds the run is resumed from its newest complete checkpoint; --overwrite starts again.
SIGTERM/SIGINT save a checkpoint and exit with status 128 + signal (see pipeline/distributed/preempt.py).
"""

import argparse

from pipeline import distributed as dist  # light until init() is called
from pipeline.distributed import preempt, watchdog
from pipeline.errors import exit_on_user_error
from pipeline.train import start


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (default: the embedded tiny default)")
    p.add_argument("--deepspeed_config", help="DeepSpeed JSON; overrides the recipe's deepspeed_config")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run in output_dir and start again (default: resume it)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    return p.parse_intermixed_args(argv)  # overrides may come before and after the flags


@exit_on_user_error
def main(argv=None) -> None:
    # 1. What a user can get wrong in the recipe, JSON, paths and output_dir, checked before DeepSpeed is imported
    #    or a process group exists; then what this machine decides (accelerator, optimizer, precision).
    preempt.exit_at_once()  # a signal before the first step: exit 128 + signal (the loop saves from then on)
    req = start.check_request(parse_args(argv))
    rt = start.check_runtime(req)
    if req.scoring and req.cfg.eval.mmlu.runner == "engine":  # lm-eval runs in this process: datasets offline
        from pipeline.eval.score import go_offline

        go_offline(req.cfg.eval.mmlu.data)

    # 2. Tokenizer and data, before any process group exists: a cache build (once, by whichever process takes
    #    its lock; the others wait) can take as long as it needs with no collective pending.
    from pipeline.data.prepared import prepare
    from pipeline.model.load import load_run_tokenizer

    tokenizer = load_run_tokenizer(req.cfg)
    data = prepare(req.cfg.data, tokenizer, req.cfg.model.name_or_path, req.cfg.train.seq_len, log=print,
                   announce=dist.env_rank() == 0)

    # 3. Distributed set-up (output_dir is only probed), and how this start begins: fresh, resumed (on this or
    #    another world size) or nothing to do.
    from pipeline.observe.metrics import Reporter

    dist.set_single_process_defaults()
    info = dist.init()
    watch = watchdog.PeerWatch.from_env(info.rank, info.world_size, req.peer_timeout).start()  # a dead rank ends all
    log = Reporter(info.rank, req.output_dir / "metrics.jsonl", req.cfg.train.max_steps)
    from pipeline.train import checkpoint

    checkpoint.probe_output_dir(req.output_dir, info.rank)  # fail now, not after loading a 70B model
    point = start.find_point(req, info.rank)
    plan = start.decide(req.cfg, point, info.world_size, req.output_dir, dist.zero_stage(req.ds_json),
                        rt.precision, data.key, len(data.train),
                        dist.on_rank0(lambda: start.waits_for_engine_score(req, point), info.rank))
    for note in plan.notes:
        log.print(note)
    if plan.kind == "nothing_to_do":
        watch.leave()
        return
    ds_config = dist.assemble_ds_config(req.ds_json, plan.cfg, info.world_size, rt.precision)
    if plan.universal:
        ds_config["checkpoint"] = {"load_universal": True}  # another world size: see resume.restore
    for line in start.run_notes(plan.cfg, rt):
        log.print(line)

    # 4. Model, LoRA, LoRA+ groups, optimizer, engine.
    from pipeline.model.lora import check_init, mutates_base
    from pipeline.rundir import LORA_INIT
    from pipeline.train import build, session

    stored_init = req.output_dir / LORA_INIT if plan.kind == "resume" and mutates_base(plan.cfg.lora) else None
    if stored_init:
        check_init(stored_init)  # before the model loads
    built = build.build(plan.cfg, ds_config, info, rt.precision, rt.optimizer, log, stored_init)

    # 5. Only now, with every input accepted, does output_dir receive (or continue) the run; then train.
    session.run(session.Run(req, rt, plan, built, ds_config, info, log, watch, data, tokenizer))


if __name__ == "__main__":
    main()
