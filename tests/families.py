"""Tiny models of each decoder-only family, as SDPA/eager pairs with the same weights, and per-sample splits."""

from __future__ import annotations

import functools

import torch

import tokenprune as tp
from tokenprune.reference import tiny


@functools.cache
def pair(family: str) -> dict:
    """{"sdpa": model, "eager": model} with identical weights."""
    build = BUILDERS[family][0]
    sdpa, eager = build("sdpa"), build("eager")
    eager.load_state_dict(sdpa.state_dict())
    return {"sdpa": sdpa, "eager": eager}


def inputs(family: str) -> dict:
    """A left-padded batch of two samples with different numbers of visual tokens where the family allows it."""
    return BUILDERS[family][1](pair(family)["sdpa"])


def sample_alone(family: str, batch: dict, b: int) -> dict:
    """Sample ``b`` of ``batch`` on its own, without padding."""
    valid = batch["attention_mask"][b].bool()
    out = {k: batch[k][b:b + 1, valid] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
           if k in batch}
    out.update(BUILDERS[family][2](batch, b))
    return out


def assert_sdpa_matches_eager(family: str, batch: dict, make_pipe, steps: int = 3) -> None:
    """Oracle 4: the pipeline ``make_pipe()`` keeps the same tokens under SDPA and under eager attention, and
    ``generate()`` gives the same tokens and logits (to 1e-4, or to what the unpruned model's own SDPA and eager
    paths differ by when that is more: Qwen3.5's linear-attention layers under transformers 5.25, 3e-4)."""
    results = {}
    for impl in ("sdpa", "eager"):
        model, pipe = pair(family)[impl], make_pipe()
        with torch.no_grad(), pipe.attach(model):
            gen = model.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        results[impl] = (pipe.trace[0].kept, gen)
    assert results["sdpa"][0] == results["eager"][0]
    assert torch.equal(results["sdpa"][1].sequences, results["eager"][1].sequences)
    gap = max(float((a - b).abs().max()) for a, b in zip(results["sdpa"][1].logits, results["eager"][1].logits))
    if gap > 1e-4:  # no more than the model's own two attention paths differ by, unpruned, on the same batch
        stock = {}
        for impl in ("sdpa", "eager"):
            with torch.no_grad():
                stock[impl] = pair(family)[impl].generate(**batch, max_new_tokens=steps, do_sample=False,
                                                          output_logits=True, return_dict_in_generate=True).logits
        own = max(float((a - b).abs().max()) for a, b in zip(stock["sdpa"], stock["eager"]))
        assert gap <= 1e-4 + 2 * own, (gap, own)


def _llava_images(batch, b):
    return {"pixel_values": batch["pixel_values"][b:b + 1]}


def _qwen_images(batch, b):
    thw = batch["image_grid_thw"]
    sizes = thw.prod(-1).tolist()
    start = sum(sizes[:b])
    return {"pixel_values": batch["pixel_values"][start:start + sizes[b]], "image_grid_thw": thw[b:b + 1]}


def _internvl_images(batch, b):
    per_tile = 16
    tiles = [int(n) // per_tile for n in (batch["input_ids"] == tiny.TINY_IMAGE_TOKEN).sum(1).tolist()]
    start = sum(tiles[:b])
    return {"pixel_values": batch["pixel_values"][start:start + tiles[b]]}


def _gemma3_images(batch, b):
    images = [int(n) // 16 for n in (batch["input_ids"] == tiny.TINY_IMAGE_TOKEN).sum(1).tolist()]
    start = sum(images[:b])
    return {"pixel_values": batch["pixel_values"][start:start + images[b]]}


def _next_images(batch, b):
    return {"pixel_values": batch["pixel_values"][b:b + 1], "image_sizes": batch["image_sizes"][b:b + 1]}


BUILDERS = {
    "llava_next": (lambda impl: tiny.tiny_llava_next(impl, layers=4), tiny.tiny_llava_next_inputs, _next_images),
    # a Mistral LLM whose 48-token window is far shorter than the ~250-token prompts
    "llava_next_sliding": (lambda impl: tiny.tiny_llava_next(impl, layers=4, sliding_window=48),
                           tiny.tiny_llava_next_inputs, _next_images),
    # a 2x1-tile image kept as it is and a 2x2-tile one the model resizes (anyres_max_2)
    "llava_onevision": (lambda impl: tiny.tiny_llava_onevision(impl, layers=4), tiny.tiny_llava_onevision_inputs,
                        _next_images),
    # three tiles (two crops and a thumbnail) and one tile
    "internvl": (lambda impl: tiny.tiny_internvl(impl, layers=4), tiny.tiny_internvl_inputs, _internvl_images),
    # sliding-window (12 tokens, under the ~30-token prompts) and global layers alternate; images bidirectional
    "gemma3": (lambda impl: tiny.tiny_gemma3(impl, layers=4), tiny.tiny_gemma3_inputs, _gemma3_images),
    "llava": (lambda impl: tiny.tiny_llava(impl, layers=4), tiny.tiny_llava_inputs, _llava_images),
    "qwen2_vl": (lambda impl: tiny.tiny_qwen2_vl(impl, layers=4, version="2"), tiny.tiny_qwen2_vl_inputs, _qwen_images),
    # Qwen2's use_sliding_window: layers 0-1 attend to everything, layers 2-3 within 16 tokens
    "qwen2_vl_sliding": (lambda impl: tiny.tiny_qwen2_vl(impl, layers=4, version="2", sliding_window=16,
                                                         window_from=2), tiny.tiny_qwen2_vl_inputs, _qwen_images),
    "qwen2_5_vl": (lambda impl: tiny.tiny_qwen2_vl(impl, layers=4, version="2.5"), tiny.tiny_qwen2_vl_inputs,
                   _qwen_images),
    # DeepStack levels from its three tower blocks, added after LLM layers 0, 1 and 2
    "qwen3_vl": (lambda impl: tiny.tiny_qwen3_vl(impl, layers=4), tiny.tiny_qwen2_vl_inputs, _qwen_images),
    "qwen3_vl_moe": (lambda impl: tiny.tiny_qwen3_vl(impl, layers=4, moe=True), tiny.tiny_qwen2_vl_inputs,
                     _qwen_images),
    # Gated DeltaNet layers 0-2 and 4-6, attention layers 3 and 7
    "qwen3_5": (lambda impl: tiny.tiny_qwen3_5(impl), tiny.tiny_qwen2_vl_inputs, _qwen_images),
    "qwen3_5_moe": (lambda impl: tiny.tiny_qwen3_5(impl, moe=True), tiny.tiny_qwen2_vl_inputs, _qwen_images),
}


def next_packed_rows(model, batch) -> tuple[torch.Tensor, list[int]]:
    """LLaVA-NeXT: the tower row (tile x patches + patch) of each LLM visual token, images in order, -1 on
    newlines — the model's own ``pack_image_features`` run on features that hold their row number —, and the
    tiles the tower sees per image."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    p = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
             for s in batch["image_sizes"].tolist()]
    feats, first = [], 0
    for t in tiles:
        feats.append(torch.arange(first * p, (first + t) * p, dtype=torch.float64).view(t, p, 1))
        first += t
    packed, _ = model.model.pack_image_features(feats, batch["image_sizes"], "default",
                                                image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return torch.cat(packed)[:, 0].long(), tiles


def vision_scores(model, batch: dict, layer: int | float) -> torch.Tensor:
    """(B, N) the ``cls_attention`` signal at vision ``layer`` a stage at layer 0 reads on ``batch`` (a spy operator
    before a keep-all selection)."""
    seen = []

    class Spy(torch.nn.Module):
        needs_vision = True

        def forward(self, state):
            seen.append(state.signals.vision_cls_attention(layer=layer).clone())
            return state

    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [{"op": "random"}, {"op": "topk", "keep": 1.0}]}]})
    pipe.stages[0].operators.insert(0, Spy())
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    return seen[0]
