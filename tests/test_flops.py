"""FLOPs: FastV's formula by hand, and the exact convention against torch.utils.flop_counter."""

import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenprune as tp
from tokenprune.cli import main
from tokenprune.measure.flops import BUILTIN_SHAPES, LLMShape, parse_shape, pipeline_flops
from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs


def fastv_pipe(k, r):
    return tp.load_pipeline("fastv", [f"stages.0.layer={k}", f"stages.0.operators.1.keep={1 - r}"])


def paper_ratio(d, m, layers, k, r, n=576):
    """FastV (ECCV 2024, Sec. 4): ratio = [K f(n) + (T-K) f(n')] / [T f(n)], f(n) = 4nd² + 2n²d + 2ndm,
    n' = (1 - R) n, n the 576 image tokens of LLaVA-1.5. Tokens are whole: n' is rounded (R=90%: 57.6 -> 58)."""
    def f(x):
        return 4 * x * d * d + 2 * x * x * d + 2 * x * d * m
    n_hat = round((1 - r) * n)
    return (k * f(n) + (layers - k) * f(n_hat)) / (layers * f(n))


@pytest.mark.parametrize("model,d,m,layers", [("llava-1.5-7b", 4096, 11008, 32), ("llava-1.5-13b", 5120, 13824, 40)])
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("r", [0.5, 0.75, 0.9])
def test_fastv_convention_reproduces_the_papers_formula(model, d, m, layers, k, r):
    report = pipeline_flops(fastv_pipe(k, r), BUILTIN_SHAPES[model], 576, 576, "fastv")
    assert report.flops / report.baseline_flops == pytest.approx(paper_ratio(d, m, layers, k, r), rel=1e-3)


def test_fastv_convention_hand_values():
    # 7B, n=576: f(576) = 4*576*4096^2 + 2*576^2*4096 + 2*576*4096*11008 = 93,314,875,392 per layer.
    base = pipeline_flops(None, BUILTIN_SHAPES["llava-1.5-7b"], 576, 576, "fastv")
    assert base.flops == 32 * 93_314_875_392
    # K=2, R=50%: 2 f(576) + 30 f(288), f(288) = 45,977,960,448.
    half = pipeline_flops(fastv_pipe(2, 0.5), BUILTIN_SHAPES["llava-1.5-7b"], 576, 576, "fastv")
    assert half.flops == 2 * 93_314_875_392 + 30 * 45_977_960_448
    assert half.reduction == pytest.approx(0.4756, abs=1e-4)
    assert half.equivalent_visual_tokens == (2 * 576 + 30 * 288) / 32


def test_text_tokens_are_never_pruned_in_the_count():
    report = pipeline_flops(fastv_pipe(2, 0.5), BUILTIN_SHAPES["llava-1.5-7b"], 640, 576, "fastv")
    assert report.per_layer_tokens[:2] == [640, 640] and set(report.per_layer_tokens[2:]) == {640 - 288}


def test_exact_convention_matches_torch_flop_counter():
    """Analytic exact FLOPs with the real per-layer token counts equal the counted matmuls of a pruned forward."""
    model = tiny_llava("eager", layers=4)
    inputs = tiny_llava_inputs(model, prompts=[[10, 11, 12, 13]])
    pipe = tp.load_pipeline("fastv", ["stages.0.operators.1.keep=0.25"])
    with torch.no_grad(), pipe.attach(model), FlopCounterMode(display=False) as counter:
        model(**inputs)
    counted = 0
    for name, ops in counter.get_flop_counts().items():
        if re.search(r"language_model\.layers\.\d+\.(self_attn|mlp)$", name):
            counted += sum(ops.values())
    n = inputs["input_ids"].shape[1]
    shape = LLMShape.from_config(model.config.text_config)
    analytic = pipeline_flops(pipe, shape, n, 64, "exact")
    assert analytic.per_layer_tokens == [n, n, n - 48, n - 48]
    assert counted == analytic.flops


def test_shapes_and_errors():
    assert parse_shape("d=64,m=128,layers=4,heads=4,kv_heads=2").kv_heads == 2
    with pytest.raises(tp.ConfigError):
        parse_shape("llava-99b")
    with pytest.raises(tp.ConfigError):
        parse_shape("d=64,layers=4")


def test_cli_flops_json(capsys):
    assert main(["flops", "fastv", "--shape", "llava-1.5-7b", "--tokens", "576", "--visual", "576",
                 "--convention", "fastv", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"flops", "baseline_flops", "reduction", "equivalent_visual_tokens"}
    assert out["baseline_flops"] == 32 * 93_314_875_392
    assert main(["flops", "fastv", "stages.0.operators.1.keep=0.25", "--shape", "d=4096,m=11008,layers=32",
                 "--tokens", "600", "--visual", "576", "--convention", "exact", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["equivalent_visual_tokens"] == (2 * 576 + 30 * 144) / 32
    assert main(["flops", "fastv", "--shape", "llava-1.5-7b", "--tokens", "10", "--visual", "576"]) == 2
    assert "--visual" in capsys.readouterr().err


def test_mergers_that_add_tokens_count_in_the_budget():
    """VisionZip keeps 54 dominant + 10 contextual of 576; SparseVLM's recycling adds 10% of each stage's
    dropped tokens back as cluster tokens (by hand: 192+38, 153+8, 81+8)."""
    from tokenprune.measure.flops import layer_token_counts

    counts = layer_token_counts(tp.load_pipeline("visionzip"), 32, 640, 576)
    assert counts[0] == (640 - 576 + 64, 64)
    counts = layer_token_counts(tp.load_pipeline("sparsevlm"), 32, 640, 576)
    assert [counts[i][1] for i in (1, 2, 6, 15)] == [576, 230, 161, 89]
