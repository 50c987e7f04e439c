"""The docs stay true: every YAML snippet in docs/ and the README loads and validates, and the plugin worked
example of docs/plugins.md runs and keeps the tokens a hand computation says."""

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tokenprune as tp

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def snippets():
    for path in DOCS:
        for i, text in enumerate(blocks(path, "yaml")):
            yield pytest.param(path, text, id=f"{path.relative_to(REPO)}#{i}")


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """docs/plugins.md's Python block as the importable module my_operators."""
    (code,) = blocks(REPO / "docs" / "plugins.md", "python")
    (tmp_path / "my_operators.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    from tokenprune.core import (
        registry,  # leave the registry as it was (docs/operators.md lists the shipped ones)
    )

    registry._REGISTRY.pop("centre_bias", None)
    sys.modules.pop("my_operators", None)


def test_the_docs_hold_yaml_snippets():
    assert len(list(snippets())) >= 4


@pytest.mark.parametrize("path,text", list(snippets()))
def test_every_yaml_snippet_loads_and_validates(path, text, plugin_module):
    """A whole pipeline (it has `stages`) is built; a stage fragment (a list) is built as a pipeline of it."""
    data = yaml.safe_load(text)
    if isinstance(data, list):
        data = {"name": "fragment", "stages": data}
    assert "stages" in data, f"{path}: a YAML snippet that is neither a pipeline nor a stage list"
    tp.load_pipeline(data)


@torch.no_grad()
def test_the_plugin_example_keeps_the_centre_of_the_grid(plugin_module):
    from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs

    (pipeline,) = [t for t in blocks(REPO / "docs" / "plugins.md", "yaml")]
    pipe = tp.load_pipeline(yaml.safe_load(pipeline))
    model = tiny_llava("sdpa")
    inputs = tiny_llava_inputs(model)
    with pipe.attach(model):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    # by hand: on the 8x8 grid the 16 cells closest to the centre (3.5, 3.5) are the 4x4 block rows/cols 2..5
    # (distance^2 <= 4.5 ... the block's corners at 4.5 beat the edge cells at 6.5)
    centre = sorted(r * 8 + c for r in range(2, 6) for c in range(2, 6))
    visual = inputs["input_ids"] == model.config.image_token_id
    for b in range(2):
        first = int(visual[b].nonzero()[0])
        kept_visual = [i - first for i in pipe.trace[0].kept[b] if visual[b, i]]
        assert kept_visual == centre
    with pytest.raises(tp.ConfigError, match=r"stages\.0\.operators\.0\.power: must be > 0"):
        tp.load_pipeline({"plugins": ["my_operators"], "stages": [{"layer": 0, "operators": [
            {"op": "centre_bias", "power": -1.0}, {"op": "topk"}]}]})
