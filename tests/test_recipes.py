"""The shipped recipes and the README agree with the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import all_keys, make_config
from tests.conftest import REPO

RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"tiny.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_names_a_shipped_deepspeed_json(recipe: Path):
    cfg = make_config(recipe)
    assert (REPO / cfg.deepspeed_config).is_file(), cfg.deepspeed_config


def test_tiny_recipe_is_the_embedded_default():
    assert make_config(REPO / "launch" / "recipes" / "tiny.yaml") == make_config()


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in readme]
    assert not missing, f"README lacks config keys: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    assert command in readme and command in ci.splitlines()
