"""accelerate's device maps with offloading: decoder layers whose weights live on disk (accelerate's hooks load
them for each forward and drop them after) run a pipeline as the model without offload does — the same kept
tokens, the same generations and logits — for pipelines that read a layer's signals after its forward (FastV, ASAP),
act before the LLM (VisionZip), or trim caches during decoding (MINT)."""

import functools

import pytest
import torch
from families import inputs, pair

import tokenprune as tp

PRESETS = ["fastv", "asap", "visionzip", "mint", "random"]


def _device_map(model, how: str) -> dict[str, str]:
    """``map``: everything on the CPU but every odd decoder layer, offloaded to disk; ``tower``: the vision tower and
    every decoder layer on disk (vision-tower signals are recomputed from its layers' weights after its forward)."""
    inner = model.model
    keep = [name for name, _ in inner.named_children() if name != "language_model"]
    tower = {"vision_tower", "visual"} if how == "tower" else set()
    out = {f"model.{name}": "disk" if name in tower else "cpu" for name in keep}
    out.update({f"model.{name}": "cpu" for name, _ in inner.named_parameters(recurse=False)})  # NeXT's image_newline
    lm = inner.language_model
    out.update({f"model.language_model.{name}": "cpu" for name, _ in lm.named_children() if name != "layers"})
    out.update({f"model.language_model.layers.{i}": "disk" if i % 2 or how == "tower" else "cpu"
                for i in range(len(lm.layers))})
    out["lm_head"] = "cpu"
    return out


@functools.cache
def offloaded(family: str, how: str, folder: str):
    from transformers import AutoModelForImageTextToText

    model = pair(family)["sdpa"]
    saved = f"{folder}/{family}"
    model.save_pretrained(saved)
    if how in ("map", "tower"):
        kw = {"device_map": _device_map(model, how)}
    else:  # "auto" with a CPU budget of 70% of the weights: the later decoder layers go to disk
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        kw = {"device_map": "auto", "max_memory": {"cpu": size * 7 // 10}}
    return AutoModelForImageTextToText.from_pretrained(saved, offload_folder=f"{folder}/{family}-{how}-offload",
                                                       attn_implementation="sdpa", **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("offload"))


@pytest.mark.parametrize("how", ["map", "auto"])
def test_the_device_map_puts_decoder_layers_on_disk_with_accelerates_hooks(folder, how):
    model = offloaded("llava", how, folder)
    placed = {k: v for k, v in model.hf_device_map.items() if ".layers." in k}
    assert "disk" in placed.values() and "cpu" in set(model.hf_device_map.values())
    layers = model.model.language_model.layers
    assert any(hasattr(layer, "_hf_hook") for layer in layers)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_a_pipeline_on_an_offloaded_model_is_the_pipeline_without_offload(folder, family, preset):
    if preset == "visionzip" and family == "qwen2_vl":
        pytest.skip("the tiny Qwen2-VL tower has one layer; VisionZip reads layer -2")
    model, batch = offloaded(family, "map", folder), inputs(family)
    runs = []
    for m in (pair(family)["sdpa"], model):
        pipe = tp.load_pipeline(preset)
        with pipe.attach(m):
            out = m.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        runs.append((out, [t.kept for t in pipe.trace]))
    (a, kept_a), (b, kept_b) = runs
    assert kept_a == kept_b
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("preset", ["visionzip", "prumerge_plus", "asap"])
@torch.no_grad()
def test_a_pipeline_reading_an_offloaded_vision_tower_is_the_pipeline_without_offload(folder, preset):
    model, batch = offloaded("llava", "tower", folder), inputs("llava")
    assert model.hf_device_map["model.vision_tower"] == "disk"
    runs = []
    for m in (pair("llava")["sdpa"], model):
        pipe = tp.load_pipeline(preset)
        with pipe.attach(m):
            runs.append((m.generate(**batch, max_new_tokens=3, do_sample=False), [t.kept for t in pipe.trace]))
    assert runs[0][1] == runs[1][1] and torch.equal(runs[0][0], runs[1][0])


@torch.no_grad()
def test_auto_offload_runs_asap_as_without_offload(folder):
    model, batch = offloaded("llava", "auto", folder), inputs("llava")
    runs = []
    for m in (pair("llava")["sdpa"], model):
        pipe = tp.load_pipeline("asap")
        with pipe.attach(m):
            runs.append((m.generate(**batch, max_new_tokens=3, do_sample=False), [t.kept for t in pipe.trace]))
    assert runs[0][1] == runs[1][1] and torch.equal(runs[0][0], runs[1][0])
