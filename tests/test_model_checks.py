"""The model-dependent checks of a pipeline from ``config.json`` alone, before any weights load: depth, sites,
signals, token kinds, positions; and the model folder itself (missing, empty, text-only, needing its own code)."""

import json

import pytest

import tokenprune as tp
from tokenprune.adapters import adapter_class, get_adapter
from tokenprune.core.errors import ConfigError
from tokenprune.eval import models
from tokenprune.eval.run import run
from tokenprune.eval.run_config import load_run_config
from tokenprune.reference import tiny

QUIET = ["logging.wandb.mode=disabled", "logging.progress_bar=false"]


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load weights fails the test: the error must come before."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(models, "open_model", refuse)


def run_with(tmp_path, folder, *extra):
    return run(load_run_config("experiments/asap_shapes.yaml", [
        f"model.path={folder}", "data.limit=2", f"output_dir={tmp_path / 'run'}", f"baseline_cache={tmp_path / 'c'}",
        *QUIET, *extra]))


def test_a_layer_beyond_the_depth_is_refused_from_config_json(tmp_path, tiny_folder, no_weights):
    # the tiny reference model has 4 decoder layers (conftest.tiny_folder)
    with pytest.raises(ConfigError) as e:
        run_with(tmp_path, tiny_folder, "pipeline=fastv", "overrides=[stages.0.layer=4]")
    assert e.value.key == "pipeline.stages.0.layer" and "4 decoder layers" in e.value.detail
    assert not (tmp_path / "c").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("pipeline, key, words", [
    ("{stages: [{layer: cross_attention, operators: [{op: attention}, {op: topk, keep: 0.5}]}]}",
     "pipeline.stages.0.layer", "not a site of LLaVA-1.5"),
    ("{stages: [{layer: 2, protect: [image_newline], operators: [{op: attention}, {op: topk, keep: 0.5}]}]}",
     "pipeline.stages.0.protect", "not a token kind of LLaVA-1.5"),
    ("{stages: [{layer: kv_cache, cache: {layers: [7]}, operators: [{op: elite_window}, {op: topk, keep: 0.5}]}]}",
     "pipeline.stages.0.cache.layers", "4 decoder layers"),
])
def test_what_the_model_cannot_run_is_refused_before_it_loads(tmp_path, tiny_folder, no_weights, pipeline, key, words):
    with pytest.raises(ConfigError) as e:
        run_with(tmp_path, tiny_folder, f"pipeline={pipeline}")
    assert e.value.key.startswith(key) and words in e.value.detail


def test_model_folders_that_cannot_be_used_name_model_path(tmp_path, no_weights):
    cases = {}
    cases["missing"] = tmp_path / "nope"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["empty"] = empty
    text_only = tmp_path / "llama"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    cases["text_only"] = text_only
    words = {"missing": "no such model folder", "empty": "holds no config.json", "text_only": "model_type 'llama'"}
    for name, folder in cases.items():
        with pytest.raises(ConfigError) as e:
            run_with(tmp_path, folder, "pipeline=fastv")
        assert e.value.key == "model.path" and words[name] in e.value.detail, name


def test_a_model_that_needs_its_own_code_is_refused_while_remote_code_is_off(tmp_path, no_weights):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "my_vlm", "auto_map": {"AutoConfig": "configuration_my_vlm.MyConfig"}}))
    (folder / "configuration_my_vlm.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(ConfigError) as e:
        run_with(tmp_path, folder, "pipeline=fastv")
    assert e.value.key == "model.trust_remote_code" and "auto_map" in e.value.detail


@pytest.mark.parametrize("build, layers, cross", [
    (lambda: tiny.tiny_llava(layers=3), 3, ()),
    (lambda: tiny.tiny_qwen2_vl(layers=2), 2, ()),
    (lambda: tiny.tiny_llava_next(layers=4), 4, ()),
    (tiny.tiny_mllama, None, None),
])
def test_config_json_states_the_facts_the_loaded_model_has(build, layers, cross):
    model = build()
    cls = adapter_class(model.config)
    from_config = cls.facts_from_config(model.config)
    text = getattr(model.config, "text_config", model.config)
    # by hand from the built model's modules: its decoder layers and, for Mllama, the layers with cross_attn
    decoder = model.model.language_model.layers
    assert from_config.num_layers == len(decoder) == (layers or text.num_hidden_layers)
    with_cross = tuple(i for i, layer in enumerate(decoder) if hasattr(layer, "cross_attn"))
    assert from_config.cross_attention_layers == with_cross and (cross is None or with_cross == cross)
    assert from_config == get_adapter(model).facts()


def test_mllama_decoder_sites_are_refused_from_its_config():
    model = tiny.tiny_mllama()
    cls = adapter_class(model.config)
    pipeline = tp.load_pipeline("fastv")
    with pytest.raises(ConfigError) as e:
        cls.check_pipeline(cls.facts_from_config(model.config), pipeline)
    assert e.value.key == "stages.0.layer" and "allowed: cross_attention" in e.value.detail
    cls.check_pipeline(cls.facts_from_config(model.config), tp.load_pipeline("trimmed_llama"))
