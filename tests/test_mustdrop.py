"""MustDrop's three stages: the local spatial merging (grid_pool with a threshold) by hand, the dual-attention
filter by hand on known attention rows, the output-aware cache policy (kv_compact from a layer) against the masked
reference, and the preset end to end."""

import math

import pytest
import torch
from reference import reference_greedy

import tokenprune as tp
from tokenprune.core.attention import LogitsSource
from tokenprune.core.state import TokenState


def test_only_the_windows_whose_tokens_are_alike_merge():
    """A 6x6 grid in 3x3 windows. Window 0: nine copies of one vector (similarity 1) -> one token, their mean, at
    the window's top-left cell with size 9. Window 1: nine orthogonal-ish vectors (mean similarity 0) -> untouched.
    Window 2: a shared direction plus small noise, pairwise cosine ~0.9 -> merged. Window 3: cosine 0.5 exactly
    (e_0 + e_j, pairs share half) -> under 0.8, untouched. 36 tokens -> 2 + 9 + 9 = 20."""
    g = torch.Generator().manual_seed(0)
    d = 16
    feats = torch.zeros(36, d)
    cells = [[(r * 6 + c) for r in range(w // 2 * 3, w // 2 * 3 + 3) for c in range(w % 2 * 3, w % 2 * 3 + 3)]
             for w in range(4)]
    shared = torch.randn(d, generator=g)
    for i in cells[0]:
        feats[i] = shared
    for j, i in enumerate(cells[1]):
        feats[i, j] = 1.0
    for i in cells[2]:
        feats[i] = 3 * torch.nn.functional.normalize(shared, dim=0) + 0.3 * torch.randn(d, generator=g)
    for j, i in enumerate(cells[3]):
        feats[i, 15] = 1.0
        feats[i, j] = 1.0
    state = TokenState.from_tensors(feats[None], torch.ones(1, 36, dtype=torch.bool), layer=0)
    state.tiles = torch.zeros(1, 36, dtype=torch.long)
    state.tile_grids = [[(6, 6)]]
    unit = torch.nn.functional.normalize(feats, dim=-1)

    def mean_pair(idx):
        s = unit[idx] @ unit[idx].T
        return float((s.sum() - s.diagonal().sum()) / (len(idx) * (len(idx) - 1)))

    assert mean_pair(cells[2]) > 0.8 and mean_pair(cells[3]) == pytest.approx(0.5)
    op = tp.build_operator("grid_pool", size=3, threshold=0.8, features="hidden")
    out = op(state)
    kept = out.keep_mask[0].nonzero().flatten().tolist()
    assert kept == sorted([cells[0][0], cells[2][0]] + cells[1] + cells[3])
    assert torch.allclose(out.hidden[0, cells[2][0]], feats[cells[2]].mean(0), atol=1e-6)
    assert torch.allclose(out.hidden[0, cells[0][0]], shared, atol=1e-6)
    assert out.sizes[0, cells[0][0]] == 9 and out.sizes[0, cells[1][0]] == 1
    with pytest.raises(NotImplementedError):
        op.expected_kept(36)


def softmax_row(length: int, hot: dict[int, float]) -> torch.Tensor:
    logits = torch.zeros(length)
    for k, v in hot.items():
        logits[k] = v
    return torch.softmax(logits, 0)


def test_the_dual_attention_filter_by_hand():
    """[bos, v1..v6, t7, t8]: the instruction is t7, t8. Per visual token, the summed attention of the two rows and
    the larger of the two, from the softmax rows written out; a token goes when both are under the thresholds;
    the key token (top 1 of 6 by the key scores, ceil(0.1 x 6) = 1) stays whatever its attention."""
    n = 9
    vis = torch.tensor([[False] + [True] * 6 + [False, False]])
    logits = torch.zeros(1, 1, n, n)
    logits[0, 0, 7, 1], logits[0, 0, 7, 2] = 4.0, 2.0
    logits[0, 0, 8, 1], logits[0, 0, 8, 3] = 4.0, 3.0
    state = TokenState.from_tensors(torch.zeros(1, n, 4), vis, attention=LogitsSource(logits))
    state.add_scores(torch.tensor([[0, 0, 0, 0, 0, 0, 5.0, 0, 0]]), into="key")
    rows = torch.stack([softmax_row(n, {1: 4.0, 2: 2.0}), softmax_row(n, {1: 4.0, 3: 3.0})])[:, 1:7]
    total, peak = rows.sum(0), rows.max(0).values
    g, i = 0.1, 0.05
    drop = (total < total.sum() * g) & (peak < i)
    assert drop.tolist() == [False, False, False, True, True, True]  # the thresholds cut where the test means
    keep = tp.build_operator("dual_attention", global_share=g, individual=i, key=0.1).select(state)[0]
    assert keep.tolist() == [True, True, True, True, False, False, True, True, True]  # v6 a key token
    keep = tp.build_operator("dual_attention", global_share=g, individual=i, key=0.0).select(state)[0]
    assert keep[1:7].tolist() == [True, True, True, False, False, False]
    # a token over one threshold only stays (both must be low): a huge individual threshold alone drops nothing
    keep = tp.build_operator("dual_attention", global_share=0.0, individual=1.0, key=0.0).select(state)[0]
    assert bool(keep.all())
    assert math.ceil(0.1 * 6) == 1


def test_kv_compact_from_a_layer_trims_only_the_layers_from_it_on(llava_pair, batch):
    """FastV-style pruning at layer 3 of 4 with kv_compact from layer 2: layers 0-1 keep every prompt entry,
    layer 2 only the kept ones; generation equals the reference whose layers 2.. stop seeing the pruned keys."""
    model = llava_pair["sdpa"]
    pipe = tp.load_pipeline({"stages": [{"layer": 3, "operators": [
        {"op": "attention", "queries": "last"}, {"op": "topk", "keep": 16}, {"op": "kv_compact", "from_layer": 2}]}]})
    with torch.no_grad(), pipe.attach(model):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    kept = pipe.trace[0].kept
    tokens, logits = reference_greedy(llava_pair["eager"], batch, 3, kept, 3, compact_earlier=True, compact_from=2)
    assert torch.equal(out.sequences[:, -3:], tokens)
    assert all(torch.allclose(a.float(), b, atol=1e-4) for a, b in zip(out.logits, logits))
    _, wrong = reference_greedy(llava_pair["eager"], batch, 3, kept, 3, compact_earlier=True, compact_from=0)
    assert not all(torch.allclose(a.float(), b, atol=1e-4) for a, b in zip(out.logits, wrong))


def test_the_preset_runs_its_three_stages_and_stock_generate_finishes():
    from tokenprune.reference.tiny import tiny_llava, tiny_llava_inputs

    model = tiny_llava("sdpa", layers=16, vision_layers=2)
    inputs = tiny_llava_inputs(model)
    pipe = tp.load_pipeline("mustdrop")
    with torch.no_grad(), pipe.attach(model):
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert [t.layer for t in pipe.trace] == [0, 3, 7, 11, 15]
    for a, b in zip(pipe.trace, pipe.trace[1:]):
        assert all(y <= x for x, y in zip(a.visual_after, b.visual_after))
