"""Every preset builds, validates and runs on a tiny model of each family it supports."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import families, load_for_tiny

import tokenprune as tp
from tokenprune.core.config import preset_names
from tokenprune.core.errors import ConfigError
from tokenprune.measure.flops import parse_shape, pipeline_flops

PRESETS = ["asap", "dart", "fastv", "feather", "pyramiddrop", "random", "sparsevlm", "uniform", "zipvl",
           "visionzip", "prumerge_plus", "divprune", "tome", "vscan", "holitom", "trimmed_llama", "sgl", "topv",
           "static_patches", "pooling", "cdpruner", "fastervlm", "vispruner", "hiprune", "mustdrop", "quecc", "fastvid", "prunevid", "holitom_video"]
#: The preset for cross-attention models.
CROSS = {"trimmed_llama"}
#: Presets at the kv_cache site (one trace per compressed layer; tests/test_kv_cache.py has their oracles).
KV = ["aircache", "csp", "elastic_cache", "mint", "dycoke", "attention_predictor"]


@pytest.fixture
def no_eager(monkeypatch):
    """Every family's eager attention raises: a pruned forward must never need attention weights from the model
    (the pipelines recompute the rows they need; the model keeps SDPA)."""
    import importlib

    def eager(*args, **kwargs):
        raise AssertionError("eager attention ran (attention weights were materialised by the model)")

    for name in ("llama", "clip", "qwen2", "siglip", "qwen2_vl", "qwen2_5_vl", "mllama", "llava", "llava_next",
                 "llava_onevision", "internvl", "qwen3", "qwen3_vl", "gemma3", "qwen3_5"):
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        monkeypatch.setattr(module, "eager_attention_forward", eager, raising=False)


def test_the_eager_guard_catches_eager_attention(no_eager):
    from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs

    model = tiny_llava("eager", layers=2)
    with pytest.raises(AssertionError, match="eager attention ran"):
        model(**tiny_llava_inputs(model))


@pytest.fixture(scope="module")
def llava32():
    """A 32-layer tiny LLaVA (the depth of a 7B LLM, so every preset's layers exist)."""
    from tokenprune.reference.tiny import tiny_llava

    return tiny_llava("sdpa", layers=32, vision_layers=4)


def test_every_method_has_a_preset():
    assert set(PRESETS) | set(KV) <= set(preset_names())


@pytest.mark.parametrize("name", sorted(set(PRESETS) - CROSS))
@torch.no_grad()
def test_preset_runs_and_generates(llava32, name, no_eager):
    from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs

    pipe = load_for_tiny(name)
    inputs = tiny_llava_inputs(llava32)  # a padded batch of two (adaptive budgets keep different counts)
    guide = {"guide": tiny_llava("sdpa", layers=2, seed=3)} if name == "sgl" else {}
    with pipe.attach(llava32, **guide):
        out = llava32.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert len(pipe.trace) == len(pipe.stages)
    first, last = pipe.trace[0], pipe.trace[-1]
    assert all(a < b for a, b in zip(last.visual_after, first.visual_before)), pipe.report()
    for stage, trace in zip(pipe.stages, pipe.trace):  # the analytic budget (FLOPs) is what actually ran
        try:
            expected = [stage.expected_kept(v) for v in trace.visual_before]
        except NotImplementedError:
            continue  # adaptive
        assert trace.visual_after == expected, (stage.key, trace)


@pytest.fixture(scope="module")
def family32():
    """32-layer tiny LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and InternVL, so every preset's layers exist."""
    from tokenprune.reference.tiny import (
        tiny_gemma3,
        tiny_gemma3_inputs,
        tiny_internvl,
        tiny_internvl_inputs,
        tiny_llava_next,
        tiny_llava_next_inputs,
        tiny_llava_onevision,
        tiny_llava_onevision_inputs,
        tiny_qwen2_vl,
        tiny_qwen2_vl_inputs,
        tiny_qwen3_5,
        tiny_qwen3_vl,
    )

    nxt = tiny_llava_next("sdpa", layers=32, vision_layers=4)
    qwen = tiny_qwen2_vl("sdpa", layers=32, vision_layers=4)
    qwen25 = tiny_qwen2_vl("sdpa", layers=32, version="2.5", vision_layers=4)
    ov = tiny_llava_onevision("sdpa", layers=32, vision_layers=4)
    ivl = tiny_internvl("sdpa", layers=32, vision_layers=4)
    qwen3 = tiny_qwen3_vl("sdpa", layers=32, vision_layers=4)
    gemma = tiny_gemma3("sdpa", layers=32, vision_layers=4)
    qwen35 = tiny_qwen3_5("sdpa", layers=32, vision_layers=4)
    return {"llava_next": (nxt, tiny_llava_next_inputs(nxt)), "qwen2_vl": (qwen, tiny_qwen2_vl_inputs(qwen)),
            "qwen2_5_vl": (qwen25, tiny_qwen2_vl_inputs(qwen25)),
            "llava_onevision": (ov, tiny_llava_onevision_inputs(ov)), "internvl": (ivl, tiny_internvl_inputs(ivl)),
            "qwen3_vl": (qwen3, tiny_qwen2_vl_inputs(qwen3)), "gemma3": (gemma, tiny_gemma3_inputs(gemma)),
            "qwen3_5": (qwen35, tiny_qwen2_vl_inputs(qwen35)),
            # small guide models (SGL) that tokenise images as the large ones do
            "llava_next_guide": tiny_llava_next("sdpa", layers=2, seed=3, vision_layers=4),
            "qwen2_vl_guide": tiny_qwen2_vl("sdpa", layers=2, seed=3),
            "qwen2_5_vl_guide": tiny_qwen2_vl("sdpa", layers=2, version="2.5", seed=3),
            "llava_onevision_guide": tiny_llava_onevision("sdpa", layers=2, seed=3, vision_layers=4),
            "internvl_guide": tiny_internvl("sdpa", layers=2, seed=3, vision_layers=4),
            "qwen3_vl_guide": tiny_qwen3_vl("sdpa", layers=2, seed=3, vision_layers=4),
            "gemma3_guide": tiny_gemma3("sdpa", layers=2, seed=3, vision_layers=4),
            "qwen3_5_guide": tiny_qwen3_5("sdpa", layers=4, seed=3, vision_layers=4)}


MATRIX_FAMILY = {"llava_next": "LLaVA-NeXT", "qwen2_vl": "Qwen2-VL / Qwen2.5-VL", "qwen2_5_vl": "Qwen2-VL / Qwen2.5-VL",
                 "llava_onevision": "LLaVA-OneVision", "internvl": "InternVL",
                 "qwen3_vl": "Qwen3-VL", "gemma3": "Gemma 3", "qwen3_5": "Qwen3.5"}


@pytest.fixture(scope="module")
def refused():
    """(preset, family) cells the method x family matrix refuses (tests/test_cli_and_docs.py checks that attach
    refuses them, with the matrix's reason)."""
    from tokenprune.eval.matrix import method_family_matrix

    return {(c.preset, c.family.split(" (")[0]) for c in method_family_matrix() if c.refused}


@pytest.mark.parametrize("family", families("llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision", "internvl",
                                             "qwen3_vl", "gemma3", "qwen3_5"))
@pytest.mark.parametrize("name", sorted(set(PRESETS) - CROSS))
@torch.no_grad()
def test_preset_on_other_families(family32, refused, family, name, no_eager):
    """Every decoder-layer preset the matrix runs on LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, InternVL, Qwen3-VL and Gemma 3 generates there under
    the no-eager guard and prunes, with the analytic budget what ran."""
    if (name, MATRIX_FAMILY[family]) in refused:
        pytest.skip("refused on this family (the matrix says why)")
    model, inputs = family32[family]
    pipe = load_for_tiny(name)
    guide = {"guide": family32[f"{family}_guide"]} if name == "sgl" else {}
    with pipe.attach(model, **guide):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    first, last = pipe.trace[0], pipe.trace[-1]
    assert sum(last.visual_after) < sum(first.visual_before), pipe.report()  # adaptive budgets may keep a sample whole
    for stage, trace in zip(pipe.stages, pipe.trace):  # the analytic budget (FLOPs) is what actually ran
        try:
            expected = [stage.expected_kept(v, trace.tiles[b] if trace.tiles else None)
                        for b, v in enumerate(trace.visual_before)]
        except NotImplementedError:
            continue  # adaptive
        assert trace.visual_after == expected, (stage.key, trace)


def mllama_presets() -> list[str]:
    from tokenprune.eval.matrix import method_family_matrix

    # (downsample changes the images before the processor: tests/test_downsample.py runs it through Mllama's)
    return sorted(c.preset for c in method_family_matrix() if c.family.startswith("LLaMA-3.2-Vision") and not c.refused
                  and tp.load_pipeline(c.preset).input is None)


@pytest.mark.parametrize("name", mllama_presets())
@torch.no_grad()
def test_the_presets_the_matrix_runs_on_mllama_generate_there(name, no_eager):
    """Every preset the matrix runs on LLaMA-3.2-Vision (trimmed_llama, and the pre-LLM ones at layer 0, its image
    features) generates on a tiny Mllama under the no-eager guard and prunes the image features."""
    from tokenprune.reference.tiny import tiny_mllama, tiny_mllama_inputs

    assert {"trimmed_llama", "visionzip", "divprune"} <= set(mllama_presets())
    model = tiny_mllama("sdpa")
    inputs = tiny_mllama_inputs(model)
    pipe = load_for_tiny(name)
    with pipe.attach(model):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    trace = pipe.trace[0]
    assert trace.layer == 1 and all(a < b for a, b in zip(trace.visual_after, trace.visual_before)), pipe.report()


def test_asap_cuts_78_to_82_percent_on_llava_next():
    out = subprocess.run([sys.executable, "-m", "tokenprune.cli", "flops", "asap", "--shape", "llava-next-7b",
                          "--tokens", "2940", "--visual", "2880", "--convention", "fastv", "--json"], capture_output=True, text=True, check=True)
    reduction = json.loads(out.stdout)["reduction"]
    assert 0.78 <= reduction <= 0.82, reduction


def test_a_family_without_an_adapter_gives_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM._from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=2, vocab_size=64))
    with pytest.raises(TypeError, match="no tokenprune adapter for model_type 'llama'"):
        tp.load_pipeline("asap").attach(model)


def test_a_site_beyond_the_depth_names_the_key(llava_pair):
    with pytest.raises(ConfigError) as e:
        tp.load_pipeline("pyramiddrop").attach(llava_pair["sdpa"])
    assert e.value.key == "stages.0.layer" and "4 decoder layers" in str(e.value)


def test_selecting_merger_stands_alone_and_refuses_a_selector():
    tp.load_pipeline({"stages": [{"layer": 2, "operators": [{"op": "bipartite"}]}]})
    with pytest.raises(ConfigError) as e:
        tp.load_pipeline({"stages": [{"layer": 2, "operators": [{"op": "random"}, {"op": "topk"}, {"op": "bipartite"}]}]})
    assert e.value.key == "stages.0.operators.2" and "chooses its own tokens" in str(e.value)
    with pytest.raises(ConfigError) as e:
        tp.load_pipeline({"stages": [{"layer": 2, "positions": "shuffle", "operators": [{"op": "bipartite"}]}]})
    assert e.value.key == "stages.0.positions" and "renumber" in str(e.value)
    with pytest.raises(ConfigError) as e:
        tp.load_pipeline({"stages": [{"layer": 0, "operators": [{"op": "bipartite"}]}]})
    assert e.value.key == "stages.0.layer"  # keys need the previous layer


def test_adaptive_budgets_refuse_analytic_flops():
    with pytest.raises(ConfigError) as e:
        pipeline_flops(tp.load_pipeline("zipvl"), parse_shape("llava-1.5-7b"), 640, 576)
    assert e.value.key == "stages.0" and "measured" in str(e.value)


@pytest.mark.parametrize("override", ["stages.0.operators.0={op: none}", "stages.0.operators.0={op: rope_free}",
                                      "stages.0.operators.0={op: rope_gravity}", "stages.0.operators.4.op=drop"])
@torch.no_grad()
def test_asap_ablations_are_one_override(llava_pair, batch, override):
    """The ablations listed in docs/methods/asap.md build and run."""
    pipe = tp.load_pipeline("asap", [override])
    with pipe.attach(llava_pair["sdpa"]):
        llava_pair["sdpa"](**batch)
    assert pipe.trace[0].visual_after == [10, 10]  # 15% of 64


@pytest.mark.parametrize("family", families("llava", "llava_next", "qwen2_vl", "llava_onevision", "internvl",
                                             "qwen3_vl", "gemma3", "qwen3_5"))
@pytest.mark.parametrize("name", KV)
@torch.no_grad()
def test_kv_cache_preset_runs_on_each_family(llava32, family32, refused, family, name, no_eager):
    """Every KV-cache preset compresses the caches of a 32-layer model of each decoder-only family and decodes
    (Qwen3.5: its eight attention layers' caches)."""
    from tokenprune.adapters import get_adapter
    from tokenprune.reference.tiny import tiny_llava_inputs

    if family != "llava" and (name, MATRIX_FAMILY[family]) in refused:
        pytest.skip("refused on this family (the matrix says why)")
    model, inputs = (llava32, tiny_llava_inputs(llava32)) if family == "llava" else family32[family]
    pipe = load_for_tiny(name)
    with pipe.attach(model):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 2
    kv = [t for t in pipe.trace if t.site == "kv_cache"]
    attending = get_adapter(model).attending_layers()
    first = 3 if name == "dycoke" else 0  # its layers: {from: 3}
    assert [t.layer for t in kv] == [i for i in attending if i >= first]
    assert len(attending) == (8 if family == "qwen3_5" else 32)
    if name == "mint":  # the prefill keeps everything; decoding step 1 halves the layers from score_layer 2 on
        dec = [t for t in pipe.trace if t.site == "decode"]
        assert [t.layer for t in dec] == list(range(2, 32))
        assert all(a == round(b / 2 + 0.01) for t in dec for a, b in zip(t.visual_after, t.visual_before))  # halves up
        return
    if name == "dycoke":  # the prefill keeps everything; each decoding step shows layers 3.. a fifth of the image
        dec = [t for t in pipe.trace if t.site == "decode"]
        assert [(t.step, t.layer) for t in dec] == [(1, i) for i in range(3, 32)]  # 2 new tokens: 1 decoding step
        assert all(a == round(b / 5 + 0.01) for t in dec for a, b in zip(t.visual_after, t.visual_before))
        return
    if name == "attention_predictor":  # the prefill keeps everything; each decoding step shows each layer a quarter
        dec = [t for t in pipe.trace if t.site == "decode"]
        assert [(t.step, t.layer) for t in dec] == [(1, i) for i in attending]
        assert all(a == round(b / 4 + 0.01) for t in dec for a, b in zip(t.visual_after, t.visual_before))
        assert all(len(t.hit_rate) == len(t.visual_after) for t in dec)
        return
    assert all(sum(t.visual_after) < sum(t.visual_before) for t in kv), pipe.report()
    for t in kv:  # what the trace says is what the cache holds
        layer = out.past_key_values.layers[t.layer]
        assert layer.keys.shape[-2] >= max(t.tokens_after)
