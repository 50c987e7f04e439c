"""HiPrune: the anchor/buffer/register selection by hand, the attention every patch receives in the vision tower
against the eager tower's own attention maps, and the preset end to end against the masked reference."""

import pytest
import torch
from reference import capture_state, reference_greedy

import tokenprune as tp
from tokenprune.core.registry import registered_operators
from tokenprune.core.state import TokenState


def anchor_buffer(**params):
    cls = registered_operators()["anchor_buffer"]
    return cls(cls.parse_params(params))


def grid_state(deep, anchors, rows=4, cols=4):
    n = rows * cols
    state = TokenState.from_tensors(torch.zeros(1, n, 2), torch.ones(1, n, dtype=torch.bool), grid=(rows, cols),
                                    layer=0)
    state.scores = torch.tensor([deep], dtype=torch.float32)
    state.add_scores(torch.tensor([anchors], dtype=torch.float32), into="anchors")
    return state


def test_anchors_buffers_and_registers_by_hand():
    """4x4 grid. alpha 0.5 of 8: round(0.8) = 1 anchor, the anchor layer's best cell 4 (row 1, column 0); its
    buffers 0, 8, 5 (no left neighbour: not cell 3, the previous row's end, as raster index - 1 would give); the
    4 registers are the deep layer's best of the rest: 15, 2, 12, 13 (cell 4 scores highest there but is taken)."""
    anchors = [0.0] * 16
    anchors[4], anchors[10] = 9.0, 8.0
    deep = [0.0] * 16
    deep[4], deep[15], deep[2], deep[12], deep[13] = 10.0, 9.0, 8.0, 7.0, 6.0
    keep = anchor_buffer(keep=8, alpha=0.5).select(grid_state(deep, anchors))[0]
    assert keep.nonzero().flatten().tolist() == [0, 2, 4, 5, 8, 12, 13, 15]
    # alpha 1: round(1.6) = 2 anchors (4 and 10), buffers 0, 8, 5 and 6, 14, 9, 11; 9 chosen > 8: the first 8 in
    # anchor rank order, so 11 (10's last buffer) is left; no room for registers
    keep = anchor_buffer(keep=8, alpha=1.0).select(grid_state(deep, anchors))[0]
    assert keep.nonzero().flatten().tolist() == [0, 4, 5, 6, 8, 9, 10, 14]
    # alpha 0: registers only, the deep top-8
    keep = anchor_buffer(keep=5, alpha=0.0).select(grid_state(deep, anchors))[0]
    assert keep.nonzero().flatten().tolist() == sorted([4, 15, 2, 12, 13])


def test_bad_parameters_are_named():
    from tokenprune.core.errors import ConfigError

    for params, key in [({"alpha": 1.5}, "alpha"), ({"anchors": ""}, "anchors"), ({"keep": 0}, "keep")]:
        with pytest.raises(ConfigError) as e:
            tp.load_pipeline({"stages": [{"layer": 0, "operators": [{"op": "random"},
                                                                     {"op": "anchor_buffer", **params}]}]})
        assert e.value.key == f"stages.0.operators.1.{key}"


def eager_attentions(llava_pair, batch):
    tower = llava_pair["eager"].model.vision_tower
    with torch.no_grad():
        return tower(batch["pixel_values"], output_attentions=True).attentions


@pytest.mark.parametrize("layer", [0, -1])
def test_received_attention_equals_the_eager_towers_map_averaged_over_queries(llava_pair, batch, layer):
    """``queries: all``: each patch's column of the eager tower's attention map, heads and every query (the CLS
    token's included) averaged — HiPrune's global attention — laid out on the visual tokens."""
    state, _ = capture_state(llava_pair["sdpa"], batch, {"layer": 0, "operators": [
        {"op": "random"}, {"op": "topk", "keep": 1.0}]})
    got = state.signals.vision_cls_attention(layer=layer, queries="all")
    want = eager_attentions(llava_pair, batch)[layer].float().mean(1).mean(1)[:, 1:]  # (images, 64)
    visual = batch["input_ids"] == llava_pair["sdpa"].config.image_token_id
    for b in range(2):
        assert torch.allclose(got[b][visual[b]], want[b], atol=1e-6)
    cls = state.signals.vision_cls_attention(layer=layer, queries="cls")
    assert not torch.allclose(cls, got)  # a tower with a CLS token: the two signals differ


def test_the_preset_keeps_hipruness_choice_and_generates_as_the_masked_reference(llava_pair, batch):
    """On the tiny LLaVA (2 vision layers: anchors from 0.375 of the depth, round(0.75) = the 1st, layer 0;
    registers from layer -1, the last; 8x8 grid), 16 kept with
    alpha 0.5: round(1.6) = 2 anchors. The choice is recomputed here from the eager tower's attention maps with
    grid neighbours written out, and generation equals the reference that caches only those tokens."""
    model = llava_pair["sdpa"]
    pipe = tp.load_pipeline("hiprune", ["stages.0.operators.1.layer=-1", "stages.0.operators.2.keep=16",
                                        "stages.0.operators.2.alpha=0.5"])
    with torch.no_grad(), pipe.attach(model):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    att = eager_attentions(llava_pair, batch)
    shallow, deep = (att[i].float().mean(1).mean(1)[:, 1:] for i in (0, 1))
    visual = batch["input_ids"] == model.config.image_token_id
    kept = pipe.trace[0].kept
    for b in range(2):
        anchors = shallow[b].argsort(descending=True)[:2].tolist()
        chosen = set(anchors)
        for a in anchors:
            r, c = divmod(a, 8)
            chosen |= {y * 8 + x for y, x in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
                       if 0 <= y < 8 and 0 <= x < 8}
        rest = [i for i in deep[b].argsort(descending=True).tolist() if i not in chosen]
        chosen |= set(rest[:16 - len(chosen)])
        vis_idx = visual[b].nonzero().flatten()
        assert set(kept[b]) & set(vis_idx.tolist()) == set(vis_idx[sorted(chosen)].tolist())
    tokens, _ = reference_greedy(llava_pair["eager"], batch, 0, kept, 3)
    assert torch.equal(out.sequences[:, -3:], tokens)


def test_a_fractional_vision_layer_is_that_share_of_the_depth(llava_pair, batch):
    """1.0 is the last layer, 0.5 of two layers the first (round(1.0) = 1st); out of (0, 1] is refused, named."""
    from tokenprune.core.errors import ConfigError

    state, _ = capture_state(llava_pair["sdpa"], batch, {"layer": 0, "operators": [
        {"op": "random"}, {"op": "topk", "keep": 1.0}]})
    signals = state.signals
    assert torch.equal(signals.vision_cls_attention(layer=1.0), signals.vision_cls_attention(layer=-1))
    assert torch.equal(signals.vision_cls_attention(layer=0.5), signals.vision_cls_attention(layer=0))
    with pytest.raises(ConfigError) as e:
        tp.load_pipeline({"stages": [{"layer": 0, "operators": [{"op": "cls_attention", "layer": 1.5},
                                                                 {"op": "topk"}]}]})
    assert e.value.key == "stages.0.operators.0.layer"
