"""Score a model (a checkpoint's adapter on its base, or a plain Hugging Face directory) on MMLU with
lm-evaluation-harness. Every number is lm-eval's: its ``hf`` model class, its built-in ``mmlu`` task (prompt,
5-shot ``dev`` split, ``acc``, size-weighted groups); only the dataset path is redirected to a local copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

CATEGORIES = ("stem", "humanities", "social_sciences", "other")
CPU_BATCH_SIZE = "32"  # what --batch-size auto means on CPU


# ----------------------------------------------------------------------------------------------------------
# Command-line options shared by eval/mmlu.py and eval/watch.py


def add_eval_args(p) -> None:
    """Add the options eval/mmlu.py and eval/watch.py share to the argparse parser ``p``."""
    p.add_argument("--mmlu-data", help="local cais/mmlu copy (hub or CSV layout), or 'sample' for the bundled one")
    p.add_argument("--hub", action="store_true", help="read cais/mmlu from the Hugging Face hub (needs network)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="shots from each subject's dev split (default 5; eval/watch.py: the run's own)")
    p.add_argument("--batch-size", default="auto",
                   help=f"lm-eval batch size: a number or 'auto' (default; lm-eval's search on a GPU, "
                        f"{CPU_BATCH_SIZE} on CPU)")
    p.add_argument("--limit", type=int, help="score only the first K questions of each subject (quick checks)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="model dtype for lm-eval (default: the checkpoint's own)")
    p.add_argument("--base", help="base model directory (default: the one the adapter records)")
    p.add_argument("--parallelize", action="store_true",
                   help="split a model larger than one GPU over all visible GPUs (lm-eval's parallelize=True)")


def check_eval_args(args) -> None:
    if args.num_fewshot is None:
        args.num_fewshot = 5
    if args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0; got {args.num_fewshot}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1; got {args.limit}")
    if args.batch_size != "auto" and not args.batch_size.isdigit():
        raise UserError(f"--batch-size must be a number or 'auto'; got {args.batch_size!r}")
    if args.hub and args.mmlu_data:
        raise UserError("give either --mmlu-data DIR or --hub, not both")


def data_dir(args, cache: Path):
    """The hub-layout directory to score on (``None``: the hub)."""
    from pipeline import mmlu

    return None if args.hub else mmlu.resolve(args.mmlu_data, args.num_fewshot, cache)


def default_device(args) -> str:
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_one(checkpoint: Path, args, cache: Path) -> dict | None:
    """Score ``checkpoint`` and write its ``mmlu.json``; return the summary (``None`` on a non-zero rank)."""
    return evaluate_target(target(checkpoint, args.base), args, cache)


def evaluate_target(tgt: Target, args, cache: Path) -> dict | None:
    """Score ``tgt`` and write ``mmlu.json`` into its ``result_dir``; return the summary (``None`` on a non-zero
    rank)."""
    data = data_dir(args, cache)
    summary, results = score(tgt, data, args.num_fewshot, args.batch_size, args.limit, default_device(args),
                             args.dtype, args.parallelize)
    if summary is not None:
        write(summary, results, tgt.result_dir)
    return summary



# ----------------------------------------------------------------------------------------------------------
# What is scored, and scoring it


@dataclass(frozen=True)
class Target:
    """What is scored: ``base`` alone, or ``base`` + the PEFT ``adapter`` of a checkpoint."""

    base: Path
    adapter: Path | None
    step: int
    result_dir: Path  # where mmlu.json goes

    def identity(self) -> dict:
        ident = {"base": str(self.base), "adapter": str(self.adapter) if self.adapter else None, "step": self.step}
        if self.adapter:
            with open(self.adapter / "adapter_model.safetensors", "rb") as f:
                ident["adapter_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
        return ident


def target(path: Path, base: str | None = None) -> Target:
    """A ``checkpoints/step-N`` directory (its adapter on the base it records), or a model directory (step 0).

    Raises:
        UserError: neither; a checkpoint without an adapter; a base that is missing.
    """
    from pipeline.model import check_model_dir

    if not path.is_dir():
        raise UserError(f"--checkpoint {path} is not a directory")
    if (path / "trainer_state.json").is_file() or (path / "adapter").exists():
        adapter = path / "adapter"
        if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
            raise UserError(f"--checkpoint {path} has no adapter (adapter/adapter_config.json and "
                            f"adapter/adapter_model.safetensors)")
        base = Path(base or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
        check_model_dir(str(base))
        step = json.loads((path / "trainer_state.json").read_text())["step"] if \
            (path / "trainer_state.json").is_file() else -1
        return Target(base, adapter, step, path)
    if (path / "config.json").is_file():
        check_model_dir(str(path))
        return Target(path, None, 0, path)
    raise UserError(f"--checkpoint {path} is neither a checkpoint (checkpoints/step-N with adapter/) nor a Hugging "
                    f"Face model directory (config.json)")


def group_yaml(data: Path, cache: Path | None = None) -> str:
    """An lm-eval group that is the built-in ``mmlu`` with its ``dataset_path`` pointed at ``data`` (the form
    lm-eval 0.4.13 accepts; FACTS.md), and ``datasets``' cache at ``cache``: see :func:`datasets_cache`."""
    kwargs = f"    dataset_kwargs:\n      cache_dir: {json.dumps(str(cache))}\n" if cache is not None else ""
    return (f"group: mmlu_local\ntask:\n  - group: mmlu\n    dataset_path: {json.dumps(str(data))}\n{kwargs}"
            f"aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")


def datasets_cache(data: Path) -> Path:
    """A ``datasets`` cache directory for the local MMLU copy ``data``, keyed by its files' names, sizes and
    times. Offline, ``datasets`` keys its cache of a local directory by the directory's name alone and reads the
    copy it made the first time, even after the files changed (measured with datasets 4: a rewritten sample was
    scored as the old one); a key of the files' own makes a changed copy a new cache."""
    from pipeline.files import files_key
    from pipeline.tiny import cache_dir

    return cache_dir() / "mmlu-datasets" / files_key(data)


def score(tgt: Target, data: Path | None, num_fewshot: int, batch_size: str, limit: int | None, device: str,
          dtype: str = "auto", parallelize: bool = False) -> tuple[dict | None, dict | None]:
    """Run lm-eval; return (our summary, lm-eval's full results), or ``(None, None)`` on a rank other than 0 of
    a data-parallel run. ``data`` ``None`` reads cais/mmlu from the hub.

    Call before anything imports ``datasets`` in this process when offline (the environment switches are read at
    import).
    """
    if data is not None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    if batch_size == "auto" and device == "cpu":
        # lm-eval's search for the largest batch waits for an out-of-memory error that a CPU does not raise: on
        # the tiny default it is a third of a score's time, for no gain. A fixed batch on CPU.
        batch_size = CPU_BATCH_SIZE
    model_args = {"pretrained": str(tgt.base), "dtype": dtype, "device": device, "trust_remote_code": False}
    if tgt.adapter:
        model_args["peft"] = str(tgt.adapter)
    if parallelize:
        model_args["parallelize"] = True
        model_args.pop("device")
    started = time.perf_counter()
    # Only lm-eval's own mmlu task files are indexed (include_defaults=False): indexing all of its tasks takes
    # ~13 s per score on a 2-core machine, the same YAML files are read either way.
    mmlu_tasks = str(Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default")
    with tempfile.TemporaryDirectory() as include:
        if data is not None:
            Path(include, "mmlu_local.yaml").write_text(group_yaml(data, datasets_cache(data)))
            tasks, manager = ["mmlu_local"], TaskManager(include_path=[include, mmlu_tasks], include_defaults=False)
        else:
            tasks, manager = ["mmlu"], TaskManager(include_path=[mmlu_tasks], include_defaults=False)
        try:
            with _fast_yaml():
                results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks,
                                                  num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
                                                  task_manager=manager, log_samples=False)
        except (RuntimeError, ValueError) as e:
            # PEFT loading an adapter made for another model: other shapes, or other module names.
            if tgt.adapter and ("size mismatch" in str(e) or "Target modules" in str(e)):
                detail = next((line.strip() for line in str(e).splitlines()
                               if "size mismatch" in line or "Target modules" in line), "")
                raise UserError(f"the adapter {tgt.adapter} does not fit the base model {tgt.base}: {detail}; "
                                f"pass the base it was trained on (--base DIR)") from None
            raise
    wall = time.perf_counter() - started
    if results is None:  # a non-zero rank of a data-parallel `accelerate launch`: rank 0 has the results
        return None, None
    return summarize(results, tgt, num_fewshot, limit, data, wall), results


@contextlib.contextmanager
def _fast_yaml():
    """``yaml.safe_load`` through libyaml's C parser (``CSafeLoader``: the same safe loader, in C) while lm-eval
    runs. ``datasets`` reads the data directory's README (its YAML front matter lists every subject) once per
    subject, 57 times a score, with PyYAML's pure-Python parser: about 10 s of a 2-core machine per score. Nothing
    changes where PyYAML was built without libyaml."""
    import yaml

    if not getattr(yaml, "__with_libyaml__", False):
        yield
        return
    plain = yaml.safe_load
    yaml.safe_load = lambda stream: yaml.load(stream, Loader=yaml.CSafeLoader)
    try:
        yield
    finally:
        yaml.safe_load = plain


def summarize(results: dict, tgt: Target, num_fewshot: int, limit: int | None, data: Path | None,
              wall: float) -> dict:
    """``mmlu.json``: top-level acc/stderr of the ``mmlu`` group, its four categories, every subject."""
    import lm_eval

    res = results["results"]

    def pair(key: str) -> dict:
        stderr = res[key]["acc_stderr,none"]  # lm-eval writes "N/A" where it has no estimate (one question)
        return {"acc": res[key]["acc,none"], "acc_stderr": stderr if isinstance(stderr, (int, float)) else None}

    subjects = {k.removeprefix("mmlu_"): pair(k) for k in sorted(res)
                if k.startswith("mmlu_") and k.removeprefix("mmlu_") not in (*CATEGORIES, "local")}
    return {
        **pair("mmlu"),
        "categories": {c: pair(f"mmlu_{c}") for c in CATEGORIES},
        "subjects": subjects,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _version("lm_eval"),
        "model": tgt.identity(),
        "data": str(data) if data else "cais/mmlu (hub)",
        "wall_s": round(wall, 2),
    }


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name.replace("_", "-"))


def write(summary: dict, results: dict, out_dir: Path) -> Path:
    """``out_dir/mmlu.json`` (atomically, last) and lm-eval's full results beside it, ``mmlu_lm_eval.json``."""
    full = out_dir / "mmlu_lm_eval.json"
    full.write_text(json.dumps(results, indent=1, default=str) + "\n")
    from pipeline.files import atomic_write_text

    path = out_dir / "mmlu.json"
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n", fsync=True)  # an empty one would read as "scored"
    return path


def headline(summary: dict) -> str:
    """``acc 0.2500 ± 0.0286`` (no ± where lm-eval gives no stderr)."""
    stderr = summary["acc_stderr"]
    return f"acc {summary['acc']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def setting(summary: dict) -> dict:
    """What a score depends on besides the model: the data, the shots, the question limit."""
    return {k: summary[k] for k in ("data", "num_fewshot", "limit")}


def table_row(summary: dict) -> dict:
    """One ``mmlu.jsonl`` row."""
    return {"step": summary["model"]["step"], "acc": summary["acc"], "acc_stderr": summary["acc_stderr"],
            **{c: summary["categories"][c]["acc"] for c in CATEGORIES}, **setting(summary)}
