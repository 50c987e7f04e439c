"""The downsampling baseline: the image shown to the processor at a lower resolution (a pipeline's ``input``).
Checked by hand (the resized sizes), against each family's real processor (fewer visual tokens where the family has
dynamic resolution or size-chosen tiles, the same where it resizes every image to one size: the reason the
family check refuses it), and end to end against stock ``generate()`` on images resized by hand."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

import tokenprune as tp
from tokenprune.adapters import adapter_class
from tokenprune.core.errors import ConfigError
from tokenprune.eval.models import build_prompt, load_processor
from tokenprune.reference import shapes
from tokenprune.reference.processors import FAMILIES, save_tiny

#: an image side at which halving changes what each tiny processor makes (its tiles / its pixel budget)
SIDE = {"llava_next": 112, "llava_onevision": 112, "internvl": 112, "mllama": 56, "qwen2_vl": 112,
        "qwen2_5_vl": 112, "qwen3_vl": 112, "qwen3_5": 112, "gemma3": 112}


def test_the_images_are_scaled_by_hand():
    pipe = tp.load_pipeline("downsample")
    assert pipe.input == {"scale": 0.5} and len(pipe.stages) == 0
    a, b = Image.new("RGB", (64, 48)), Image.new("RGB", (33, 7))
    got = pipe.prepare_images([a, [b, a]])
    assert got[0].size == (32, 24) and [im.size for im in got[1]] == [(16, 4), (32, 24)]  # round(16.5) = 16
    third = tp.load_pipeline({"name": "x", "input": {"scale": 0.3}})
    assert third.prepare_images([Image.new("RGB", (10, 1))])[0].size == (3, 1)  # at least a pixel
    assert tp.load_pipeline("fastv").prepare_images([a])[0] is a


@pytest.mark.parametrize("spec, key, message", [
    ({"scale": 1.5}, "input.scale", r"in \(0, 1\); got 1.5"),
    ({"scale": True}, "input.scale", "got True"),
    ({"factor": 0.5}, "input.factor", "unknown input key; allowed: scale"),
    (3, "input", "must be a mapping"),
])
def test_bad_input_settings_name_the_key(spec, key, message):
    with pytest.raises(ConfigError, match=message) as e:
        tp.load_pipeline({"name": "x", "input": spec})
    assert e.value.key == key


def test_attaching_without_prepared_images_is_refused():
    from tokenprune.reference.tiny import tiny_qwen2_vl

    model = tiny_qwen2_vl("sdpa")
    with pytest.raises(ConfigError, match=r"prepare_images\(images\)") as e:
        tp.load_pipeline("downsample").attach(model)
    assert e.value.key == "input"
    with tp.load_pipeline("downsample").attach(model, images_prepared=True):
        pass


def _visual_count(family, processor, model_config, image) -> int:
    """What the processor gives the model for one image: its visual placeholders, or (Mllama, whose image
    features enter through cross-attention) its tiles."""
    enc = processor(images=[[image]], text=[build_prompt(processor, "what")], return_tensors="pt")
    if family == "mllama":
        return int(enc["aspect_ratio_mask"].sum())
    image_id = model_config.image_token_id
    return int((enc["input_ids"] == image_id).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gives_fewer_visual_tokens_or_refuses_with_the_reason(family, tmp_path):
    from transformers import AutoConfig

    folder = save_tiny(family, tmp_path / family)
    config = AutoConfig.from_pretrained(folder)
    with warnings.catch_warnings(action="ignore"):
        processor = load_processor(str(folder), True)
    pipe = tp.load_pipeline("downsample")
    image = shapes.load_split("test", size=1)[0]["image"].resize((SIDE[family], SIDE[family]))
    full = _visual_count(family, processor, config, image)
    half = _visual_count(family, processor, config, pipe.prepare_images([image])[0])
    adapter = adapter_class(config)
    facts = adapter.facts_from_config(config)
    if facts.fixed_resolution is None:
        assert half < full, (family, full, half)
        adapter.check_pipeline(facts, pipe)
    else:  # the processor gives the same tokens: the check says so
        assert half == full
        with pytest.raises(ConfigError, match="no fewer visual tokens") as e:
            adapter.check_pipeline(facts, pipe)
        assert e.value.key == "input.scale"


def test_llava_1_5_resizes_every_image_to_one_grid_and_is_refused():
    from tokenprune.reference.model import build_processor

    processor = build_processor()
    image = shapes.load_split("test", size=1)[0]["image"]
    counts = [int((processor(images=im, text=build_prompt(processor, "what"), return_tensors="pt")["input_ids"]
                   == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
              for im in (image, tp.load_pipeline("downsample").prepare_images([image])[0])]
    assert counts == [576, 576]
    from tokenprune.eval.matrix import method_family_matrix

    cells = {c.family.split(" (")[0]: c.refused for c in method_family_matrix() if c.preset == "downsample"}
    assert cells["LLaVA-1.5"].startswith("Showing the image at a lower resolution gives LLaVA-1.5 no fewer")
    assert cells["Gemma 3"] is not None and cells["Qwen2-VL / Qwen2.5-VL"] is None and cells["LLaVA-NeXT"] is None


def test_a_run_answers_as_stock_generate_on_the_images_resized_by_hand(tmp_path):
    from transformers import AutoModelForImageTextToText

    from tokenprune.eval.run import run
    from tokenprune.eval.run_config import load_run_config
    from tokenprune.measure.flops import LLMShape, measured_flops

    folder = save_tiny("qwen2_5_vl", tmp_path / "model", seed=1)
    items = shapes.load_split("test", size=4)
    rows = []
    for i, it in enumerate(items):
        it["image"].resize((112, 112)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": it["question"], "answer": it["answer"], "type": it["type"]})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run(load_run_config("experiments/asap_shapes.yaml", [
        f"model.path={folder}", "data.source=jsonl", f"data.path={tmp_path / 'data.jsonl'}", "data.limit=null",
        "batch_size=2", "pipeline=downsample", "flops_convention=exact", f"output_dir={tmp_path / 'run'}",
        "baseline_cache=null", "logging.wandb.mode=disabled", "logging.progress_bar=false"]))

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with warnings.catch_warnings(action="ignore"):
        processor = load_processor(str(folder), True)
    shape = LLMShape.from_config(model.config.text_config)
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    flops, base_flops, visual, base_visual = [], [], [], []
    for row, pred in zip(rows, predictions):
        full = Image.open(tmp_path / row["image"]).convert("RGB")
        answers = []
        for image, f, v in ((full, base_flops, base_visual), (full.resize((56, 56), Image.Resampling.BICUBIC),
                                                               flops, visual)):
            enc = processor(images=[[image]], text=[build_prompt(processor, row["question"])], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=3, do_sample=False)
            answers.append(processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:],
                                                      skip_special_tokens=True).strip())
            n, n_visual = enc["input_ids"].shape[1], int((enc["input_ids"] == model.config.image_token_id).sum())
            f.append(measured_flops(shape, n, n_visual, [], "exact").flops)
            v.append(n_visual)
        assert [pred["baseline_prediction"], pred["prediction"]] == answers
    assert metrics["visual_tokens"] == sum(visual) / 4 < metrics["baseline_visual_tokens"] == sum(base_visual) / 4
    assert metrics["flops_reduction"] == pytest.approx(1 - sum(flops) / sum(base_flops), rel=1e-9)
    assert metrics["vision_flops"] < metrics["baseline_vision_flops"]  # the tower sees a quarter of the patches


def test_analytic_flops_take_a_quarter_of_the_visual_tokens_from_the_start():
    from tokenprune.measure.flops import LLMShape, layer_flops, pipeline_flops

    shape = LLMShape("m", layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)
    report = pipeline_flops(tp.load_pipeline("downsample"), shape, 640, 576, "exact")
    assert report.per_layer_tokens == [640 - 576 + 144] * 4 and report.equivalent_visual_tokens == 144
    assert report.flops == 4 * layer_flops(208, shape, "exact") and report.baseline_flops == 4 * layer_flops(640, shape,
                                                                                                             "exact")


def test_a_processor_that_pins_the_pixel_count_is_refused_before_the_weights_load(tmp_path):
    """A Qwen2.5-VL whose processor resizes every image to one pixel count (min = max pixels, as the Qwen reference
    model's): the scaled image gives the same input, so the run refuses input.scale, naming it, before loading."""
    from tokenprune.eval.run import run
    from tokenprune.eval.run_config import load_run_config

    folder = save_tiny("qwen2_5_vl", tmp_path / "model")
    config = folder / "processor_config.json"
    data = json.loads(config.read_text())
    data["image_processor"]["size"] = {"shortest_edge": 112 * 112, "longest_edge": 112 * 112}
    config.write_text(json.dumps(data))
    (folder / "model.safetensors").write_bytes(b"not weights")  # loading them would fail: the check comes first
    with pytest.raises(ConfigError, match=r"^pipeline\.input\.scale: 0\.5 gives .* the same input as the whole "
                                          r"image") as e:
        run(load_run_config("experiments/asap_shapes.yaml", [
            f"model.path={folder}", "pipeline=downsample", "data.limit=2", f"output_dir={tmp_path / 'run'}",
            "baseline_cache=null", "logging.wandb.mode=disabled", "logging.progress_bar=false"]))
    assert e.value.key == "pipeline.input.scale"
