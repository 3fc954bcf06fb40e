"""The shipped recipes and the README agree with the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.config import all_keys, make_config
from tests.conftest import REPO

RECIPES = sorted((REPO / "launch" / "configs").glob("*.yaml"))


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"tiny.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_names_a_shipped_deepspeed_json(recipe: Path):
    cfg = make_config(recipe)
    assert (REPO / cfg.deepspeed_config).is_file(), cfg.deepspeed_config


def test_tiny_recipe_is_the_embedded_default():
    assert make_config(REPO / "launch" / "configs" / "tiny.yaml") == make_config()


def test_docs_document_every_config_key():
    """The README is a front door; the key table lives in docs/configuration.md, which must name every key."""
    page = (REPO / "docs" / "configuration.md").read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in page]
    assert not missing, f"docs/configuration.md lacks config keys: {missing}"


def test_readme_is_a_front_door():
    """Issue 27: the README stays under 20,000 bytes; the manual is in docs/."""
    size = (REPO / "README.md").stat().st_size
    assert size < 20_000, f"README.md is {size:,} bytes: move detail into docs/"


MARKDOWN_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _markdown_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "eval" / "README.md"]


def _relative_links(page: Path) -> list[str]:
    """The relative link targets of a markdown page, anchors dropped; code blocks and code spans are not links."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`]+`", "", text)  # a code span may run over a line break
    targets = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s), mailto, ...; an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def test_markdown_link_pattern_finds_links_and_images(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[a](docs/x.md#y) ![img](pic.png) [web](https://e.org) [here](#top) `[no](code.md)`\n"
                    "```\n[no](block.md)\n```\n[t](../README.md \"title\")\n")
    assert _relative_links(page) == ["docs/x.md", "pic.png", "../README.md"]


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_docs_relative_links_point_at_files_that_exist(page: Path):
    """Every relative link in the README, docs/*.md and eval/README.md resolves. Links into pipeline/ are checked
    for their directory only, since the package's modules move between subpackages."""
    assert page.is_file(), page
    broken = []
    for target in _relative_links(page):
        path = (page.parent / target).resolve()
        try:
            inside = path.relative_to(REPO.resolve())
        except ValueError:
            broken.append(f"{target} (outside the repository)")
            continue
        if inside.parts[:1] == ("pipeline",) and path.suffix:
            path = path.parent
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)} links to missing files: {broken}"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    assert command in readme and command in ci.splitlines()


# ----------------------------------------------------------------------------------------------------------
# Llama-scale recipes: the declared architecture is the published one

# From each model's config.json on the Hugging Face Hub (meta-llama/Llama-2-7b-hf, Llama-2-13b-hf, Llama-2-70b-hf,
# Meta-Llama-3-8B), and the parameter counts those configs give (the "7B" of Llama-2-7B is 6.74e9).
PUBLISHED = {
    "llama2-7b.yaml": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           vocab_size=32000, intermediate_size=11008, max_position_embeddings=4096,
                           rope_theta=10000.0, params=6_738_415_616),
    "llama2-13b.yaml": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                            vocab_size=32000, intermediate_size=13824, max_position_embeddings=4096,
                            rope_theta=10000.0, params=13_015_864_320),
    "llama2-70b.yaml": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                            vocab_size=32000, intermediate_size=28672, max_position_embeddings=4096,
                            rope_theta=10000.0, params=68_976_648_192),
    "llama3-8b.yaml": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           vocab_size=128256, intermediate_size=14336, max_position_embeddings=8192,
                           rope_theta=500000.0, params=8_030_261_248),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_llama_recipe_builds_the_published_architecture(name):
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.model.load import config_value, shape_config

    cfg = make_config(REPO / "launch" / "configs" / name)
    expected = dict(PUBLISHED[name])
    params = expected.pop("params")
    config = shape_config(cfg.model.shape)  # built from the recipe alone: no weights, no config.json
    assert {k: config_value(config.to_dict(), k) for k in expected} == expected
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == params
    # What a user must supply is left to them; the run shape is complete.
    assert cfg.model.name_or_path == "/path/to/weights"
    assert cfg.model.gradient_checkpointing
    assert cfg.train.seq_len <= expected["max_position_embeddings"]
    ds = json.loads((REPO / cfg.deepspeed_config).read_text())
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] in (2, 3)


def test_weights_of_another_architecture_are_refused(tiny_model_dir):
    from pipeline.errors import UserError
    from pipeline.model.load import check_model_dir, check_shape

    config = check_model_dir(str(tiny_model_dir))
    cfg = make_config(REPO / "launch" / "configs" / "llama2-7b.yaml")
    with pytest.raises(UserError, match=r"hidden_size: recipe 4096, .*config.json 64"):
        check_shape(config, cfg.model.shape, str(tiny_model_dir))
    check_shape(config, make_config().model.shape, str(tiny_model_dir))  # nothing declared: nothing to refuse


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_accepts_the_published_config_json(name):
    """The Hub's config.json files of Llama 2 were written by transformers 4.31 and carry no rope_theta; the
    recipes must accept them as they are (and still refuse another model's)."""
    from pipeline.errors import UserError
    from pipeline.model.load import check_shape

    hub = {k: v for k, v in PUBLISHED[name].items() if k != "params"}
    if name.startswith("llama2"):
        del hub["rope_theta"]
    hub.update(model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5)
    cfg = make_config(REPO / "launch" / "configs" / name)
    check_shape(hub, cfg.model.shape, "/weights")
    other = "llama2-13b.yaml" if name != "llama2-13b.yaml" else "llama2-7b.yaml"
    with pytest.raises(UserError, match="not the architecture the recipe is sized for"):
        check_shape(hub, make_config(REPO / "launch" / "configs" / other).model.shape, "/weights")


def test_testing_doc_holds_the_suites_inventory():
    """docs/testing.md's inventory (modules, tiers, test counts, tolerances) is what the test files say now."""
    from tests import inventory

    assert inventory.current() == inventory.table(), "docs/testing.md is stale: python tests/inventory.py --write"


def test_inventory_can_tell_a_change():
    """The check above can fail: a module's tolerance or tier changed in its source shows in its row."""
    from tests import inventory

    row = inventory.module_row(REPO / "tests" / "test_architectures.py")
    assert row["tests"] == 1 and not row["launcher"] and 1e-5 in row["tolerances"]
    assert inventory.module_row(REPO / "tests" / "test_resume.py")["launcher"]
