"""Operators on hand-built TokenStates, against hand-computed answers."""

import torch

import tokenprune as tp
from tokenprune.core.attention import LogitsSource
from tokenprune.core.budget import resolve_keep
from tokenprune.core.state import Signals, TokenState


def make_state(visual_rows, scores=None):
    visual = torch.tensor(visual_rows, dtype=torch.bool)
    b, n = visual.shape
    state = TokenState(hidden=torch.zeros(b, n, 4), visual_mask=visual, valid_mask=torch.ones(b, n, dtype=torch.bool),
                       positions=torch.arange(n).expand(b, n), source_index=torch.arange(n).expand(b, n),
                       sizes=torch.ones(b, n), layer=2)
    if scores is not None:
        state.scores = torch.tensor(scores, dtype=torch.float32)
    return state


def test_resolve_keep_by_hand():
    assert resolve_keep(0.5, 576) == 288
    assert resolve_keep(0.25, 576) == 144
    assert resolve_keep(0.1, 576) == 58  # 57.6 rounds to 58
    assert resolve_keep(0.001, 576) == 1  # never zero while there are visual tokens
    assert resolve_keep(1.0, 576) == 576
    assert resolve_keep(64, 10) == 10
    assert resolve_keep(0.5, 0) == 0


def test_topk_keeps_best_visual_and_all_text():
    state = make_state([[0, 1, 1, 1, 1, 0]], scores=[[9.0, 0.1, 0.7, 0.3, 0.9, -5.0]])
    op = tp.build_operator("topk", keep=2)
    mask = op(state).keep_mask
    assert mask.tolist() == [[True, False, True, False, True, True]]


def test_topk_ties_go_to_the_earlier_token():
    state = make_state([[1, 1, 1, 1]], scores=[[0.5, 0.5, 0.5, 0.5]])
    mask = tp.build_operator("topk", keep=0.5)(state).keep_mask
    assert mask.tolist() == [[True, True, False, False]]


def test_topk_fraction_is_per_sample():
    state = make_state([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], scores=[[1, 2, 3, 4, 0, 0], [5, 1, 0, 0, 0, 0]])
    mask = tp.build_operator("topk", keep=0.5)(state).keep_mask
    assert mask.tolist() == [[False, False, True, True, True, True], [True, False, True, True, True, True]]


def last_row_logits(probs):
    """(1, H, N, N) logits whose last row's softmax is ``probs`` (H, N); other rows are irrelevant."""
    probs = torch.tensor(probs)
    h, n = probs.shape
    logits = torch.zeros(1, h, n, n)
    logits[0, :, -1] = probs.log()
    return LogitsSource(logits)


def test_scorers_combine_with_weights():
    state = make_state([[1, 1, 1]])
    state.signals = Signals(state, source=last_row_logits([[0.2, 0.3, 0.5]]))
    state = tp.build_operator("attention", weight=2.0)(state)
    state = tp.build_operator("attention", weight=-1.0, heads="max")(state)
    assert torch.allclose(state.scores, torch.tensor([[0.2, 0.3, 0.5]]))


def test_attention_heads_reduction():
    source = last_row_logits([[0.1, 0.9], [0.5, 0.5]])  # two heads, the last token's attention rows
    for heads, expected in [("mean", [0.3, 0.7]), ("max", [0.5, 0.9]), ("sum", [0.6, 1.4])]:
        state = make_state([[1, 1]])
        state.signals = Signals(state, source=source)
        got = tp.build_operator("attention", heads=heads)(state).scores
        assert torch.allclose(got, torch.tensor([expected])), heads


def test_random_scores_are_seeded_and_batch_invariant():
    single = tp.build_operator("random", seed=3)(make_state([[0, 1, 1, 1]])).scores
    batch = tp.build_operator("random", seed=3)(make_state([[1, 1, 1, 0], [0, 1, 1, 1]])).scores
    assert torch.equal(batch[1], single[0])
    assert torch.equal(batch[0, :3], single[0, 1:])
    other = tp.build_operator("random", seed=4)(make_state([[0, 1, 1, 1]])).scores
    assert not torch.equal(other, single)


def test_kv_compact_sets_the_request():
    state = make_state([[1, 1]])
    assert tp.build_operator("kv_compact")(state).compact_kv_before_site is True
    state = make_state([[1, 1]])
    assert tp.build_operator("kv_compact", earlier_layers=False)(state).compact_kv_before_site is False


def test_every_operator_is_documented():
    for name, cls in tp.registered_operators().items():
        assert cls.summary(), f"operator {name} has no docstring"
        assert cls.kind in tp.KINDS


def test_a_scorer_weighted_out_is_not_computed():
    """weight 0 (how the ablations remove a scorer) adds nothing and never computes the score: the visual-query
    scorer would otherwise cost its full (H x V x N) block for nothing."""
    state = make_state([[1, 1, 1]])
    state.signals = Signals(state, source=last_row_logits([[0.2, 0.3, 0.5]]))
    state = tp.build_operator("attention", weight=1.0)(state)
    state.signals = Signals(state, source=None)  # any attention request would now fail
    state = tp.build_operator("attention", weight=0.0, queries="visual")(state)
    assert torch.allclose(state.scores, torch.tensor([[0.2, 0.3, 0.5]]))


def test_an_operator_runs_inside_a_profiler_range_named_after_it():
    """So a torch.profiler trace of a pruned forward tells each operator's kernels apart."""
    st = make_state([[0, 1, 1, 1, 1, 0]])
    st.hidden = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0))
    scorer, topk = tp.build_operator("hidden_norm"), tp.build_operator("topk", keep=2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        topk(scorer(st))
    ranges = [e for e in prof.events() if e.name.startswith("tokenprune.")]
    assert [e.name for e in ranges] == ["tokenprune.hidden_norm", "tokenprune.topk"]
    norm = next(e for e in prof.events() if e.name == "aten::linalg_vector_norm")
    inside = ranges[0].time_range
    assert inside.start <= norm.time_range.start and norm.time_range.end <= inside.end


def test_a_stage_computes_a_block_of_logits_once_and_keeps_blocks_within_a_byte_budget():
    """Rows that run contiguously through a block asked for before are read from it (the source is not asked
    again); with the budget too small for the block, it is computed again."""
    logits = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    class Counting(LogitsSource):
        def logits(self, sample, rows, **kw):
            calls.append(rows.tolist())
            return super().logits(sample, rows, **kw)

    for budget, want_calls in ((2**30, [[1, 3, 4, 5, 7]]), (0, [[1, 3, 4, 5, 7], [3, 4, 5]])):
        calls.clear()
        st = make_state([[1] * 8])
        st.signals.source = Counting(logits)
        st.signals.logit_cache_bytes = budget
        st.signals.logits(0, torch.tensor([1, 3, 4, 5, 7]))
        got = st.signals.logits(0, torch.tensor([3, 4, 5]))
        assert torch.equal(got, logits[0][:, [3, 4, 5]])
        assert calls == want_calls
