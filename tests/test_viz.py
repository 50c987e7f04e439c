"""tokenprune.measure.viz against independent references: the eager model's own attention maps, the model's own
placement of LLaVA-NeXT's newline vector, and hand-computed values."""

import numpy as np
import pytest
import torch

import tokenprune as tp
from tokenprune.measure import viz
from tokenprune.reference.tiny import (
    tiny_llava,
    tiny_llava_inputs,
    tiny_llava_next,
    tiny_llava_next_inputs,
    tiny_qwen2_vl,
    tiny_qwen2_vl_inputs,
)

BUILD = {"llava": (tiny_llava, tiny_llava_inputs), "llava_next": (tiny_llava_next, tiny_llava_next_inputs),
         "qwen2_vl": (tiny_qwen2_vl, tiny_qwen2_vl_inputs)}


@pytest.fixture(scope="module", params=sorted(BUILD))
def family(request):
    make, inputs = BUILD[request.param]
    model = make("eager")
    return request.param, model, inputs(model)


@torch.no_grad()
def test_attention_rows_equal_the_eager_attention_map(family):
    """Last-token attention over the visual tokens, heads averaged / maxed / a head subset, per sample: the
    recomputed rows equal the eager model's own output_attentions (left-padded batch: the last row is real)."""
    name, model, inputs = family
    eager = model(**inputs, output_attentions=True).attentions
    visual = inputs["input_ids"] == model.config.image_token_id
    for b in range(2):
        for heads, reduce in (("mean", lambda a: a.mean(0)), ("max", lambda a: a.max(0).values),
                              ([0, 2], lambda a: a[[0, 2]].mean(0))):
            got = viz.text_to_image_attention(model, inputs, [1, 3], heads=heads, sample=b)
            for layer in (1, 3):
                want = reduce(eager[layer][b, :, -1].float())[visual[b]]
                assert torch.allclose(got[layer], want, atol=1e-5), (name, b, heads, layer)


@torch.no_grad()
def test_panels_cover_every_visual_token_but_llava_next_newlines(family):
    """Every visual token has exactly one cell, except LLaVA-NeXT's newline tokens, which are exactly the
    positions where the model itself placed its image_newline vector, one closing each anyres row."""
    name, model, inputs = family
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    model(**inputs)
    handle.remove()
    for b in range(2):
        panels = viz.image_panels(model, inputs, b)
        visual_pos = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        cells = torch.cat([p.cells.flatten() for p in panels])
        assert len(set(cells.tolist())) == cells.numel()  # no token twice
        missing = sorted(set(range(visual_pos.numel())) - set(cells.tolist()))
        if name == "llava_next":
            newline = (seen["embeds"][b, visual_pos] == model.model.image_newline).all(-1).nonzero().flatten()
            assert missing == newline.tolist() and len(missing) == panels[1].shape[0]
            assert [p.name for p in panels] == ["base", "anyres"] and panels[0].shape == (8, 8)
        else:
            assert missing == [] and len(panels) == 1
    if name == "qwen2_vl":  # grids from image_grid_thw, 2x2 merge: 8x8 patches -> 4x4, 6x10 -> 3x5
        assert [viz.image_panels(model, inputs, b)[0].shape for b in range(2)] == [(4, 4), (3, 5)]


def test_panel_fill_and_display_values_by_hand():
    panel = viz.Panel("image", torch.tensor([[0, 1], [2, -1]]))
    grid = panel.fill(torch.tensor([0.1, 0.2, 0.3]))
    assert np.allclose(grid[:1], [[0.1, 0.2]]) and grid[1, 0] == pytest.approx(0.3) and np.isnan(grid[1, 1])
    v = torch.tensor([1e-3, 1e-2, 1e-1, 1.0, 100.0])  # one massive "sink"
    clipped = viz.display_values(v, sink_quantile=0.75)  # the 0.75 quantile of 5 values is the 4th: 1.0
    assert clipped.tolist() == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 1.0])
    assert viz.display_values(v, log=True).tolist() == pytest.approx([-3, -2, -1, 0, 2])
    with pytest.raises(ValueError, match="sink_quantile must be in"):
        viz.display_values(v, sink_quantile=1.5)
    up = viz._upsample(np.array([[1.0, 2.0], [3.0, 4.0]]), 4, 6)
    assert up[0].tolist() == [1, 1, 1, 2, 2, 2] and up[3].tolist() == [3, 3, 3, 4, 4, 4]


@torch.no_grad()
def test_kept_mask_marks_the_trace_of_a_pipeline(tmp_path):
    model = tiny_llava("sdpa")
    inputs = tiny_llava_inputs(model)
    pipe = tp.load_pipeline("fastv")
    with pipe.attach(model):
        model(**inputs)
    for b in range(2):
        values = viz.kept_values(model, inputs, pipe.trace[0].kept[b], sample=b)
        assert values.sum() == pipe.trace[0].visual_after[b] == 32
        fig = viz.plot_kept(np.zeros((56, 56, 3), dtype=np.uint8), model, inputs, pipe.trace[0].kept[b], sample=b)
        fig.savefig(tmp_path / f"kept{b}.png")
        assert (tmp_path / f"kept{b}.png").stat().st_size > 1000


@torch.no_grad()
def test_attention_shift_is_the_mean_row_of_the_top_tokens():
    """The rotary statistic recomputed from the eager attention map by hand: top 25% of the 8x8 grid by the
    last token's head-averaged attention, mean of row / 7."""
    model = tiny_llava("eager")
    inputs = tiny_llava_inputs(model)
    stats = viz.attention_shift(model, inputs, [1, 2], keep=0.25)
    eager = model(**inputs, output_attentions=True).attentions
    visual = inputs["input_ids"][0] == model.config.image_token_id
    for s, layer in zip(stats, (1, 2)):
        att = eager[layer][0, :, -1].float().mean(0)[visual]
        top = torch.sort(att, descending=True, stable=True).indices[:16]
        assert s["rotary"] == pytest.approx(float((top // 8).float().mean() / 7), abs=1e-6)
        assert s["uniform"] == pytest.approx(0.5) and 0.0 <= s["rope_free"] <= 1.0
    fig = viz.plot_attention_shift(stats)
    assert len(fig.axes[0].lines) == 3


def test_bad_arguments_are_named():
    model = tiny_llava("sdpa", layers=2)
    inputs = tiny_llava_inputs(model)
    with pytest.raises(ValueError, match=r"layers: 5 is not a decoder layer of this model \(0..1\)"):
        viz.text_to_image_attention(model, inputs, [5])
    with pytest.raises(ValueError, match=r"heads='sum'; allowed: mean, max or a list"):
        viz.text_to_image_attention(model, inputs, [1], heads="sum")


def test_merges_are_traced_and_coloured_by_their_target(tmp_path):
    """nearest_mean on hand-made features: tokens 2 and 3 are closest to kept token 1, token 5 to kept token 4;
    the trace says so in input-frame indices, and the plot's groups follow."""
    from tokenprune.core.state import TokenState

    feats = torch.tensor([[0.0, 0, 1], [1, 0, 0], [0.9, 0.1, 0], [1, 0.2, 0], [0, 1, 0], [0.1, 1, 0]])
    vis = torch.tensor([[False, True, True, True, True, True]])
    state = TokenState.from_tensors(feats[None], vis)
    state.keep_mask = torch.tensor([[True, True, False, False, True, False]])
    state = tp.build_operator("nearest_mean")(state)
    assert state.merged_into[0].tolist() == [-1, -1, 1, 1, -1, 4]

    model = tiny_llava("sdpa")
    inputs = tiny_llava_inputs(model)
    pipe = tp.load_pipeline({"stages": [{"layer": 2, "operators": [
        {"op": "attention"}, {"op": "topk", "keep": 8}, {"op": "nearest_mean"}]}]})
    with torch.no_grad(), pipe.attach(model):
        model(**inputs)
    t = pipe.trace[0]
    for b in range(2):
        kept, merged = set(t.kept[b]), t.merged_into[b]
        visual = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten().tolist()
        assert set(merged) == set(visual) - kept and set(merged.values()) <= kept  # every pruned one, into kept ones
        groups = viz.merge_groups(model, inputs, t, sample=b)
        where = {i: k for k, i in enumerate(visual)}
        for src, dst in merged.items():
            assert groups[where[src]] == groups[where[dst]]
        assert len({float(groups[where[i]]) for i in kept & set(visual)}) == 8
    viz.plot_merged(None, model, inputs, t).savefig(tmp_path / "merged.png")
