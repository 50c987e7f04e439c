"""Pipeline YAML: loading, overrides and validation errors that name the key path."""

from pathlib import Path

import pytest

import tokenprune as tp
from tokenprune.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def fastv_dict(**topk):
    return {"name": "x", "stages": [{"layer": 2, "operators": [{"op": "attention"}, {"op": "topk", **topk}]}]}


def error_of(source, overrides=()):
    with pytest.raises(ConfigError) as info:
        tp.load_pipeline(source, overrides)
    return info.value


#: Shipped YAML that is not a pipeline, and what validates it instead.
NOT_PIPELINES = {"experiments/train_reference.yaml", "experiments/train_reference_qwen.yaml",
                 "experiments/train_reference_video.yaml"}
OPERATOR_TRAINING = {"experiments/train_quecc.yaml", "experiments/train_attention_predictor.yaml"}


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "experiments").rglob("*.yaml")))
def test_every_shipped_yaml_loads_and_validates(path):
    if path in NOT_PIPELINES:
        from tokenprune.reference.train import load_config

        assert load_config(REPO / path).optim.max_steps >= 1  # the training config: unknown keys would raise
        return
    if path in OPERATOR_TRAINING:
        from tokenprune.eval.train_operator import load_config as operator_config

        assert operator_config(REPO / path).optim.max_steps >= 1  # its pipeline and operator built too
        return
    import yaml

    if path.startswith("experiments/bench"):  # bench.yaml, bench_kv.yaml, bench_gpu.yaml
        from tokenprune.eval.bench import load_bench_config

        cfg = load_bench_config(REPO / path)
        for v in cfg.variants[1:]:
            tp.load_pipeline(v.pipeline, list(v.get("overrides") or []))
        return
    if path.startswith("experiments/ablations/"):  # a sweep: every variant's run config and pipeline
        from tokenprune.eval.run_config import resolve_pipeline
        from tokenprune.eval.sweep import Sweep

        sweep = Sweep(REPO / path)
        variants = sweep.variants()
        assert len({v.name for v in variants}) == len(variants)
        for v in variants:
            assert resolve_pipeline(sweep.base_config(v)) is not None, v.name
        return
    raw = yaml.safe_load((REPO / path).read_text())
    if "input" in raw:  # changes the images before the processor; may prune nothing inside the model
        assert tp.load_pipeline(REPO / path).input == raw["input"]
        return
    if "stages" not in raw:  # a run config (tokenprune run)
        from tokenprune.eval.run_config import load_run_config, resolve_pipeline

        pipe = resolve_pipeline(load_run_config(REPO / path))  # unknown keys and a bad pipeline would raise
    else:
        pipe = tp.load_pipeline(REPO / path)
    assert len(pipe.stages) >= 1
    assert all(stage.selector is not None for stage in pipe.stages)


def test_fastv_preset_is_the_papers_setting():
    pipe = tp.load_pipeline("fastv")
    (stage,) = pipe.stages
    assert stage.layer == 2
    assert [op.op_name for op in stage.operators] == ["attention", "topk"]
    assert stage.operators[0].params.queries == "last"
    assert stage.selector.params.keep == 0.5


def test_unknown_operator_names_key_and_suggests():
    e = error_of({"stages": [{"layer": 2, "operators": [{"op": "atention"}, {"op": "topk"}]}]})
    assert e.key == "stages.0.operators.0.op"
    assert "'attention'" in str(e) and "did you mean" in str(e)


@pytest.mark.parametrize("keep,fragment", [
    (1.5, "(0, 1]"), (0.0, "(0, 1]"), (-0.2, "(0, 1]"), (0, ">= 1"), (-3, ">= 1"), (True, "boolean"), ("half", "float | int"),
])
def test_keep_out_of_range(keep, fragment):
    e = error_of(fastv_dict(keep=keep))
    assert e.key == "stages.0.operators.1.keep"
    assert fragment in str(e)


def test_keep_as_count_and_fraction_are_distinct():
    assert tp.load_pipeline(fastv_dict(keep=1)).stages[0].selector.expected_kept(576) == 1
    assert tp.load_pipeline(fastv_dict(keep=1.0)).stages[0].selector.expected_kept(576) == 576
    assert tp.load_pipeline(fastv_dict(keep=64)).stages[0].selector.expected_kept(576) == 64
    assert tp.load_pipeline(fastv_dict(keep=64)).stages[0].selector.expected_kept(10) == 10


def test_wrong_type_and_unknown_parameter():
    e = error_of({"stages": [{"layer": 2, "operators": [{"op": "random", "seed": "abc"}, {"op": "topk"}]}]})
    assert e.key == "stages.0.operators.0.seed" and "int" in str(e)
    e = error_of(fastv_dict(kep=0.5))
    assert e.key == "stages.0.operators.1.kep" and "'keep'" in str(e)
    e = error_of({"stages": [{"layer": 2, "operators": [{"op": "attention", "heads": "median"}, {"op": "topk"}]}]})
    assert e.key == "stages.0.operators.0.heads"


@pytest.mark.parametrize("ops,key,fragment", [
    (["topk", "attention"], "stages.0.operators.0", "needs a scorer before"),
    (["attention", "topk", "topk"], "stages.0.operators.2", "at most one selector"),
    (["attention"], "stages.0.operators", "needs a selector"),
    (["topk"], "stages.0.operators.0", "needs a scorer"),
    (["attention", "kv_compact", "topk"], "stages.0.operators.1", "needs a selector before"),
    (["attention", "topk", "random"], "stages.0.operators.2", "comes after"),
])
def test_illegal_order(ops, key, fragment):
    e = error_of({"stages": [{"layer": 2, "operators": [{"op": o} for o in ops]}]})
    assert e.key == key, str(e)
    assert fragment in str(e) and "shift* → scorer* → selector" in str(e)


def test_stage_structure_errors():
    assert error_of({"stages": []}).key == "stages"
    assert error_of({"stage": []}).key == "stage"
    assert error_of({"stages": [{"layer": -1, "operators": [{"op": "random"}, {"op": "topk"}]}]}).key == "stages.0.layer"
    assert error_of({"stages": [{"layer": 2, "operators": [{"op": "random"}, {"op": "topk"}], "keep": 3}]}).key == "stages.0.keep"
    two = {"stages": [{"layer": 3, "operators": [{"op": "random"}, {"op": "topk"}]},
                      {"layer": 2, "operators": [{"op": "random"}, {"op": "topk"}]}]}
    assert "increasing" in str(error_of(two))
    e = error_of({"stages": [{"layer": 0, "operators": [{"op": "attention"}, {"op": "topk"}]}]})
    assert e.key == "stages.0.layer" and ">= 1" in str(e)


def test_layer_beyond_depth_is_checked_at_attach(llava_pair):
    pipe = tp.load_pipeline("fastv", ["stages.0.layer=4"])
    with pytest.raises(ConfigError) as info, pipe.attach(llava_pair["sdpa"]):
        pass
    assert info.value.key == "stages.0.layer" and "0..3" in str(info.value)


def test_overrides_by_dotted_path_and_list_index():
    pipe = tp.load_pipeline("fastv", ["stages.0.operators.1.keep=0.25", "stages.0.layer=3",
                                      "stages.0.operators.0={op: random, seed: 7}"])
    assert pipe.stages[0].layer == 3
    assert pipe.stages[0].selector.params.keep == 0.25
    assert pipe.stages[0].operators[0].op_name == "random" and pipe.stages[0].operators[0].params.seed == 7
    e = error_of("fastv", ["stages.1.layer=3"])  # the key where the path breaks
    assert e.key == "stages.1" and "1 item(s)" in str(e)
    assert error_of("fastv", ["stages.0.operators.5.keep=3"]).key == "stages.0.operators.5"
    assert error_of("fastv", ["stages.0.operators.1.keep"]).key == "stages.0.operators.1.keep"


def test_unknown_preset_suggests():
    e = error_of("fastvv")
    assert "fastv" in str(e) and "preset" in str(e)


def test_resolved_config_fills_defaults():
    cfg = tp.resolve_pipeline_config("fastv", ["stages.0.operators.1.keep=64"])
    assert cfg.stages[0].operators[0] == {"op": "attention", "weight": 1.0, "into": "", "queries": "last", "heads": "mean",
                                        "query_stride": 1, "rows": "mean"}
    assert cfg.stages[0].operators[1] == {"op": "topk", "keep": 64, "scores": ""}


def test_plugins_register_user_operators(tmp_path, monkeypatch):
    (tmp_path / "my_ops.py").write_text(
        "from dataclasses import dataclass\n"
        "from tokenprune import Scorer, register_operator\n"
        "@register_operator('first_tokens_test')\n"
        "class FirstTokens(Scorer):\n"
        "    '''Prefers earlier tokens.'''\n"
        "    def score(self, state):\n"
        "        return -state.positions.float()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pipe = tp.load_pipeline({"plugins": ["my_ops"], "stages": [{"layer": 1, "operators": [
        {"op": "first_tokens_test"}, {"op": "topk", "keep": 3}]}]})
    assert pipe.stages[0].operators[0].op_name == "first_tokens_test"
    e = error_of({"plugins": ["no_such_module_xyz"], "stages": []})
    assert e.key == "plugins.0"
