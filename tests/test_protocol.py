"""The measurement protocol: where the prefill's time goes (vision tower, LLM prefill, decoding), the vision
side's FLOPs against a hand count, and the speed-ups run and bench derive from them, by hand."""

import time

import pytest
import torch
from reference import clip_llava_flops

from tokenprune.eval.run import protocol_metrics
from tokenprune.measure.timing import VisionClock
from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs


@torch.no_grad()
def test_vision_flops_match_a_hand_count_with_sdpa_on_cpu():
    model = tiny_llava("sdpa")
    inputs = tiny_llava_inputs(model)
    with VisionClock(model) as vision:
        model(**inputs)
    assert [type(m).__name__ for m, _, _ in vision.calls] == ["CLIPVisionModel", "LlavaMultiModalProjector"]
    expected = clip_llava_flops(images=2, side=56, patch=7, d=32, m=64, layers=2, text=64)
    assert vision.flops() == expected
    cache: dict = {}
    assert vision.flops(cache) == expected and vision.flops(cache) == expected and len(cache) == 2


@torch.no_grad()
def test_the_vision_clock_times_the_tower_and_the_projector_only():
    model = tiny_llava("sdpa")
    inputs = tiny_llava_inputs(model)
    tower = model.model.vision_tower
    slow = tower.register_forward_hook(lambda *a: time.sleep(0.2))
    try:
        with VisionClock(model) as vision:
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            total = (time.perf_counter() - t0) * 1000
    finally:
        slow.remove()
    assert len(vision.calls) == 2  # the prefill's tower and projector; decoding steps run neither
    assert 200 <= vision.ms() < total


def test_protocol_metrics_by_hand():
    metrics = {"prefill_ms": 60.0, "baseline_prefill_ms": 100.0, "vision_ms": 20.0, "baseline_vision_ms": 20.0,
               "llm_prefill_ms": 40.0, "baseline_llm_prefill_ms": 80.0, "flops": 3e9, "baseline_flops": 9e9}
    got = protocol_metrics(metrics, vision_flops=1e9, baseline_vision_flops=1e9)
    assert got["vision_share"] == pytest.approx(0.2)
    assert got["prefill_speedup"] == pytest.approx(100 / 60) and got["llm_prefill_speedup"] == pytest.approx(2.0)
    assert got["flops_speedup"] == pytest.approx(3.0)
    assert got["flops_speedup_with_vision"] == pytest.approx(10 / 4)
    unknown = protocol_metrics({**metrics, "flops": None}, 1e9, 1e9)
    assert unknown["flops_speedup"] is None and unknown["flops_speedup_with_vision"] is None
