"""The in-LLM operators on small hand-built states, against answers computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

import tokenprune as tp
from tokenprune.core.attention import LogitsSource, QueryKeySource, query_rows
from tokenprune.core.errors import ConfigError
from tokenprune.core.state import TokenState


def state_of(visual, scores=None, hidden=None, **kw):
    visual = torch.tensor(visual, dtype=torch.bool)
    if hidden is None:
        hidden = torch.zeros(*visual.shape, 4)
    return TokenState.from_tensors(hidden, visual, scores=scores, **kw)


def kept_visual(state):
    return torch.nonzero(state.keep_mask[0] & state.visual_mask[0]).flatten().tolist()


# --- selectors ---------------------------------------------------------------------------------

def test_cumulative_mass_budget_on_a_known_distribution():
    # scores 0.1, 0.4, 0.2, 0.3 on four visual tokens: sorted 0.4, 0.3, 0.2, 0.1 -> cumulative 0.4, 0.7, 0.9, 1.0
    scores = [[9.0, 0.1, 0.4, 0.2, 0.3, 9.0]]
    visual = [[0, 1, 1, 1, 1, 0]]
    for threshold, expected in [(0.4, [2]), (0.7, [2, 4]), (0.75, [2, 3, 4]), (0.95, [1, 2, 3, 4]), (1.0, [1, 2, 3, 4])]:
        st = tp.build_operator("cumulative_mass", threshold=threshold)(state_of(visual, scores))
        assert kept_visual(st) == expected, threshold
        assert st.keep_mask[0, 0] and st.keep_mask[0, 5]  # text stays
    # the mass is relative: scaling the scores changes nothing
    st = tp.build_operator("cumulative_mass", threshold=0.7)(state_of(visual, [[1.0, 1.0, 4.0, 2.0, 3.0, 1.0]]))
    assert kept_visual(st) == [2, 4]
    st = tp.build_operator("cumulative_mass", threshold=0.4, min_keep=3)(state_of(visual, scores))
    assert kept_visual(st) == [2, 3, 4]
    st = tp.build_operator("cumulative_mass", threshold=1.0, max_keep=0.5)(state_of(visual, scores))
    assert kept_visual(st) == [2, 4]


def test_cumulative_mass_refuses_negative_scores_and_bad_thresholds():
    with pytest.raises(ValueError, match="non-negative"):
        tp.build_operator("cumulative_mass")(state_of([[1, 1]], [[0.5, -0.1]]))
    with pytest.raises(ConfigError, match="threshold"):
        tp.build_operator("cumulative_mass", threshold=1.5)


def test_uniform_grid_stride_on_a_24x24_grid():
    visual = [[0] * 3 + [1] * 576 + [0] * 2]
    st = tp.build_operator("uniform_grid", stride=2)(state_of(visual))
    kept = kept_visual(st)
    expected = [3 + r * 24 + c for r in range(0, 24, 2) for c in range(0, 24, 2)]
    assert kept == expected and len(kept) == 144
    st = tp.build_operator("uniform_grid", stride=3, offset=1)(state_of(visual))
    expected = [3 + r * 24 + c for r in range(1, 24, 3) for c in range(1, 24, 3)]
    assert kept_visual(st) == expected and len(expected) == 64
    assert tp.build_operator("uniform_grid", stride=3).expected_kept(576) == 64
    assert st.keep_mask[0, :3].all() and st.keep_mask[0, -2:].all()


def test_uniform_grid_needs_a_known_grid():
    with pytest.raises(ValueError, match="not a square grid"):
        tp.build_operator("uniform_grid")(state_of([[1] * 6]))
    st = tp.build_operator("uniform_grid", stride=2)(state_of([[1] * 6], grid=(2, 3)))
    assert kept_visual(st) == [0, 2]
    with pytest.raises(ConfigError, match="offset"):
        tp.build_operator("uniform_grid", stride=2, offset=2)


def test_union_of_topk_and_grid():
    scores = [[0.0] * 15 + [1.0]]  # the last of a 4x4 grid scores highest
    op = tp.build_operator("union", of=[{"op": "topk", "keep": 1}, {"op": "uniform_grid", "stride": 2}])
    st = op(state_of([[1] * 16], scores))
    assert kept_visual(st) == [0, 2, 8, 10, 15]
    with pytest.raises(ConfigError) as e:
        tp.build_operator("union", _key="stages.0.operators.1.op", of=[{"op": "topk"}, {"op": "random"}])
    assert e.value.key == "stages.0.operators.1.of.1.op" and "selectors" in str(e.value)
    with pytest.raises(ConfigError) as e:
        tp.build_operator("union", _key="stages.0.operators.1.op", of=[{"op": "topk", "keep": 2.5}, {"op": "topk"}])
    assert e.value.key == "stages.0.operators.1.of.0.keep"


# --- mergers -----------------------------------------------------------------------------------

def test_bipartite_merges_the_obvious_pairs():
    # visual tokens 0..5: A = {0, 2, 4}, B = {1, 3, 5}; 3 is nearly 0, 5 nearly 2, 4 matches nothing well
    h = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0.1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0.2]])
    sizes = torch.tensor([[2.0, 1, 1, 1, 1, 3]])
    st = state_of([[1] * 6], hidden=h[None].clone(), sizes=sizes)
    st = tp.build_operator("bipartite", keep=4, features="hidden")(st)
    assert st.keep_mask[0].tolist() == [False, True, False, True, True, True]
    assert torch.allclose(st.hidden[0, 3], (2 * h[0] + 1 * h[3]) / 3)  # size-weighted mean
    assert torch.allclose(st.hidden[0, 5], (1 * h[2] + 3 * h[5]) / 4)
    assert torch.equal(st.hidden[0, 1], h[1]) and torch.equal(st.hidden[0, 4], h[4])
    assert st.sizes[0].tolist() == [2.0, 1.0, 1.0, 3.0, 1.0, 4.0]
    assert st.proportional_attention
    with pytest.raises(ValueError, match="at most 3"):
        tp.build_operator("bipartite", keep=2, features="hidden")(state_of([[1] * 6], hidden=h[None].clone()))


@pytest.mark.parametrize("sparse", [True, False])
def test_spreading_pruned_rows_over_their_neighbours_adds_each_weighted_row_once(sparse):
    from tokenprune.operators.mergers import _add_spread

    g = torch.Generator().manual_seed(0)
    rows, out = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g)
    idx = torch.tensor([[0, 2], [2, 3], [1, 0], [2, 1], [3, 2]])  # kept token 2 is reached four times
    weight = torch.rand(5, 2, generator=g)
    expected = out.clone()
    for j in range(5):
        for r in range(2):
            expected[idx[j, r]] += weight[j, r] * rows[j]
    torch.testing.assert_close(_add_spread(out.clone(), idx, weight, rows, sparse=sparse), expected)


def test_weighted_soft_merge_weights_by_hand():
    # kept visual tokens k1, k2; pruned p; a text token that must not be touched
    k1, k2, p, text = [1.0, 0.0], [0.0, 1.0], [3.0, 1.0], [5.0, 5.0]
    h = torch.tensor([[k1, k2, p, text]])
    st = state_of([[1, 1, 1, 0]], scores=[[0.5, 0.25, 0.2, 0.0]], hidden=h.clone())
    st.keep_mask = torch.tensor([[True, True, False, True]])
    st = tp.build_operator("weighted_soft_merge", temperature=0.5, neighbors=0)(st)
    c1, c2 = 3 / math.sqrt(10), 1 / math.sqrt(10)  # cosine of p with k1, k2
    w1 = math.exp(c1 / 0.5) / (math.exp(c1 / 0.5) + math.exp(c2 / 0.5))
    w2 = 1 - w1
    exp1 = [(0.5 * 1 + 0.2 * w1 * 3) / (0.5 + 0.2 * w1), (0.5 * 0 + 0.2 * w1 * 1) / (0.5 + 0.2 * w1)]
    exp2 = [(0.2 * w2 * 3) / (0.25 + 0.2 * w2), (0.25 * 1 + 0.2 * w2 * 1) / (0.25 + 0.2 * w2)]
    assert torch.allclose(st.hidden[0, 0], torch.tensor(exp1), atol=1e-6)
    assert torch.allclose(st.hidden[0, 1], torch.tensor(exp2), atol=1e-6)
    assert torch.equal(st.hidden[0, 3], torch.tensor(text))
    assert torch.allclose(st.sizes[0, :2], torch.tensor([1 + w1, 1 + w2]))
    # one neighbour: everything goes to k1
    st = state_of([[1, 1, 1, 0]], scores=[[0.5, 0.25, 0.2, 0.0]], hidden=h.clone())
    st.keep_mask = torch.tensor([[True, True, False, True]])
    st = tp.build_operator("weighted_soft_merge", temperature=0.5, neighbors=1)(st)
    assert torch.allclose(st.hidden[0, 0], torch.tensor([(0.5 + 0.6) / 0.7, 0.2 / 0.7]))
    assert torch.equal(st.hidden[0, 1], torch.tensor(k2)) and st.sizes[0, :2].tolist() == [2.0, 1.0]
    # two neighbours of three kept tokens: k3 (opposite to p) gets nothing, k1 and k2 as with all neighbours above
    k3 = [-1.0, 0.0]
    st = state_of([[1, 1, 1, 1, 0]], scores=[[0.5, 0.25, 0.3, 0.2, 0.0]], hidden=torch.tensor([[k1, k2, k3, p, text]]))
    st.keep_mask = torch.tensor([[True, True, True, False, True]])
    st = tp.build_operator("weighted_soft_merge", temperature=0.5, neighbors=2)(st)
    assert torch.allclose(st.hidden[0, 0], torch.tensor(exp1), atol=1e-6)
    assert torch.allclose(st.hidden[0, 1], torch.tensor(exp2), atol=1e-6)
    assert torch.equal(st.hidden[0, 2], torch.tensor(k3)) and torch.equal(st.hidden[0, 4], torch.tensor(text))
    assert torch.allclose(st.sizes[0, :3], torch.tensor([1 + w1, 1 + w2, 1.0]))
    assert st.merge_record(0)[3] == 0  # p went mostly to k1


# --- scorers and query sets --------------------------------------------------------------------

def test_query_sets_by_hand():
    # pad, sys, v, v, v, q1, q2 (left padding at 0)
    visual = torch.tensor([0, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    valid = torch.tensor([0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    assert query_rows("last", visual, valid).tolist() == [6]
    assert query_rows("text", visual, valid).tolist() == [1, 5, 6]
    assert query_rows("instruction", visual, valid).tolist() == [5, 6]
    assert query_rows("visual", visual, valid).tolist() == [2, 3, 4]
    assert query_rows("all", visual, valid).tolist() == [1, 2, 3, 4, 5, 6]
    # raters: the instruction token whose hidden state resembles the visual tokens is the relevant one
    hidden = torch.zeros(7, 2)
    hidden[2:5] = torch.tensor([4.0, 0.0])
    hidden[5] = torch.tensor([4.0, 0.0])
    hidden[6] = torch.tensor([0.0, 4.0])
    assert query_rows("raters", visual, valid, hidden).tolist() == [5]


def test_key_norm_hidden_norm_and_duplication_by_hand():
    keys = torch.zeros(1, 2, 4, 2)  # (B, H_kv, N, hd)
    keys[0, 0] = torch.tensor([[3.0, 4.0], [0, 1], [0, 2], [1, 0]])  # norms 5, 1, 2, 1
    keys[0, 1] = torch.tensor([[0.0, 1.0], [0, 3], [0, 2], [0, 1]])  # norms 1, 3, 2, 1
    h = torch.tensor([[[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 2]]])
    logits = torch.zeros(1, 1, 4, 4)
    st = state_of([[1, 1, 1, 1]], hidden=h, attention=LogitsSource(logits, keys=keys))
    assert tp.build_operator("key_norm")(st).scores.tolist() == [[3.0, 2.0, 2.0, 1.0]]
    st = state_of([[1, 1, 1, 1]], hidden=h)
    assert torch.allclose(tp.build_operator("hidden_norm")(st).scores, torch.tensor([[1.0, 0.9055385, 1.0, 2.0]]))
    # one pivot by key norm: token 0; duplication = 1 - cos(token, pivot); the pivot scores 3
    st = state_of([[1, 1, 1, 1]], hidden=h, attention=LogitsSource(logits, keys=keys))
    got = tp.build_operator("duplication", pivots=1)(st).scores
    cos01 = 0.9 / math.sqrt(0.82)
    assert torch.allclose(got, torch.tensor([[3.0, 1 - cos01, 1.0, 1.0]]), atol=1e-6)
    # two pivots by hidden norm: tokens 3 (norm 2) then 0 (ties to the earlier of norms 1.0)
    st = state_of([[1, 1, 1, 1]], hidden=h)
    got = tp.build_operator("duplication", pivots=2, pivot_by="hidden_norm")(st).scores
    assert torch.allclose(got, torch.tensor([[3.0, 1 - cos01, 1.0, 3.0]]), atol=1e-6)


# --- attention-shift corrections on a synthetic input -------------------------------------------

def synthetic(seed=0, n_visual=36, n_text_before=2, n_instruction=5, slope=0.6):
    """Logits = content of the key + a pure positional trend in the query-key distance.

    The trend favours nearby keys, so text queries (after the image) prefer its last tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    n = n_text_before + n_visual + n_instruction
    visual = torch.zeros(n, dtype=torch.bool)
    visual[n_text_before:n_text_before + n_visual] = True
    content = torch.zeros(n)
    content[visual] = torch.randn(n_visual, generator=gen)
    pos = torch.arange(n)
    trend = -slope * (pos[:, None] - pos[None, :]).abs().float()
    logits = (content[None, :] + trend)[None, None]  # (B=1, H=1, N, N)
    return visual, content, LogitsSource(logits, content_free=trend[None, None])


def top_visual(scores, visual, k):
    s = scores[0].masked_fill(~visual, float("-inf"))
    return set(torch.topk(s, k).indices.tolist())


@pytest.mark.parametrize("shift,scorers,slope,stride", [
    ("rope_gravity", [("instruction", 1.0)], 0.15, 1),
    ("bidirectional_soft_mask", [("instruction", 0.5), ("visual", 0.5)], 0.15, 1),
    ("bidirectional_soft_mask", [("instruction", 0.5), ("visual", 0.5)], 0.6, 1),
    ("bidirectional_soft_mask", [("instruction", 0.5), ("visual", 0.5)], 0.6, 4),  # 9 of 36 visual queries
])
def test_shift_corrections_recover_the_content_ranking(shift, scorers, slope, stride):
    visual, content, source = synthetic(slope=slope)
    k = 9
    truth = set(torch.topk(content.masked_fill(~visual, float("-inf")), k).indices.tolist())

    def run(ops):
        st = TokenState.from_tensors(torch.zeros(1, visual.numel(), 4), visual[None], attention=source)
        for op in ops:
            st = op(st)
        return st.scores

    raw = run([tp.build_operator("attention", queries="instruction")])
    assert top_visual(raw, visual, k) != truth  # the positional trend fools raw attention
    last_rows = torch.nonzero(visual).flatten()[-k:].tolist()
    assert len(top_visual(raw, visual, k) & set(last_rows)) >= k - 2  # ... towards the bottom of the image
    strided = {"query_stride": stride} if stride > 1 else {}
    ops = [tp.build_operator(shift, **strided)] + [tp.build_operator("attention", queries=q, weight=w, **strided)
                                                   for q, w in scorers]
    fixed = run(ops)
    assert top_visual(fixed, visual, k) == truth
    # the full ranking, not just the top-k (a strided estimate: up to one swap of neighbours in the ranking)
    v = torch.nonzero(visual).flatten()
    got, want = torch.argsort(fixed[0, v], descending=True), torch.argsort(content[v], descending=True)
    assert int((got != want).sum()) <= (0 if stride == 1 else 2)


def test_rope_gravity_guards_small_denominators():
    visual, content, _ = synthetic()
    n = visual.numel()
    logits = torch.zeros(1, 1, n, n)
    free = torch.zeros(1, 1, n, n)
    free[..., 5] = -1e4  # the content-free input never attends to token 5
    st = TokenState.from_tensors(torch.zeros(1, n, 4), visual[None], attention=LogitsSource(logits, content_free=free))
    st = tp.build_operator("rope_gravity", floor=0.1)(st)
    st = tp.build_operator("attention", queries="last")(st)
    s = st.scores[0]
    # last row: p = 1/n everywhere; p0 = 1/(n-1) except token 5 (0, clamped to 0.1/n): ratio (n-1)/n vs 10
    ratio = torch.full((n,), (n - 1) / n)
    ratio[5] = 10.0
    assert torch.allclose(s, ratio / ratio.sum(), atol=1e-6)
    with pytest.raises(ConfigError, match="floor"):
        tp.build_operator("rope_gravity", floor=0.0)


def test_standalone_state_without_attention_says_what_is_missing():
    st = state_of([[1, 1]])
    with pytest.raises(RuntimeError, match="AttentionSource"):
        tp.build_operator("attention")(st)


def test_positional_trend_fit_recovers_a_planted_trend():
    """Logits built exactly as a[q] + c[k] + t(|p_q - p_k|) (random a, c, t): the fit returns t, centred
    over the pairs, to machine precision; 6 steps (ASAP's default) already within 1e-3."""
    from tokenprune.operators.shift import fit_positional_trend

    gen = torch.Generator().manual_seed(0)
    h, q, k = 2, 30, 24
    q_pos, k_pos = torch.arange(q), torch.arange(k) + 3
    dist = (q_pos[:, None] - k_pos[None, :]).abs()
    size = int(dist.max()) + 1
    t = torch.randn(h, size, generator=gen, dtype=torch.float64)
    a = torch.randn(h, q, generator=gen, dtype=torch.float64)
    c = torch.randn(h, k, generator=gen, dtype=torch.float64)
    logits = a[:, :, None] + c[:, None, :] + t[:, dist]
    want = t - t[:, dist.reshape(-1)].mean(-1, keepdim=True)
    assert torch.allclose(fit_positional_trend(logits, q_pos, k_pos, 200), want, atol=1e-12)
    assert torch.allclose(fit_positional_trend(logits, q_pos, k_pos, 6), want, atol=1e-3)


# Positions scattered, interleaved and repeated (several tokens at one position, as M-RoPE gives).
_TREND_Q_POS = [5, 9, 9, 14, 40, 41, 70, 71, 72, 90]
_TREND_K_POS = [0, 2, 2, 3, 7, 9, 11, 30, 31, 33, 33, 60, 61, 62, 88]


def _trend_problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    q_pos, k_pos = torch.tensor(_TREND_Q_POS), torch.tensor(_TREND_K_POS)
    logits = torch.randn(3, len(q_pos), len(k_pos), generator=gen, dtype=torch.float64) * 3
    dist = (q_pos[:, None] - k_pos[None, :]).abs()
    return logits, q_pos, k_pos, dist, int(dist.max()) + 1


def test_positional_trend_fit_converges_to_the_least_squares_solution_of_lstsq():
    """Independent oracle: the explicit design matrix (one row per pair; query, key and distance indicator
    columns) solved by torch.linalg.lstsq, head by head. Its t, centred over the pairs, is the fit's at
    convergence. Distances no pair has get 0 (lstsq's minimum-norm solution gives them 0 as well)."""
    from tokenprune.operators.shift import fit_positional_trend

    logits, q_pos, k_pos, dist, size = _trend_problem(3)
    h, q, k = logits.shape
    qi, ki = torch.meshgrid(torch.arange(q), torch.arange(k), indexing="ij")
    design = torch.cat([F.one_hot(qi.flatten(), q), F.one_hot(ki.flatten(), k),
                        F.one_hot(dist.flatten(), size)], dim=1).double()  # (Q·K, Q + K + D)
    pairs = torch.bincount(dist.flatten(), minlength=size).double()
    want = []
    for head in range(h):
        t = torch.linalg.lstsq(design, logits[head].flatten()[:, None], driver="gelsd").solution[q + k:, 0]
        want.append(torch.where(pairs > 0, t - (t * pairs).sum() / pairs.sum(), torch.zeros_like(t)))
    got = fit_positional_trend(logits, q_pos, k_pos, 300)
    assert got.shape == (h, size)
    assert torch.allclose(got, torch.stack(want), atol=1e-8)
    # the same keys as columns 1, 3, 5, ... of a wider block (the others junk), picked by ``keys``
    wide = torch.full((h, q, 2 * k + 1), 1e3, dtype=torch.float64)
    columns = torch.arange(1, 2 * k + 1, 2)
    wide[:, :, columns] = logits
    assert torch.allclose(fit_positional_trend(wide, q_pos, k_pos, 300, keys=columns), torch.stack(want), atol=1e-8)
    # the same block handed over in chunks of rows (1, then 2, then the rest)
    chunks = (wide[:, :1], wide[:, 1:3], wide[:, 3:])
    assert torch.allclose(fit_positional_trend(iter(chunks), q_pos, k_pos, 300, keys=columns), torch.stack(want),
                          atol=1e-8)
    with pytest.raises(ValueError, match="hold 3 query rows"):
        fit_positional_trend(iter(chunks[:2]), q_pos, k_pos, 300, keys=columns)


@pytest.mark.parametrize("heads,key_heads,chunk", [(4, 4, 2**26), (6, 2, 2**26), (6, 2, 1)])
def test_trend_fit_from_queries_and_keys_is_the_fit_of_their_product(heads, key_heads, chunk, monkeypatch):
    """The q/k fit never forms the logits; its reference is the block fit of the explicit product q·kᵀ (each
    query head with its key head under grouped-query attention, keys repeated by hand), at the scattered,
    repeated positions — after 3 CG steps (the same iterates) and converged. ``chunk`` = 1 byte: one key head
    at a time through the FFTs."""
    import tokenprune.operators.shift as shift

    monkeypatch.setattr(shift, "QK_FIT_CHUNK_BYTES", chunk)
    gen = torch.Generator().manual_seed(11)
    q_pos, k_pos = torch.tensor(_TREND_Q_POS), torch.tensor(_TREND_K_POS)
    queries = torch.randn(heads, len(q_pos), 8, generator=gen, dtype=torch.float64)
    keys = torch.randn(key_heads, len(k_pos), 8, generator=gen, dtype=torch.float64)
    repeated = keys[torch.arange(heads) // (heads // key_heads)]  # (H, K, hd): key head of each query head
    logits = torch.einsum("hqd,hkd->hqk", queries, repeated)
    for steps in (3, 300):
        want = shift.fit_positional_trend(logits, q_pos, k_pos, steps)
        assert torch.allclose(shift.fit_positional_trend_qk(queries, keys, q_pos, k_pos, steps), want, atol=1e-9)
    # float32 in, float32 out, within float32 rounding of the block's fit
    got = shift.fit_positional_trend_qk(queries.float(), keys.float(), q_pos, k_pos, 300)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-4)


@pytest.mark.parametrize("chunk_bytes,cache_bytes,source", [(2**24, 2**30, "logits"), (1, 2**30, "logits"),
                                                             (1, 0, "logits"), (2**24, 2**30, "queries and keys"),
                                                             (1, 0, "queries and keys")])
def test_asap_scores_are_the_trend_corrected_softmax_by_hand(chunk_bytes, cache_bytes, source, monkeypatch):
    """ASAP end to end on given logits: the trend t from torch.linalg.lstsq on the explicit design matrix of the
    (instruction + visual rows) x visual keys block, subtracted from the logits; instruction rows and visual rows
    (which see every visual key) take a softmax over the visual keys only; each scorer is the mean over heads and
    rows, weighted 0.5 + 0.5. The same whatever the chunks of rows the stage computes the blocks in (down to one
    row a chunk) and whether it keeps them, and whether the stage is given the logits or queries and keys (whose
    scaled product, by hand, is the block: the trend is then fitted without forming it)."""
    gen = torch.Generator().manual_seed(3)
    n, h = 15, 2
    visual = torch.zeros(n, dtype=torch.bool)
    visual[2:12] = True
    queries, keys = torch.randn(1, h, n, 4, generator=gen), torch.randn(1, 1, n, 4, generator=gen)
    if source == "logits":
        logits = torch.randn(1, h, n, n, generator=gen, dtype=torch.float64) * 2
        given = LogitsSource(logits.float())
    else:  # two query heads share one key head; the default scale 1/sqrt(hd) = 1/2 undoes the 2
        logits = torch.stack([queries[0, i].double() @ keys[0, 0].double().T for i in range(h)])[None]
        given = QueryKeySource(queries * 2, keys)
        import tokenprune.operators.shift as shift

        fitted = []  # the trend from the queries and keys (at this size the block would be cheaper: forced)
        monkeypatch.setattr(shift, "qk_fit_is_cheaper", lambda *a: True)
        monkeypatch.setattr(shift, "fit_positional_trend", lambda *a, **k: fitted.append(a))
    vis, instr = torch.arange(2, 12), torch.arange(12, 15)
    rows = torch.cat([instr, vis])
    block = logits[0][:, rows][:, :, vis]  # (H, 13, 10)
    qi, ki = torch.meshgrid(torch.arange(13), torch.arange(10), indexing="ij")
    dist = (rows[:, None] - vis[None, :]).abs()
    size = int(dist.max()) + 1
    design = torch.cat([F.one_hot(qi.flatten(), 13), F.one_hot(ki.flatten(), 10),
                        F.one_hot(dist.flatten(), size)], dim=1).double()
    want = torch.zeros(n, dtype=torch.float64)
    for head in range(h):
        t = torch.linalg.lstsq(design, block[head].flatten()[:, None], driver="gelsd").solution[23:, 0]
        probs = (block[head] - t[dist]).softmax(-1)  # (13, 10): a constant in t cancels in each row's softmax
        want[vis] += 0.5 * (probs[:3].mean(0) + probs[3:].mean(0)) / h

    st = TokenState.from_tensors(torch.zeros(1, n, 4), visual[None], attention=given)
    st.signals.chunk_bytes, st.signals.logit_cache_bytes = chunk_bytes, cache_bytes
    for op in (tp.build_operator("bidirectional_soft_mask", iterations=60),
               tp.build_operator("attention", queries="instruction", weight=0.5),
               tp.build_operator("attention", queries="visual", weight=0.5)):
        st = op(st)
    assert torch.allclose(st.scores[0].double(), want, atol=1e-5)
    if source != "logits":
        assert fitted == []  # the block fit was never asked


def test_the_trend_fit_forms_the_logit_block_only_when_that_is_cheaper():
    """By the cost rule's constants, by hand: 2940 visual rows x 2928 keys, 32 heads of 128, positions spanning 2950
    (an FFT of 6000 points): the block costs 32·2940·2928·(128/70 + 4) = 1.60e9, the transforms 64·128·6000·7 =
    3.44e8 -> queries and keys. 107 rows: the block 5.85e7 -> the block. Grouped-query attention (8 key heads)
    makes the transforms cheaper: 40·128·6000·7 = 2.15e8, still above a 107-row block."""
    from tokenprune.operators.shift import qk_fit_is_cheaper

    assert qk_fit_is_cheaper(2940, 2928, 32, 32, 128, 2950)
    assert not qk_fit_is_cheaper(107, 2928, 32, 32, 128, 2950)
    assert not qk_fit_is_cheaper(107, 2928, 32, 8, 128, 2950)
    assert qk_fit_is_cheaper(1000, 2928, 32, 8, 128, 2950)  # block 5.45e8 > 2.15e8


def test_positional_trend_fit_takes_the_conjugate_gradient_steps_of_the_dense_normal_equations():
    """Each step, not only the limit: 3 steps of Jacobi-preconditioned CG on the dense normal equations
    G = Zᵀ P Z, b = Zᵀ P L (Z: pair-to-distance indicator, P: double centring of the (Q, K) pair block),
    built here as explicit matrices, equal the fit's 3 FFT-based steps (far from converged)."""
    from tokenprune.operators.shift import fit_positional_trend

    logits, q_pos, k_pos, dist, size = _trend_problem(5)
    h, q, k = logits.shape
    z = F.one_hot(dist.flatten(), size).double()  # (Q·K, D)

    def centre(block):  # double centring of (Q, K) blocks, as (Q·K,) columns
        block = block.reshape(q, k, -1)
        block = block - block.mean(0, keepdim=True) - block.mean(1, keepdim=True) + block.mean((0, 1), keepdim=True)
        return block.reshape(q * k, -1)

    g = z.T @ centre(z)  # (D, D)
    pairs = z.sum(0)
    want = []
    for head in range(h):
        b = (z.T @ centre(logits[head].reshape(-1, 1)))[:, 0]
        t = torch.zeros(size, dtype=torch.float64)
        r = b.clone()
        zr = r / pairs.clamp_min(1)
        d = zr.clone()
        for _ in range(3):
            alpha = (r @ zr) / (d @ g @ d)
            t = t + alpha * d
            r_next = r - alpha * (g @ d)
            zr_next = r_next / pairs.clamp_min(1)
            d = zr_next + (r_next @ zr_next) / (r @ zr) * d
            r, zr = r_next, zr_next
        want.append(t - (t @ pairs) / pairs.sum())
    want = torch.stack(want)
    assert torch.allclose(fit_positional_trend(logits, q_pos, k_pos, 3), want, atol=1e-9)
    assert torch.allclose(fit_positional_trend(logits.float(), q_pos, k_pos, 3), want.float(), atol=1e-4)
    assert not torch.allclose(fit_positional_trend(logits, q_pos, k_pos, 300), want, atol=1e-3)  # not converged yet


def test_a_query_stride_averages_every_sth_query_row_by_hand():
    """queries: visual, query_stride: 3 — the mean over heads, then over visual rows 0, 3, 6, ... (in sequence
    order), of each row's causal softmax over the real tokens, computed here from the logits."""
    gen = torch.Generator().manual_seed(1)
    n, h = 14, 2
    visual = torch.zeros(n, dtype=torch.bool)
    visual[2:12] = True
    logits = torch.randn(1, h, n, n, generator=gen)
    rows = torch.nonzero(visual).flatten()[::3]  # 2, 5, 8, 11
    causal = torch.arange(n)[None, :] <= rows[:, None]
    probs = logits[0][:, rows].masked_fill(~causal, float("-inf")).softmax(-1)  # (H, 4, N)
    want = probs.mean(0).mean(0)

    def score(**params):
        st = TokenState.from_tensors(torch.zeros(1, n, 4), visual[None], attention=LogitsSource(logits))
        return tp.build_operator("attention", queries="visual", **params)(st).scores[0]

    assert torch.allclose(score(query_stride=3), want, atol=1e-6)
    assert not torch.allclose(score(), want, atol=1e-3)  # all ten rows give another average
    with pytest.raises(ConfigError, match="query_stride"):
        tp.build_operator("attention", queries="visual", query_stride=0)


def test_masked_softmax_by_hand():
    """Softmax over the allowed keys only (e^1, e^3 -> 0.1192, 0.8808), a row with no allowed key gives zeros,
    and the mask broadcasts over heads."""
    from tokenprune.core.state import masked_softmax

    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [5.0, 1.0, 0.0]]).expand(2, 3, 3)
    allowed = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    z = math.exp(5) + math.exp(1) + 1
    want = torch.tensor([[math.exp(1) / (math.exp(1) + math.exp(3)), 0, math.exp(3) / (math.exp(1) + math.exp(3))],
                         [0, 0, 0], [math.exp(5) / z, math.exp(1) / z, 1 / z]])
    got = masked_softmax(x, allowed)
    assert got.shape == (2, 3, 3) and not got.isnan().any()
    assert torch.allclose(got, want.expand(2, 3, 3), atol=1e-6)
    owned = x.clone()
    assert torch.allclose(masked_softmax(owned, allowed, in_place=True), want.expand(2, 3, 3), atol=1e-6)
    assert owned[0, 0, 1] == float("-inf") and torch.equal(x[0, 0], torch.tensor([1.0, 2.0, 3.0]))  # only the owned one
    # the mask written into a bias beforehand (rows allowing different keys: a masked fill), then no mask added
    from tokenprune.core.state import _mask_into

    biased = _mask_into(x.clone(), allowed)
    assert torch.equal(torch.isinf(biased[0]), ~allowed)
    assert torch.allclose(masked_softmax(biased, allowed, in_place=True, masked=True), want.expand(2, 3, 3), atol=1e-6)
    same_keys = torch.tensor([[True, False, True]]).expand(3, 3)  # every row the same keys: a column fill
    assert torch.equal(torch.isinf(_mask_into(x.clone(), same_keys)[1]), ~same_keys)


def test_a_shift_bias_before_the_logits_and_a_mask_replaced_after_them_by_hand():
    """The last row (3) of hand logits [0, 1, 2, 3] sees keys 0-3. A shift's ``logit_bias`` adds 2 to key 0 and
    drops key 2 from the mask; softmax over keys 0, 1, 3 of [2, 1, 3]. A second shift's ``adjust_logits`` then
    replaces the mask without key 3: the replaced mask goes in again, softmax over keys 0, 1 of [2, 1]."""
    from tokenprune.core.operator import Shift

    class Bias(Shift):
        op_name = "test_bias"

        def logit_bias(self, ctx):
            ctx.allowed = ctx.allowed & (torch.arange(4) != 2)[None, :]
            bias = torch.zeros(1, ctx.rows.numel(), 4)
            bias[..., 0] = 2.0
            return bias

    class DropLast(Shift):
        op_name = "test_drop_last"

        def adjust_logits(self, ctx):
            ctx.allowed = ctx.allowed & (torch.arange(4) != 3)[None, :].to(ctx.allowed.device)

    logits = torch.tensor([0.0, 1.0, 2.0, 3.0]).expand(1, 1, 4, 4).clone()

    def scores(*shifts):
        st = TokenState.from_tensors(torch.zeros(1, 4, 2), torch.ones(1, 4, dtype=torch.bool),
                                     attention=LogitsSource(logits))
        for op in shifts:
            st = op(st)
        return st.signals.attention(queries="last")[0]

    z = math.exp(2) + math.exp(1) + math.exp(3)
    assert torch.allclose(scores(Bias()), torch.tensor([math.exp(2) / z, math.exp(1) / z, 0, math.exp(3) / z]))
    z = math.exp(2) + math.exp(1)
    assert torch.allclose(scores(Bias(), DropLast()), torch.tensor([math.exp(2) / z, math.exp(1) / z, 0, 0]))


@pytest.mark.parametrize("positions", [
    list(range(7, 19)),  # consecutive: windows of the symmetric table
    [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # left padding repeats a position: the element-wise gather
    [0, 1, 2, 3, 3, 3, 4, 8, 9, 10, 11, 12],  # M-RoPE-like repeats and a jump
])
def test_trend_at_pairs_is_the_trend_at_each_query_key_distance(positions):
    from tokenprune.operators.shift import trend_at_pairs

    pos = torch.tensor(positions)
    trend = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))  # distances 0..5; farther ones take t(5)
    rows = torch.tensor([0, 4, 5, 11])
    want = torch.empty(3, len(rows), len(pos))
    for i, r in enumerate(rows.tolist()):
        for k in range(len(pos)):
            want[:, i, k] = trend[:, min(abs(positions[r] - positions[k]), 5)]
    assert torch.equal(trend_at_pairs(trend, pos, rows), want)
