"""``loraplus-train``: the DeepSpeed launcher around :mod:`pipeline.cli.train`, for an installed package.

    loraplus-train [LAUNCHER FLAGS] [--config RECIPE.yaml] [--deepspeed_config JSON] [--overwrite] [key.sub=value ...]

    loraplus-train --num_gpus 2 --config llama3-8b model.name_or_path=/models/llama3-8b
    loraplus-train --hostfile hosts --master_port 29600 --config llama2-70b ...

The launcher's flags come first (``--num_gpus``, ``--num_nodes``, ``--hostfile``, ``--include``, ``--master_addr``,
``--master_port``, ``--launcher``, ...: ``deepspeed --help`` lists them), then the same arguments as
``deepspeed launch/train.py`` takes from a checkout. It runs ``deepspeed [LAUNCHER FLAGS] --module
pipeline.cli.train [ARGUMENTS]``: the same launcher, and every rank imports the installed package, so nothing is
started by a path (on several nodes, the package must be installed on each, as DeepSpeed itself must).
"""

from __future__ import annotations

import sys

#: DeepSpeed's launcher flags that take no value (``deepspeed.launcher.runner.parse_args``, deepspeed 0.19; a test
#: checks each against DeepSpeed's own parser). Every other launcher flag takes one value, as ``--flag V`` or
#: ``--flag=V``.
SWITCHES = {"--no_python", "--no_local_rank", "--no_ssh", "--no_ssh_check", "--force_multi", "--save_pid",
            "--bind_cores_to_rank", "-q", "--quiet"}
#: Where our own arguments begin (pipeline.cli.train's flags); a bare ``key=value`` begins them too.
OURS = {"--config", "--deepspeed_config", "--overwrite"}
USAGE = __doc__.split("\n\n")[1]


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` as (launcher flags, training arguments): the launcher's flags, each with its value, up to the first
    of ours (a flag of :data:`OURS`, or anything not a flag).

    Raises:
        SystemExit: a launcher flag is missing its value, or ``--module`` / ``--no_python`` / a script was given
            (this command names the module itself).
    """
    launcher: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in OURS or not arg.startswith("-"):
            break
        if name in ("--module", "-m", "--no_python"):
            _usage_error(f"{name}: loraplus-train runs the module pipeline.cli.train itself; use deepspeed for "
                         f"another script")
        launcher.append(arg)
        if name not in SWITCHES and "=" not in arg:
            if i + 1 == len(argv) or argv[i + 1].startswith("-"):
                _usage_error(f"the launcher flag {arg} needs a value")
            launcher.append(argv[i + 1])
            i += 1
        i += 1
    return launcher, argv[i:]


def _usage_error(message: str) -> None:
    print(f"error: {message}\nusage:\n{USAGE}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    launcher, ours = split_argv(argv)
    from deepspeed.launcher.runner import main as deepspeed_main

    deepspeed_main([*launcher, "--module", "pipeline.cli.train", *ours])


if __name__ == "__main__":
    main()
