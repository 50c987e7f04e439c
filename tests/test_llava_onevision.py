"""LLaVA-OneVision: its feature layout (anyres_max resizing, several images a sample), its SigLIP tower's signals,
and its video refusal, against the model's own feature packing and its eager tower's attention maps."""

import pytest
import torch
from families import pair as family_pair

import tokenprune as tp
from tokenprune.reference.tiny import TINY_BOS, left_pad, tiny_llava_onevision_inputs

SIDE, P = 8, 64


@pytest.fixture(scope="module")
def ov_pair():
    return family_pair("llava_onevision")


def multi_image_batch(model):
    """One sample holding two images (``batch_num_images: [2]``: each image is its base tile alone), one holding
    one tiled image."""
    sizes = [(100, 60), (60, 100), (100, 100)]
    gen = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(3, 5, 3, 56, 56, generator=gen)
    ids = model.config.image_token_id
    rows = [[TINY_BOS, 5] + [ids] * 65 + [6] + [ids] * 65 + [10, 11], [TINY_BOS, 5] + [ids] * 196 + [20, 21]]
    input_ids, attention_mask = left_pad(rows)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": torch.tensor(sizes), "batch_num_images": torch.tensor([2, 1])}


def packed_rows(model, batch) -> tuple[torch.Tensor, list[int]]:
    """The tower row of each LLM visual token (images in order, -1 on newlines) from the model's own
    ``pack_image_features``, run on features that hold where they are: a base tile's patch index, or a grid
    patch's (row, column) on the image's tile canvas, which the model's unpadding crops and its bilinear resize
    interpolates (exactly, a linear function); a resized token's row is its rounded source position's patch."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
    )

    cfg = model.config
    sizes = batch["image_sizes"].tolist()
    counts = batch.get("batch_num_images")
    tiled = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
    tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, 56) if t else 1 for s, t in zip(sizes, tiled)]
    feats = []
    for size, t in zip(sizes, tiles):
        f = torch.full((t, P, 3), -1.0, dtype=torch.float64)
        f[0, :, 2] = torch.arange(P)
        if t > 1:
            gh, gw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, 56)
            for g in range(t - 1):
                ty, tx = divmod(g, gw)
                f[g + 1, :, 0] = ty * SIDE + torch.arange(P) // SIDE
                f[g + 1, :, 1] = tx * SIDE + torch.arange(P) % SIDE
        feats.append(f)
    packed, _ = model.model.pack_image_features(feats, batch["image_sizes"],
                                                image_newline=torch.tensor([-2.0, -2.0, -2.0], dtype=torch.float64),
                                                vision_aspect_ratio=cfg.vision_aspect_ratio)
    out, first = [], 0
    for f, size, t in zip(packed, sizes, tiles):
        row = torch.full((f.shape[0],), -1, dtype=torch.long)
        base = f[:, 2] >= 0
        row[base] = first * P + f[base, 2].long()
        grid = (f[:, 0] >= 0) & ~base
        if t > 1:
            _, gw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, 56)
            y, x = f[grid, 0].round().long(), f[grid, 1].round().long()
            row[grid] = (first + 1 + (y // SIDE) * gw + x // SIDE) * P + (y % SIDE) * SIDE + x % SIDE
        out.append(row)
        first += t
    return torch.cat(out), tiles


def test_the_resize_and_the_several_image_layouts_are_the_models(ov_pair):
    """The signal rows the adapter lays onto the visual tokens are the model's own packing's: the 2x1 grid kept,
    the 2x2 grid resized from 16x16 to 11x11 patches' worth of tokens, and a two-image sample's base tiles."""
    from tokenprune.adapters import get_adapter

    model = ov_pair["sdpa"]
    adapter = get_adapter(model)
    for batch in (tiny_llava_onevision_inputs(model), multi_image_batch(model)):
        visual = batch["input_ids"] == model.config.image_token_id
        want, _ = packed_rows(model, batch)
        capture: dict = {}

        def record(args, kwargs, capture=capture):
            capture.setdefault("c", adapter.vision_tower_capture(args, kwargs))

        handles = adapter.hook_image_call(record)
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            for h in handles:
                h.remove()
        got = adapter.vision_patch_map(visual, capture["c"])[visual]
        assert torch.equal(got, want)
    resized = tiny_llava_onevision_inputs(model)["input_ids"][1] == model.config.image_token_id
    assert int(resized.sum()) == 64 + 11 * 12  # base tile + 11 rows of 11 tokens and a newline


@pytest.mark.parametrize("which", ["tiled", "several"])
def test_siglip_attention_per_tile_keeps_each_tiles_most_attended_patches(ov_pair, which):
    """SigLIP has no CLS token: ``cls_attention`` is the attention a patch receives at the layer, averaged over
    its tile's queries and the heads; ``keep: 0.25`` per tile keeps each tile's top quarter by it, from the eager
    tower's own attention maps laid out by the model's packing; newlines protected."""
    model = ov_pair["sdpa"]
    batch = tiny_llava_onevision_inputs(model) if which == "tiled" else multi_image_batch(model)
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "budget": "per_tile", "protect": ["image_newline"],
                                         "operators": [{"op": "cls_attention", "layer": -1},
                                                       {"op": "topk", "keep": 0.25}]}]})
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    rows, tiles = packed_rows(model, batch)
    pixels = torch.cat([pv[:t] for pv, t in zip(batch["pixel_values"], tiles)])
    with torch.no_grad():
        att = ov_pair["eager"].model.vision_tower(pixels, output_attentions=True).attentions[-1]
    att = att.float().mean(1).mean(1).flatten()  # (tiles * 64,): mean over heads and queries
    visual = batch["input_ids"] == model.config.image_token_id
    for b, mine in enumerate(rows.split(visual.sum(1).tolist())):
        vis = torch.tensor(visual[b].nonzero().flatten().tolist())
        want = set(vis[mine < 0].tolist())
        for tile in (mine[mine >= 0] // P).unique().tolist():
            at = (mine >= 0) & (mine // P == tile)
            order = att[mine[at]].argsort(descending=True, stable=True)[:round(0.25 * int(at.sum()))]
            want |= set(vis[at][order].tolist())
        assert set(pipe.trace[0].kept[b]) & set(vis.tolist()) == want


def test_visionzip_runs_on_the_resized_layout(ov_pair):
    """The VisionZip preset (SigLIP attention, keys) generates on both layouts and keeps its budget."""
    model = ov_pair["sdpa"]
    for batch in (tiny_llava_onevision_inputs(model), multi_image_batch(model)):
        pipe = tp.load_pipeline("visionzip")
        with torch.no_grad(), pipe.attach(model):
            out = model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + 2
        assert all(a < b for a, b in zip(pipe.trace[0].visual_after, pipe.trace[0].visual_before))
