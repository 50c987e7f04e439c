"""InternVL: tiles of pixel-shuffled tokens, the CLS signals of its InternViT, against the model's own pixel shuffle
and its eager tower's attention maps."""

import pytest
import torch
from families import pair as family_pair

import tokenprune as tp
from tokenprune.reference.tiny import tiny_internvl_inputs

TOKENS = 16  # a 56-px tile: 8x8 patches, shuffled 2x2


@pytest.fixture(scope="module")
def ivl_pair():
    return family_pair("internvl")


def shuffled(model, per_patch: torch.Tensor) -> torch.Tensor:
    """(tiles, 64) per patch -> (tiles, 16, 4): the model's own pixel shuffle of the values, per visual token."""
    tiles = per_patch.shape[0]
    return model.model.pixel_shuffle(per_patch.reshape(tiles, 8, 8, 1), 0.5).reshape(tiles, TOKENS, 4)


@pytest.mark.parametrize("layer", [-1, 0])
def test_cls_attention_per_tile_keeps_each_tiles_most_attended_tokens(ivl_pair, layer):
    """``cls_attention`` on InternVL: the CLS query's attention at the layer (mean over heads), summed over the
    four patches the pixel shuffle puts in each visual token; ``keep: 0.25`` per tile keeps each tile's top 4 of
    16 — from the eager tower's attention maps and the model's own shuffle."""
    model = ivl_pair["sdpa"]
    batch = tiny_internvl_inputs(model)
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "budget": "per_tile", "operators": [
        {"op": "cls_attention", "layer": layer}, {"op": "topk", "keep": 0.25}]}]})
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    with torch.no_grad():
        att = ivl_pair["eager"].model.vision_tower(batch["pixel_values"], output_attentions=True).attentions[layer]
    score = shuffled(model, att[:, :, 0, 1:].float().mean(1)).sum(-1).flatten()  # (tiles * 16,)
    visual = batch["input_ids"] == model.config.image_token_id
    first = 0
    assert pipe.trace[0].tiles == [[(4, 4)] * 3, [(4, 4)]]
    for b in range(2):
        vis = visual[b].nonzero().flatten()
        want = set()
        for t in range(len(vis) // TOKENS):
            mine = score[(first + t) * TOKENS:(first + t + 1) * TOKENS]
            want |= set(vis[t * TOKENS:(t + 1) * TOKENS][mine.argsort(descending=True, stable=True)[:4]].tolist())
        first += len(vis) // TOKENS
        assert set(pipe.trace[0].kept[b]) & set(vis.tolist()) == want


def test_vision_keys_are_the_shuffled_patches_mean_key(ivl_pair):
    """The signal keys of a visual token: the mean of its four patches' keys (InternViT's q/k norm applied), as
    the model's pixel shuffle groups them."""
    from tokenprune.adapters import get_adapter

    model = ivl_pair["sdpa"]
    adapter = get_adapter(model)
    pixels = tiny_internvl_inputs(model)["pixel_values"]
    captured = {}
    block = adapter.vision_layers()[1]
    handle = block.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
    try:
        with torch.no_grad():
            model.model.vision_tower(pixels)
    finally:
        handle.remove()
    with torch.no_grad():
        got = adapter.vision_keys(1, captured["h"])  # (tiles * 16, H, hd)
        attn = block.attention
        keys = attn.k_norm(attn.k_proj(block.layernorm_before(captured["h"])))[:, 1:]  # (tiles, 64, D)
    heads, hd = attn.num_heads, attn.head_dim
    for h in range(heads):
        for d in (0, hd - 1):
            want = shuffled(model, keys[:, :, h * hd + d]).mean(-1).flatten()
            assert torch.allclose(got[:, h, d], want, atol=1e-6)


def test_grid_presets_need_per_tile_and_run_with_it(ivl_pair):
    """A sample's tokens are several tiles: a grid operator without ``budget: per_tile`` is refused at attach
    with the reason; with it, every second row and column of each 4x4 tile is kept."""
    from tokenprune.core.errors import ConfigError

    model = ivl_pair["sdpa"]
    batch = tiny_internvl_inputs(model)
    with pytest.raises(ConfigError, match="tiles .crops and a thumbnail.*budget: per_tile"):
        tp.load_pipeline({"stages": [{"layer": 1, "operators": [{"op": "uniform_grid", "stride": 2}]}]}).attach(model)
    pipe = tp.load_pipeline({"stages": [{"layer": 1, "budget": "per_tile", "operators": [
        {"op": "uniform_grid", "stride": 2}]}]})
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    assert pipe.trace[0].visual_after == [12, 4]
    visual = batch["input_ids"] == model.config.image_token_id
    vis = visual[1].nonzero().flatten()
    assert set(pipe.trace[0].kept[1]) & set(vis.tolist()) == {int(vis[i]) for i in (0, 2, 8, 10)}
