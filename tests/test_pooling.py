"""Average pooling of the visual grid (``grid_pool``, the ``pooling`` preset): by hand, and end to end against
the model shown the pooled image — its own image features averaged 2x2 by hand, positions 0..n-1."""

import torch

import tokenprune as tp
from tokenprune.core.registry import registered_operators
from tokenprune.core.state import TokenState


def test_grid_pool_by_hand():
    """A 4x4 tile and a 3x5 tile pooled by 2: four and six tokens, each the mean of its block (edge blocks hold
    what is left: sizes 4, 4, 2 / 2, 2, 1 on the 3x5), carried by the block's top-left token; a visual token in
    no tile and a text token stay."""
    torch.manual_seed(0)
    h = torch.randn(1, 16 + 15 + 2, 3)
    visual = torch.ones(1, 33, dtype=torch.bool)
    visual[0, 32] = False  # text
    state = TokenState.from_tensors(h, visual, layer=0)
    state.tiles = torch.tensor([[0] * 16 + [1] * 15 + [-1, -1]])
    state.tile_grids = [[(4, 4), (3, 5)]]
    cls = registered_operators()["grid_pool"]
    out = cls(cls.parse_params({"size": 2}))(state)
    kept = out.keep_mask[0].nonzero().flatten().tolist()
    a = [0, 2, 8, 10]  # top-left of each 2x2 block of the 4x4 tile
    b = [16 + x for x in (0, 2, 4, 10, 12, 14)]  # of the 3x5 tile: rows {0,1},{2} x cols {0,1},{2,3},{4}
    assert kept == a + b + [31, 32]
    grid = h[0, :16].view(4, 4, 3)
    for i, t in enumerate(a):
        r, c = divmod(i, 2)
        assert torch.allclose(out.hidden[0, t], grid[2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1, 3).mean(0))
    g = h[0, 16:31].view(3, 5, 3)
    blocks = [(slice(0, 2), slice(0, 2)), (slice(0, 2), slice(2, 4)), (slice(0, 2), slice(4, 5)),
              (slice(2, 3), slice(0, 2)), (slice(2, 3), slice(2, 4)), (slice(2, 3), slice(4, 5))]
    for t, (rs, cs) in zip(b, blocks):
        assert torch.allclose(out.hidden[0, t], g[rs, cs].reshape(-1, 3).mean(0), atol=1e-6)
    assert out.sizes[0, b].tolist() == [4, 4, 2, 2, 2, 1]
    assert out.sizes[0, a].tolist() == [4] * 4


@torch.no_grad()
def test_pooling_preset_is_the_model_shown_the_pooled_features(llava_pair, batch):
    """LLaVA-1.5 (8x8 visual tokens): the ``pooling`` preset's logits equal the unpruned LLM run on the prompt with
    its 64 image features replaced by their 16 2x2 means (computed here by hand), positions 0..n-1."""
    model = llava_pair["sdpa"]
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    try:
        model(**batch)
    finally:
        handle.remove()
    embeds = seen["embeds"]
    pipe = tp.load_pipeline("pooling")
    with pipe.attach(model):
        logits = model(**batch).logits
    assert pipe.trace[0].visual_after == [16, 16]
    image = model.config.image_token_id
    for b in range(2):
        real = batch["attention_mask"][b].bool()
        ids, e = batch["input_ids"][b][real], embeds[b][real]
        vis = (ids == image).nonzero().flatten()
        pooled = e[vis].view(4, 2, 4, 2, -1).permute(0, 2, 1, 3, 4).reshape(16, 4, -1).mean(1)
        seq = torch.cat([e[:vis[0]], pooled, e[vis[-1] + 1:]])[None]
        hidden = lm(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None]).last_hidden_state
        want = model.lm_head(hidden)[0]
        got = logits[b, -seq.shape[1]:]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
