"""Score one checkpoint (or a plain model directory, as step 0) on MMLU with lm-evaluation-harness.

    loraplus-eval --checkpoint OUTPUT_DIR/checkpoints/step-N [--mmlu-data DIR|sample] [--num-fewshot 5]
                  [--batch-size auto] [--memory-gb auto|GiB] [--limit K] [--device cpu|cuda|cuda:1]
                  [--parallelize] [--hub]
    python eval/mmlu.py ...         (from a checkout)

Writes step-N/mmlu.json (acc and acc_stderr of lm-eval's size-weighted `mmlu` group, the four categories, every
subject, shots, lm-eval version, model and adapter identity, wall time) and lm-eval's full results beside it
(mmlu_lm_eval.json). Nothing is written unless the evaluation finishes. Offline unless --hub is given.

On CPU, --batch-size auto sizes each batch so that the process stays within --memory-gb (default auto: half of the
memory available when it starts), from the model's vocabulary and the length of the requests at hand.

Data-parallel over the GPUs of a node (lm-eval splits the questions; rank 0 writes):
    accelerate launch --num_processes 8 eval/mmlu.py --checkpoint ... --mmlu-data DIR
A model larger than one GPU (lm-eval's parallelize=True, layers spread over the visible GPUs):
    python eval/mmlu.py --checkpoint ... --mmlu-data DIR --parallelize
"""

import argparse
from pathlib import Path

from pipeline.errors import exit_on_user_error
from pipeline.eval.score import add_eval_args, check_eval_args, evaluate_one, headline


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoints/step-N, or a Hugging Face model directory")
    add_eval_args(p)
    args = p.parse_args(argv)
    check_eval_args(args)
    checkpoint = Path(args.checkpoint).expanduser().resolve()
    from pipeline.files import cache_dir

    summary = evaluate_one(checkpoint, args, cache_dir())
    if summary is None:
        return  # a non-zero rank of `accelerate launch`
    cats = "  ".join(f"{k} {v['acc']:.4f}" for k, v in summary["categories"].items())
    print(f"MMLU {summary['num_fewshot']}-shot  {headline(summary)}  ({cats})  "
          f"in {summary['wall_s']:.1f} s; {checkpoint / 'mmlu.json'}")


if __name__ == "__main__":
    main()
