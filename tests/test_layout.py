"""The package's shape (docs/architecture.md): layers that import only downwards, no import circles, every
subpackage in the wheel, and the installed commands' argument handling. Fast: it reads source, it runs nothing."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from pipeline.cli.launch import OURS, SWITCHES, split_argv
from pipeline.config import ConfigError, load_recipe, resolve_file
from tests.conftest import REPO

PKG = REPO / "pipeline"
#: Floor of each top-level part of the package: a module may import modules of its own part (no circles; on floor 0,
#: of the floor) and of floors below, never above or beside. docs/architecture.md draws it.
FLOORS = {"config": 0, "errors": 0, "files": 0, "rundir": 0, "data": 1, "optim": 1, "distributed": 1, "model": 2,
          "eval": 3, "observe": 4, "train": 5, "plan": 6, "cli": 7}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every ``pipeline`` module ``path`` imports, at the top or inside a function (a lazy import is still a
    dependency), as dotted names resolved to modules."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                          or (PKG.parent / sub.replace(".", "/")).is_dir() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
    return found


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {d for d in imports(p) if d != m and d in mods} for m, p in mods.items()}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_every_part_of_the_package_has_a_floor():
    parts = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert parts == set(FLOORS), f"parts without a floor: {parts - set(FLOORS)}; gone: {set(FLOORS) - parts}"


def test_imports_go_only_downwards():
    wrong = []
    for module, deps in graph().items():
        if module == "pipeline":
            continue
        for dep in deps:
            if dep == "pipeline":
                continue
            sideways = floor(dep) == floor(module) > 0 and dep.split(".")[1] != module.split(".")[1]
            if floor(dep) > floor(module) or sideways:  # data, optim and dist never import each other
                wrong.append(f"{module} (floor {floor(module)}) imports {dep} (floor {floor(dep)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles():
    g = graph()
    # a package's __init__ that re-exports its modules (pipeline.distributed) is an edge down, not a circle
    for m in g:
        g[m] = {d for d in g[m] if not m.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_wheel_lists_every_subpackage():
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    subpackages = {module_name(p.parent) for p in PKG.rglob("__init__.py")}
    assert subpackages <= set(setup["packages"]), subpackages - set(setup["packages"])
    for package, folder in setup["package-dir"].items():
        assert (REPO / folder).is_dir() and package in setup["packages"]


def test_nothing_starts_a_script_by_its_path():
    """The library starts its own programs as modules (``python -m``), so an installed wheel runs them."""
    offenders = [str(p.relative_to(REPO)) for p in PKG.rglob("*.py")
                 if any(s in p.read_text() for s in ('"eval" / "watch.py"', '"launch" / "train.py"'))]
    assert not offenders


def test_launcher_switches_are_deepspeeds():
    """``loraplus-train``'s table of value-less launcher flags agrees with DeepSpeed's own parser: each parses
    without a value, and the flags it does not list take one."""
    from deepspeed.launcher.runner import parse_args

    for flag in SWITCHES:
        args = parse_args([flag, "train.py", "x"])
        assert args.user_script == "train.py", flag
    with pytest.raises(SystemExit):
        parse_args(["--num_gpus"])  # a flag outside the table needs its value


@pytest.mark.parametrize("argv, launcher, ours", [
    (["--num_gpus", "2", "--config", "tiny", "train.max_steps=3"], ["--num_gpus", "2"],
     ["--config", "tiny", "train.max_steps=3"]),
    (["--hostfile=h", "--no_ssh_check", "--master_port", "29600", "a.b=1"], ["--hostfile=h", "--no_ssh_check",
                                                                              "--master_port", "29600"], ["a.b=1"]),
    (["--overwrite"], [], ["--overwrite"]),
    ([], [], []),
])
def test_loraplus_train_splits_launcher_flags_from_ours(argv, launcher, ours):
    assert split_argv(argv) == (launcher, ours)
    assert not set(ours[:1]) & SWITCHES and (not ours or ours[0] in OURS or not ours[0].startswith("-"))


@pytest.mark.parametrize("argv", [["--num_gpus"], ["--module", "x"], ["--num_gpus", "--config", "x"]])
def test_loraplus_train_refuses_bad_launcher_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        split_argv(argv)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_shipped_recipes_by_name_and_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: found in the checkout (here) or the package (a wheel)
    assert load_recipe("llama3-8b") == load_recipe(REPO / "launch" / "configs" / "llama3-8b.yaml")
    assert load_recipe("launch/configs/tiny.yaml") == load_recipe(REPO / "launch" / "configs" / "tiny.yaml")
    assert resolve_file("deepspeed_configs/zero3.json", "DeepSpeed config", "deepspeed_config").is_file()
    with pytest.raises(ConfigError, match="llama3-8b"):  # the message lists the shipped recipes
        load_recipe("no-such-recipe")
