"""Per-tile budgets (a stage's ``budget: per_tile``): the selector, and scorers that read the grid, run within each
tile — LLaVA-NeXT's base tile and unpadded anyres grid — against layouts read off the model's own feature packing."""

import pytest
import torch
from families import next_packed_rows
from families import pair as family_pair
from reference import reference_greedy

import tokenprune as tp
from tokenprune.core.errors import ConfigError
from tokenprune.reference.tiny import tiny_llava_next_inputs

STEPS = 2


@pytest.fixture(scope="module")
def next_pair():
    pair = family_pair("llava_next")
    return pair, tiny_llava_next_inputs(pair["sdpa"], image_sizes=[(100, 60), (50, 110)])


def test_uniform_grid_per_tile_keeps_every_second_cell_of_each_tile(next_pair):
    """Under generate(): every second row and column of each tile's part that the unpadding keeps (the wide crops
    of the tall image lose 3 of their 8 columns, so their grids start at patch column 3 and 0), and every newline
    token (in no tile); decoding equals the masked reference with those tokens kept."""
    pair, batch = next_pair
    model = pair["sdpa"]
    pipe = tp.load_pipeline({"stages": [{"layer": 1, "budget": "per_tile", "operators": [
        {"op": "uniform_grid", "stride": 2}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    rows, _ = next_packed_rows(model, batch)
    kept_rows: set[int] = set()
    for tile in (rows[rows >= 0] // 64).unique().tolist():
        patch = rows[(rows >= 0) & (rows // 64 == tile)] % 64
        r, c = (patch // 8).unique().tolist(), (patch % 8).unique().tolist()  # the rows and columns it keeps
        kept_rows |= {tile * 64 + pr * 8 + pc for pr in r[::2] for pc in c[::2]}
    visual = batch["input_ids"] == model.config.image_token_id
    counts = visual.sum(1).tolist()
    for b, mine in enumerate(rows.split(counts)):
        vis = visual[b].nonzero().flatten().tolist()
        want = {i for i, row in zip(vis, mine.tolist()) if row < 0 or row in kept_rows}
        assert set(pipe.trace[0].kept[b]) & set(vis) == want
    # base 4x4 of 8x8; the tall image's four 8x5 crops keep 4x3, the wide one's two 8x8 crops 4x4; newlines
    assert pipe.trace[0].visual_after == [16 + 4 * 12 + 16, 16 + 2 * 16 + 8]
    assert pipe.trace[0].tiles == [[(8, 8)] + [(8, 5)] * 4, [(8, 8)] * 3]
    tokens, ref_logits = reference_greedy(pair["eager"], batch, 1, pipe.trace[0].kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


def test_topk_per_tile_keeps_each_tiles_own_best(next_pair):
    """``keep: 0.25`` per tile: the top quarter of each tile by the eager tower's CLS attention (each tile's own
    map), newlines protected; one budget over the image keeps other tokens."""
    pair, batch = next_pair
    model = pair["sdpa"]
    kept = {}
    for budget in ("per_tile", "per_image"):
        pipe = tp.load_pipeline({"stages": [{"layer": 0, "budget": budget, "protect": ["image_newline"],
                                             "operators": [{"op": "cls_attention", "layer": -2},
                                                           {"op": "topk", "keep": 0.25}]}]})
        with torch.no_grad(), pipe.attach(model):
            model(**batch)
        kept[budget] = pipe.trace[0].kept
    rows, tiles = next_packed_rows(model, batch)
    pixels = torch.cat([pv[:t] for pv, t in zip(batch["pixel_values"], tiles)])
    with torch.no_grad():
        att = pair["eager"].model.vision_tower(pixels, output_attentions=True).attentions[-2]
    att = att[:, :, 0, 1:].float().mean(1).flatten()  # (tiles * 64,)
    visual = batch["input_ids"] == model.config.image_token_id
    for b, mine in enumerate(rows.split(visual.sum(1).tolist())):
        vis = torch.tensor(visual[b].nonzero().flatten().tolist())
        want = set(vis[mine < 0].tolist())  # newlines, protected
        for tile in (mine[mine >= 0] // 64).unique().tolist():
            at = (mine >= 0) & (mine // 64 == tile)
            order = att[mine[at]].argsort(descending=True, stable=True)[:round(0.25 * int(at.sum()))]
            want |= set(vis[at][order].tolist())
        assert set(kept["per_tile"][b]) & set(vis.tolist()) == want
    assert kept["per_tile"] != kept["per_image"]


def test_the_analytic_budget_counts_each_tile():
    pipe = tp.load_pipeline({"stages": [{"layer": 1, "budget": "per_tile", "operators": [
        {"op": "uniform_grid", "stride": 2}]}]})
    stage = pipe.stages[0]
    assert stage.expected_kept(240, [(8, 8)] + [(8, 5)] * 4) == 16 + 4 * 12 + 16  # 16 newlines in no tile, kept
    assert stage.expected_kept(64) == 16  # no tiles given: the image is one tile
    topk = tp.load_pipeline({"stages": [{"layer": 1, "budget": "per_tile", "operators": [
        {"op": "random"}, {"op": "topk", "keep": 0.25}]}]}).stages[0]
    assert topk.expected_kept(240, [(8, 8)] + [(8, 5)] * 4) == 16 + 4 * 10 + 16


@pytest.mark.parametrize("stage,key,match", [
    ({"layer": "kv_cache", "budget": "per_tile", "operators": [{"op": "attention"}, {"op": "topk"}]},
     "stages.0.budget", "site is 'kv_cache'; allowed here: per_image"),
    ({"layer": 2, "budget": "per_tile", "operators": [{"op": "bipartite"}]},
     "stages.0.budget", "merger 'bipartite' .* chooses its own tokens"),
    ({"layer": 2, "budget": "tile", "operators": [{"op": "random"}, {"op": "topk"}]},
     "stages.0.budget", "got 'tile'; allowed: per_image, per_tile"),
])
def test_per_tile_refusals_name_the_key(stage, key, match):
    with pytest.raises(ConfigError, match=match) as e:
        tp.load_pipeline({"stages": [stage]})
    assert e.value.key == key


def test_a_grid_operator_per_image_on_llava_next_names_the_fix(next_pair):
    pipe = tp.load_pipeline({"stages": [{"layer": 1, "operators": [{"op": "uniform_grid", "stride": 2}]}]})
    with pytest.raises(ConfigError, match=r"stages\.0\.operators\.0\.op: 'uniform_grid' lays the visual tokens out "
                                          r"as one grid, which LLaVA-NeXT has not: .*set the stage's budget: per_tile"):
        pipe.attach(next_pair[0]["sdpa"])
