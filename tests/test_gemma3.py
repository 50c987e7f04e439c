"""Gemma 3: attention scores under the mask the model really uses (an image's tokens see each other both ways; a
sliding layer's window), against the eager model's own attention maps."""

import pytest
import torch
from families import inputs, pair

import tokenprune as tp


@pytest.mark.parametrize("site", [1, 2])  # scores read at layer 0 (sliding window) and layer 1 (global)
def test_visual_queries_rank_by_the_models_own_attention_map(site):
    """``queries: visual`` averages what every visual token pays each token at the layer before the site; a visual
    query sees the later tokens of its own image (not of a later image), and on a sliding layer only its window:
    the kept tokens are the top 4 of each sample's visual tokens by the eager model's attention weights."""
    model, batch = pair("gemma3")["sdpa"], inputs("gemma3")
    pipe = tp.load_pipeline({"stages": [{"layer": site, "operators": [
        {"op": "attention", "queries": "visual", "heads": "mean"}, {"op": "topk", "keep": 4}]}]})
    with torch.no_grad(), pipe.attach(model):
        model(**batch)
    with torch.no_grad():
        att = pair("gemma3")["eager"](**batch, output_attentions=True).attentions[site - 1].float()
    visual = batch["input_ids"] == model.config.image_token_id
    for b in range(2):
        vis = visual[b].nonzero().flatten()
        score = att[b][:, vis].mean(0).mean(0)  # heads, then the visual query rows
        want = set(vis[score[vis].argsort(descending=True, stable=True)[:4]].tolist())
        assert set(pipe.trace[0].kept[b]) & set(vis.tolist()) == want, b


def test_the_image_mask_is_not_causal_over_the_image():
    """The premise of the test above: in the eager model an image's first token attends to the image's later
    tokens, and not to a later image's."""
    model, batch = pair("gemma3")["eager"], inputs("gemma3")
    with torch.no_grad():
        att = model(**batch, output_attentions=True).attentions[1]
    vis = (batch["input_ids"][1] == model.config.image_token_id).nonzero().flatten()  # two images of 16
    first, second = vis[:16], vis[16:]
    assert float(att[1, :, first[0], first[1:]].sum()) > 0
    assert float(att[1, :, first[-1], second].sum()) == 0


def test_each_layer_rotates_with_its_own_type_when_positions_are_rebuilt():
    """Renumbered positions get each layer's own rotary embedding (local and global layers rotate with different
    bases): the adapter's (cos, sin) for a layer equal what the model hands that layer for the same positions."""
    from tokenprune.adapters import get_adapter

    model, batch = pair("gemma3")["sdpa"], inputs("gemma3")
    given = {}

    def record(i):
        def hook(module, args, kwargs):
            given[i] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True)
               for i, layer in enumerate(model.model.language_model.layers)]
    n = batch["input_ids"].shape[1]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], position_ids=torch.arange(n)[None])
    finally:
        for h in handles:
            h.remove()
    adapter = get_adapter(model)
    assert not torch.allclose(given[0][1][0], given[1][1][0])  # the two layer types differ
    for i in range(4):
        hidden, (cos, sin) = given[i]
        got = adapter.rotary_embeddings(hidden, torch.arange(n)[None], i)
        assert torch.allclose(got[0], cos) and torch.allclose(got[1], sin), i
