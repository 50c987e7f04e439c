"""Vision-tower signals (CLS attention, vision keys) at the layer-0 site, against the eager tower's own
attention maps and hidden states, and the layer-0 site end to end (a VisionZip-style selection)."""

import pytest
import torch
from families import pair as family_pair
from reference import reference_greedy

import tokenprune as tp
from tokenprune.core.errors import ConfigError

STEPS = 3


def capture_state(model, batch, stage):
    """Run ``stage`` at layer 0 and hand back the TokenState it saw (with its signals)."""
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, state):
            seen["state"] = state
            return state

    pipe = tp.load_pipeline({"stages": [stage]})
    pipe.stages[0].operators.insert(0, Spy())
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    return seen["state"], pipe


def eager_tower(llava_pair, batch):
    tower = llava_pair["eager"].model.vision_tower
    with torch.no_grad():
        return tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)


@pytest.mark.parametrize("layer", [-2, 0, 1])
@pytest.mark.parametrize("heads", ["mean", "sum"])
def test_cls_attention_equals_the_eager_towers_attention_map(llava_pair, batch, layer, heads):
    """The SDPA model's recomputed CLS row equals the eager tower's attention weights (CLS query,
    patch keys), laid out on each sample's visual tokens in order; 0 on text tokens."""
    state, _ = capture_state(llava_pair["sdpa"], batch, {"layer": 0, "operators": [
        {"op": "random"}, {"op": "topk", "keep": 1.0}]})
    got = state.signals.vision_cls_attention(layer=layer, heads=heads)
    att = eager_tower(llava_pair, batch).attentions[layer][:, :, 0, 1:].float()  # (images, H, 64)
    want = att.mean(1) if heads == "mean" else att.sum(1)
    visual = batch["input_ids"] == llava_pair["sdpa"].config.image_token_id
    for b in range(2):
        assert torch.allclose(got[b][visual[b]], want[b], atol=1e-5)
        assert bool((got[b][~visual[b]] == 0).all())


def test_vision_keys_equal_keys_of_the_towers_hidden_states(llava_pair, batch):
    state, _ = capture_state(llava_pair["sdpa"], batch, {"layer": 0, "operators": [
        {"op": "random"}, {"op": "topk", "keep": 1.0}]})
    keys = state.signals.vision_keys(layer=1)  # (B, N, H, hd)
    tower = llava_pair["eager"].model.vision_tower
    block = getattr(tower, "vision_model", tower).encoder.layers[1]
    h_in = eager_tower(llava_pair, batch).hidden_states[1]  # input of encoder layer 1
    with torch.no_grad():
        k = block.self_attn.k_proj(block.layer_norm1(h_in))[:, 1:]  # (images, 64, H*hd), CLS dropped
    visual = batch["input_ids"] == llava_pair["sdpa"].config.image_token_id
    for b in range(2):
        assert torch.allclose(keys[b][visual[b]].flatten(1), k[b], atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_cls_attention_topk_before_the_llm_equals_reference(llava_pair, batch, impl):
    """A VisionZip-style dominant-token selection at layer 0: picks the eager tower's top CLS-attention
    patches, and stock generate() equals the masked reference with every layer caching only them."""
    model = llava_pair[impl]
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "positions": "keep", "operators": [
        {"op": "cls_attention", "layer": -2}, {"op": "topk", "keep": 16}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    kept = pipe.trace[0].kept
    att = eager_tower(llava_pair, batch).attentions[-2][:, :, 0, 1:].float().mean(1)
    visual = batch["input_ids"] == model.config.image_token_id
    for b in range(2):
        vis_idx = visual[b].nonzero().flatten()
        top = set(vis_idx[att[b].argsort(descending=True, stable=True)[:16]].tolist())
        assert set(kept[b]) & set(vis_idx.tolist()) == top
    tokens, ref_logits = reference_greedy(llava_pair["eager"], batch, 0, kept, STEPS)
    assert torch.equal(out.sequences[:, -STEPS:], tokens)
    for got, want in zip(out.logits, ref_logits):
        assert torch.allclose(got.float(), want, atol=1e-4)


def test_vision_layer_out_of_range_is_named(llava_pair, batch):
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [
        {"op": "cls_attention", "layer": 5}, {"op": "topk", "keep": 0.5}]}]})
    with pytest.raises(ValueError, match=r"vision layer 5 does not exist: the tower has 2 layers \(allowed: -2\.\.1\)"):
        with torch.no_grad(), pipe.attach(llava_pair["sdpa"]):
            llava_pair["sdpa"](**batch)


@pytest.mark.parametrize("family,reason", [("qwen2_vl", "no CLS token"), ("llava_next", "anyres layout")])
def test_families_without_vision_signals_refuse_at_attach(family, reason):
    pipe = tp.load_pipeline({"stages": [{"layer": 0, "operators": [
        {"op": "cls_attention"}, {"op": "topk", "keep": 0.5}]}]})
    with pytest.raises(ConfigError, match=rf"stages\.0\.operators\.0\.op: 'cls_attention' needs vision-tower "
                                          rf"signals, which .* cannot give: .*{reason}"):
        pipe.attach(family_pair(family)["sdpa"])
