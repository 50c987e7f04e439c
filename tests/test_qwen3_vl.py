"""Qwen3-VL's DeepStack under pruning, against a forward written out by hand: the decoder layers run one by one
on the kept tokens, each DeepStack level added to the kept visual tokens' own feature rows."""

import pytest
import torch

import tokenprune as tp
from tokenprune.reference.tiny import tiny_qwen2_vl_inputs, tiny_qwen3_vl


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3_vl("sdpa", layers=5)


def stock_pieces(model, batch):
    """From one stock forward: the input embeddings of the LLM, its layer-0 rotary (cos, sin), and each DeepStack
    level's (mask, features) as the LLM adds them."""
    lm = model.model.language_model
    got = {"levels": []}

    def first_layer(module, args, kwargs):
        got["embeds"] = args[0] if args else kwargs["hidden_states"]
        got["rope"] = kwargs["position_embeddings"]

    inner = lm._deepstack_process

    def record(hidden, mask, features):
        got["levels"].append((mask.clone(), features.clone()))
        return inner(hidden, mask, features)

    handle = lm.layers[0].register_forward_pre_hook(first_layer, with_kwargs=True)
    lm._deepstack_process = record
    try:
        with torch.no_grad():
            got["logits"] = model(**batch).logits[:, -1]
    finally:
        handle.remove()
        del lm._deepstack_process
    return got


def by_hand(model, pieces, layer, kept):
    """The last token's logits when the tokens ``kept`` (sorted sequence indices) alone enter layer ``layer`` and
    every layer after it: layers before it run on every token; DeepStack level i is added after layer i to the
    visual tokens then present, each its own feature row."""
    lm = model.model.language_model
    hidden = pieces["embeds"]
    cos, sin = pieces["rope"]
    n = hidden.shape[1]
    index = torch.arange(n)
    with torch.no_grad():
        for i, block in enumerate(lm.layers):
            if i == layer:
                index = torch.tensor(kept)
                hidden = hidden[:, index]
            k = index.numel()
            causal = torch.ones(k, k, dtype=torch.bool).tril()[None, None]
            hidden = block(hidden, attention_mask=causal, position_embeddings=(cos[:, index], sin[:, index]))
            if i < len(pieces["levels"]):
                mask, features = pieces["levels"][i]
                row = mask[0].long().cumsum(0) - 1  # the feature row of each visual token of the prompt
                present = mask[0, index]
                hidden = hidden.clone()
                hidden[0, present] = hidden[0, present] + features[row[index][present]]
        return model.lm_head(lm.norm(hidden))[:, -1]


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_deepstack_goes_to_the_kept_tokens(model, layer):
    """A stage before layer 0, 1 or 2 (before or among the three DeepStack layers 0-2): the pruned forward's
    logits are the hand-written forward's on the kept tokens."""
    batch = tiny_qwen2_vl_inputs(model, grids=[(8, 8)], prompts=[[10, 11, 12, 13]])
    batch["attention_mask"] = None  # one sample, no padding
    pieces = stock_pieces(model, batch)
    assert len(pieces["levels"]) == 3
    pipe = tp.load_pipeline({"stages": [{"layer": layer, "operators": [{"op": "random", "seed": 1},
                                                                       {"op": "topk", "keep": 0.25}]}]})
    with torch.no_grad(), pipe.attach(model):
        logits = model(**batch).logits[:, -1]
    kept = pipe.trace[0].kept[0]
    assert pipe.trace[0].visual_after == [4]
    want = by_hand(model, pieces, layer, kept)
    assert torch.allclose(logits, want, atol=1e-4)
    assert not torch.allclose(logits, pieces["logits"], atol=1e-2)  # pruning changed the answer's logits
