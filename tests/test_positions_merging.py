"""Renumbered positions, merging with sizes and proportional attention, several stages: through the
stock forward and ``generate()``, against hand-run layers and against re-running the prefill."""

import pytest
import torch
from reference import cached_and_reprefilled_logits, generate_positions, hidden_at_layer, reference_from_site

import tokenprune as tp
from tokenprune.core.state import TokenState

SITE = 2


def pipeline(*stages):
    return tp.load_pipeline({"name": "t", "stages": list(stages)})


def random_stage(layer, keep, positions="keep", merger=None):
    ops = [{"op": "random", "seed": 1}, {"op": "topk", "keep": keep}]
    if merger:
        ops.append(merger)
    return {"layer": layer, "positions": positions, "operators": ops}


def with_pads(kept, attention_mask):
    """(B, K) token rows of a pruned forward: left padding, then the kept real tokens."""
    return torch.tensor([(attention_mask[b] == 0).nonzero().flatten().tolist() + row for b, row in enumerate(kept)])


@torch.no_grad()
def test_renumbered_positions_match_hand_run_layers(llava_pair, batch):
    model = llava_pair["eager"]
    am = batch["attention_mask"]
    inputs = {**batch, "position_ids": generate_positions(am)}
    pipe = pipeline(random_stage(SITE, 16, positions="renumber"))
    with pipe.attach(model):
        got = model(**inputs).logits.float()
    rows = with_pads(pipe.trace[0].kept, am)
    valid = am.gather(1, rows).bool()
    renumbered = torch.where(valid, valid.long().cumsum(1) - 1, torch.zeros_like(rows))
    hidden = hidden_at_layer(model, inputs, SITE)
    hidden = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    ref = reference_from_site(model, hidden, renumbered, valid, SITE)
    assert torch.allclose(got[valid], ref[valid], atol=1e-4)
    # and it is not the keep-positions answer
    kept_pos = inputs["position_ids"].gather(1, rows)
    assert not torch.allclose(ref[valid], reference_from_site(model, hidden, kept_pos, valid, SITE)[valid], atol=1e-3)


@torch.no_grad()
def test_bipartite_with_proportional_attention_matches_hand_run_layers(llava_pair, batch):
    model = llava_pair["eager"]
    am = batch["attention_mask"]
    inputs = {**batch, "position_ids": generate_positions(am)}
    merge = {"op": "bipartite", "keep": 0.5, "features": "hidden", "proportional_attention": True}
    pipe = pipeline({"layer": SITE, "operators": [merge]})
    with pipe.attach(model):
        got = model(**inputs).logits.float()
    # By hand: the unpruned hidden states at the site, merged by the operator alone, then the layers.
    hidden = hidden_at_layer(model, inputs, SITE)
    visual = batch["input_ids"] == model.config.image_token_id
    st = TokenState.from_tensors(hidden, visual, valid_mask=am.bool(), positions=inputs["position_ids"], layer=SITE)
    st = tp.build_operator("bipartite", keep=0.5, features="hidden")(st)
    rows = torch.nonzero(st.keep_mask)[:, 1].view(2, -1)
    assert torch.equal(rows, with_pads(pipe.trace[0].kept, am))
    valid = am.gather(1, rows).bool()
    h = st.hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    sizes = st.sizes.gather(1, rows)
    assert sizes.max() > 1 and float(sizes[valid].sum()) == float(am.sum())
    ref = reference_from_site(model, h, inputs["position_ids"].gather(1, rows), valid, SITE, key_bias=sizes.log())
    assert torch.allclose(got[valid], ref[valid], atol=1e-4)
    no_bias = reference_from_site(model, h, inputs["position_ids"].gather(1, rows), valid, SITE)
    assert not torch.allclose(no_bias[valid], ref[valid], atol=1e-3)  # the bias matters


CASES = {
    "renumber": [random_stage(SITE, 0.5, positions="renumber")],
    "three_stages_renumber": [random_stage(1, 0.5, "renumber"), random_stage(2, 0.5, "keep"),
                              random_stage(3, 0.5, "renumber")],
    "soft_merge_proportional": [random_stage(SITE, 0.25, merger={"op": "weighted_soft_merge",
                                                                 "proportional_attention": True})],
    "bipartite": [{"layer": SITE, "positions": "renumber",
                   "operators": [{"op": "bipartite", "keep": 0.5, "features": "hidden"}]}],
}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_cached_decoding_equals_rerunning_the_prefill(llava_pair, batch, impl, case):
    """Stock generate() with a KV cache gives, at every step, the logits of a fresh pruned prefill of
    the prompt plus the tokens generated so far (the selection does not depend on them here)."""
    check_cached_against_reprefill(llava_pair[impl], pipeline(*CASES[case]), batch, case)


@pytest.mark.parametrize("case", ["soft_merge_proportional", "renumber"])
@torch.no_grad()
def test_cached_decoding_without_padding(llava_pair, case):
    """One unpadded sample under SDPA: the LLM passes no mask, so the bias needs a built one."""
    from tokenprune.reference.tiny import tiny_llava_inputs

    model = llava_pair["sdpa"]
    check_cached_against_reprefill(model, pipeline(*CASES[case]), tiny_llava_inputs(model, prompts=[[10, 11, 12]]), case)


def check_cached_against_reprefill(model, pipe, batch, case):
    def step_kwargs(ids, am):
        return {"pixel_values": batch["pixel_values"], "position_ids": (am.long().cumsum(-1) - 1).masked_fill(am == 0, 1)}

    for i, cached, fresh in cached_and_reprefilled_logits(model, pipe, batch, step_kwargs):
        assert torch.allclose(cached.float(), fresh.float(), atol=1e-4), (case, i)


@torch.no_grad()
def test_stages_see_what_the_earlier_stage_left(llava_pair, batch):
    pipe = pipeline(random_stage(1, 0.5, "renumber"), random_stage(2, 0.5), random_stage(3, 8, "renumber"))
    with pipe.attach(llava_pair["sdpa"]):
        llava_pair["sdpa"](**batch)
    assert [t.visual_before for t in pipe.trace] == [[64, 64], [32, 32], [16, 16]]
    assert [t.visual_after for t in pipe.trace] == [[32, 32], [16, 16], [8, 8]]
    for first, second in zip(pipe.trace, pipe.trace[1:]):
        for a, b in zip(first.kept, second.kept):
            assert set(b) <= set(a)


@torch.no_grad()
def test_rope_free_scores_match_a_hand_computation(llava_pair, batch):
    """rope_free + last-token attention = softmax of q·k without rotary, from the layer's own weights."""
    model = llava_pair["sdpa"]
    pipe = pipeline({"layer": SITE, "operators": [{"op": "rope_free"}, {"op": "attention", "queries": "last"},
                                                  {"op": "topk", "keep": 8}]})
    with pipe.attach(model):
        model(**batch)
    layer = model.model.language_model.layers[SITE - 1]
    attn = layer.self_attn
    h = layer.input_layernorm(hidden_at_layer(model, batch, SITE - 1))
    b, n, _ = h.shape
    q = attn.q_proj(h[:, -1:]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2).repeat_interleave(2, dim=1)
    logits = (q @ k.transpose(-1, -2))[:, :, 0] * attn.head_dim ** -0.5  # (B, H, N)
    logits = logits.masked_fill(~batch["attention_mask"].bool()[:, None], float("-inf"))
    scores = logits.softmax(-1).mean(1)
    visual = batch["input_ids"] == model.config.image_token_id
    for i in range(b):
        vis = visual[i].nonzero().flatten()
        top = vis[scores[i, vis].argsort(descending=True, stable=True)[:8]].tolist()
        kept_visual = [t for t in pipe.trace[0].kept[i] if visual[i, t]]
        assert kept_visual == sorted(top)
    # ... and differs from the rotary choice on this model
    fastv = pipeline({"layer": SITE, "operators": [{"op": "attention"}, {"op": "topk", "keep": 8}]})
    with fastv.attach(model):
        model(**batch)
    assert fastv.trace[0].kept != pipe.trace[0].kept
