"""Pre-LLM and merging operators (VisionZip, PruMerge, DivPrune, VScan, HoliTom, SparseVLM recycling)
on small hand-built states, against answers computed by hand."""

import math

import pytest
import torch

import tokenprune as tp
from tokenprune.core.state import TokenState
from tokenprune.runtime.sources import VisionSource


def state_of(visual, scores=None, hidden=None):
    visual = torch.tensor(visual, dtype=torch.bool)
    if hidden is None:
        hidden = torch.zeros(*visual.shape, 4)
    return TokenState.from_tensors(hidden, visual, scores=scores)


def kept_visual(state):
    return torch.nonzero(state.keep_mask[0] & state.visual_mask[0]).flatten().tolist()


def angles(*degrees):
    """Unit vectors in the plane at these angles, as a (1, N, 2) hidden state."""
    r = [math.radians(d) for d in degrees]
    return torch.tensor([[[math.cos(a), math.sin(a)] for a in r]])


# --- selectors ---------------------------------------------------------------------------------

def test_iqr_outliers_on_a_known_distribution():
    # visual scores 1..8 and 100: Q1 = 3, Q3 = 7 (linear interpolation at 2 and 6 of 0..8), IQR = 4
    scores = [[0.0] + [1, 2, 3, 4, 5, 6, 7, 8, 100] + [0.0]]
    visual = [[0] + [1] * 9 + [0]]
    st = tp.build_operator("iqr_outliers")(state_of(visual, scores))  # fence 7 + 1.5*4 = 13
    assert kept_visual(st) == [9]
    assert st.keep_mask[0, 0] and st.keep_mask[0, 10]
    st = tp.build_operator("iqr_outliers", factor=0.0)(state_of(visual, scores))  # fence 7: 8 and 100
    assert kept_visual(st) == [8, 9]
    flat = tp.build_operator("iqr_outliers", min_keep=2)(state_of(visual, [[0.0] + [5.0] * 9 + [0.0]]))
    assert kept_visual(flat) == [1, 2]  # no outlier: the first min_keep (ties to the earlier)


def test_max_min_diversity_on_a_2d_toy_set():
    # directions 0, 5, 90, 95, 180 degrees; cosine distance 1 - cos(angle between).
    # First: the token farthest from its nearest other one: 180 (nearest 95, d = 1 - cos 85 = 0.91).
    # Then the farthest from {180}: 0 (d = 2). Then from {180, 0}: 90 (min d = 1) beats 95 (min d = 0.91).
    hidden = angles(0, 5, 90, 95, 180)
    visual = [[1, 1, 1, 1, 1]]
    for keep, expected in [(1, [4]), (2, [0, 4]), (3, [0, 2, 4])]:
        st = tp.build_operator("max_min_diversity", keep=keep)(state_of(visual, hidden=hidden))
        assert kept_visual(st) == expected


# --- mergers -----------------------------------------------------------------------------------

def test_contextual_merge_by_hand():
    # text, then 6 visual tokens; the selector kept token 1 (dominant). Remaining 2..6, contextual 2:
    # stride 5 // 2 = 2 -> targets 2 and 4; 3 and 6 point along 2, 5 along 4 -> groups {2,3,6}, {4,5}.
    hidden = torch.tensor([[[0, 0], [9, 9], [1, 0], [2, 0.1], [0, 1], [0.1, 3], [4, -0.1]]], dtype=torch.float32)
    st = state_of([[0, 1, 1, 1, 1, 1, 1]], scores=[[0, 5, 1, 1, 1, 1, 1]], hidden=hidden)
    st.keep_mask = torch.tensor([[True, True, False, False, False, False, False]])
    st = tp.build_operator("contextual", contextual=2, features="hidden")(st)
    assert kept_visual(st) == [1, 2, 4]
    assert torch.allclose(st.hidden[0, 2], torch.tensor([(1 + 2 + 4) / 3, (0 + 0.1 - 0.1) / 3]))
    assert torch.allclose(st.hidden[0, 4], torch.tensor([(0 + 0.1) / 2, (1 + 3) / 2]))
    assert torch.equal(st.hidden[0, 1], hidden[0, 1])  # the dominant token is untouched
    assert st.sizes[0].tolist() == [1, 1, 3, 1, 2, 1, 1]


def test_nearest_mean_by_hand():
    # kept 0 (along x) and 2 (along y); 1 is nearer x, 3 nearer y -> size-weighted means, sizes add
    hidden = torch.tensor([[[1, 0], [3, 1], [0, 2], [1, 5]]], dtype=torch.float32)
    st = state_of([[1, 1, 1, 1]], hidden=hidden)
    st.sizes = torch.tensor([[1.0, 2.0, 1.0, 1.0]])
    st.keep_mask = torch.tensor([[True, False, True, False]])
    st = tp.build_operator("nearest_mean")(st)
    assert torch.allclose(st.hidden[0, 0], torch.tensor([(1 + 2 * 3) / 3, (0 + 2 * 1) / 3]))
    assert torch.allclose(st.hidden[0, 2], torch.tensor([(0 + 1) / 2, (2 + 5) / 2]))
    assert st.sizes[0, 0] == 3 and st.sizes[0, 2] == 2
    assert kept_visual(st) == [0, 2]


def test_knn_merge_by_hand():
    # kept token 0 at 0 degrees with score 2; its 2 nearest others are 1 (10 deg, score 1) and 2 (30 deg,
    # score 3); 3 (120 deg) is not a neighbour. h0 <- (2 h0 + 1 h1 + 3 h2) / 6
    hidden = angles(0, 10, 30, 120)
    st = state_of([[1, 1, 1, 1]], scores=[[2.0, 1.0, 3.0, 5.0]], hidden=hidden)
    st.keep_mask = torch.tensor([[True, False, False, False]])
    st = tp.build_operator("knn_merge", neighbors=2, features="hidden")(st)
    expected = (2 * hidden[0, 0] + 1 * hidden[0, 1] + 3 * hidden[0, 2]) / 6
    assert torch.allclose(st.hidden[0, 0], expected)
    assert torch.equal(st.hidden[0, 1:], hidden[0, 1:])


def test_nearest_position_merge_by_hand():
    # tokens 0 and 9 are text; visual 1..8 keep 2 and 6. 1 and 3 are next to 2; 4 is 2 from both (the earlier,
    # 2, takes it); 5, 7, 8 go to 6. h2 <- (h1 + h2 + h3 + h4) / 4, h6 <- (h5 + h6 + h7 + h8) / 4, sizes 4 and 4.
    hidden = torch.arange(10, dtype=torch.float32).view(1, 10, 1).repeat(1, 1, 3) ** 2
    st = state_of([[0] + [1] * 8 + [0]], hidden=hidden)
    st.keep_mask = torch.tensor([[True, False, True, False, False, False, True, False, False, True]])
    st = tp.build_operator("nearest_position_merge")(st)
    assert torch.allclose(st.hidden[0, 2], hidden[0, [1, 2, 3, 4]].mean(0))
    assert torch.allclose(st.hidden[0, 6], hidden[0, [5, 6, 7, 8]].mean(0))
    assert torch.equal(st.hidden[0, [0, 9]], hidden[0, [0, 9]])  # text untouched
    assert st.sizes[0, 2] == 4 and st.sizes[0, 6] == 4
    assert st.merged_into[0].tolist() == [-1, 2, -1, 2, 2, 6, -1, 6, 6, -1]


@pytest.mark.parametrize("method,centre_b", [("dpc_knn", 4), ("kmeans", 5)])
def test_cluster_merge_recycles_two_clusters(method, centre_b):
    # kept token 0; dropped 1..6 form two groups: A = {1,2,3} near the origin, B = {4,5,6} near (5, 5).
    # DPC-KNN (knn 1): 1..5 have their nearest neighbour at 0.1 (same density), 6 at 0.2 (less dense);
    # among equals the earlier counts as denser, so 1 has no denser token (delta = its largest distance),
    # 4's nearest denser token is in A (~7.1) and every other delta is <= 0.2 -> centres 1 and 4.
    # KMeans: the members nearest the centroids (0.033, 0.033) and (5, 5.133) are 1 and 5.
    pts = [[9, 9], [0, 0], [0, 0.1], [0.1, 0], [5, 5], [5, 5.1], [5, 5.3]]
    hidden = torch.tensor([pts], dtype=torch.float32)
    st = state_of([[1] * 7], hidden=hidden)
    st.keep_mask = torch.tensor([[True] + [False] * 6])
    st = tp.build_operator("cluster_merge", clusters=2, knn=1, method=method)(st)
    assert kept_visual(st) == [0, 1, centre_b]
    assert torch.allclose(st.hidden[0, 1], torch.tensor([0.1 / 3, 0.1 / 3]))
    assert torch.allclose(st.hidden[0, centre_b], torch.tensor([5.0, (5 + 5.1 + 5.3) / 3]))
    assert st.sizes[0, 1] == 3 and st.sizes[0, centre_b] == 3 and float(st.sizes[0][st.keep_mask[0]].sum()) == 7


# --- the windowed CLS attention ----------------------------------------------------------------

class _Tower:
    """Stands in for an adapter: fixed CLS attention (1 image, 1 head, 16 patches on a 4x4 grid)."""

    def __init__(self, probs):
        self.probs = probs

    def vision_signal_layer(self, layer):
        return layer

    def vision_cls_attention(self, layer, captured, tower=None):
        return self.probs[0].T  # (patch rows, heads)


def test_cls_attention_window_normalises_within_each_window():
    att = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 16) / 100  # row-major 4x4: 0.01 .. 0.16
    st = state_of([[1] * 16])
    st.signals.vision = VisionSource(_Tower(att), {0: torch.zeros(1, 17, 2)}, torch.arange(16)[None], 1)
    glob = tp.build_operator("cls_attention", layer=0)(st).scores[0]
    assert torch.allclose(glob, att[0, 0])
    st.scores = None
    local = tp.build_operator("cls_attention", layer=0, window=2)(st).scores[0].view(4, 4)
    # windows {1,2,5,6} max 6, {3,4,7,8} max 8, {9,10,13,14} max 14, {11,12,15,16} max 16
    want = torch.tensor([[1 / 6, 2 / 6, 3 / 8, 4 / 8], [5 / 6, 1, 7 / 8, 1],
                         [9 / 14, 10 / 14, 11 / 16, 12 / 16], [13 / 14, 1, 15 / 16, 1]])
    assert torch.allclose(local, want)


# --- TopV's optimal-transport scorer -----------------------------------------------------------

def test_balanced_sinkhorn_meets_both_marginals_and_finds_the_cheap_matching():
    from tokenprune.operators.scorers import unbalanced_sinkhorn

    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(5, 7, generator=gen, dtype=torch.float64)
    a = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(7, generator=gen, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    plan = unbalanced_sinkhorn(cost, a, b, epsilon=0.1, rho=None, iterations=500)
    assert torch.allclose(plan.sum(1), a, atol=1e-9) and torch.allclose(plan.sum(0), b, atol=1e-9)
    # 2 x 2 with a cheap diagonal: as epsilon -> 0 the plan is the identity matching, mass 1/2 each
    cheap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    half = torch.full((2,), 0.5, dtype=torch.float64)
    plan = unbalanced_sinkhorn(cheap, half, half, epsilon=0.01, rho=None, iterations=100)
    assert torch.allclose(plan, torch.eye(2, dtype=torch.float64) / 2, atol=1e-12)


def test_unbalanced_sinkhorn_meets_the_target_marginal_and_relaxes_the_source_one():
    from tokenprune.operators.scorers import unbalanced_sinkhorn

    cost = torch.tensor([[0.0, 0.2, 0.4], [0.3, 0.1, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    eps = 0.5
    plan = unbalanced_sinkhorn(cost, third, third, epsilon=eps, rho=0.2, iterations=200)
    assert torch.allclose(plan.sum(0), third, atol=1e-12)  # each target fully explained
    assert plan.sum(1)[2] < plan.sum(1)[0] and plan.sum(1)[2] < 1 / 3  # the expensive source sends less
    # rho -> 0: each target's mass is split over the sources in proportion to exp(-cost / eps)
    plan = unbalanced_sinkhorn(cost, third, third, epsilon=eps, rho=1e-12, iterations=3)
    k = [[math.exp(-c / eps) for c in row] for row in cost.tolist()]
    by_hand = [[k[i][j] / sum(k[r][j] for r in range(3)) / 3 for j in range(3)] for i in range(3)]
    assert torch.allclose(plan, torch.tensor(by_hand, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("rho", [None, 0.1])
def test_sinkhorn_in_matrix_vector_form_equals_the_log_domain_updates(rho):
    """Cost / epsilon up to 80 (TopV's defaults: cost in [0, 4], epsilon 0.05) runs on K itself; the plan is the
    log-domain one's, and a range beyond float64's (cost / epsilon = 1000) falls back to it."""
    from tokenprune.operators.scorers import _sinkhorn_log, unbalanced_sinkhorn

    gen = torch.Generator().manual_seed(1)
    cost = 4 * torch.rand(40, 40, generator=gen, dtype=torch.float64)
    mass = torch.full((40,), 1 / 40, dtype=torch.float64)
    f = 1.0 if rho is None else rho / (rho + 0.05)
    plan = unbalanced_sinkhorn(cost, mass, mass, epsilon=0.05, rho=rho, iterations=50)
    assert torch.allclose(plan, _sinkhorn_log(cost / 0.05, mass, mass, f, 50), rtol=1e-9, atol=1e-15)
    far = unbalanced_sinkhorn(cost, mass, mass, epsilon=0.004, rho=rho, iterations=20)
    f = 1.0 if rho is None else rho / (rho + 0.004)
    assert torch.equal(far, _sinkhorn_log(cost / 0.004, mass, mass, f, 20))


def test_sinkhorn_scorer_prefers_the_centre_of_a_featureless_grid():
    # 3x3 visual grid with identical features: only the distances rank; the centre token costs least
    # to move everywhere and is nearest the centre, the corners cost most, symmetric ones tie.
    hidden = torch.ones(1, 11, 4)
    visual = [[0] + [1] * 9 + [0]]
    st = state_of(visual, hidden=hidden)
    scores = tp.build_operator("sinkhorn", features="hidden")(st).scores[0, 1:10].view(3, 3)
    assert scores[1, 1] == scores.max()
    corners = scores[[0, 0, 2, 2], [0, 2, 0, 2]]
    edges = scores[[0, 1, 1, 2], [1, 0, 2, 1]]
    assert torch.allclose(corners, corners[0].expand(4), atol=1e-5) and torch.allclose(edges, edges[0].expand(4), atol=1e-5)
    assert corners.max() < edges.min()
    assert abs(float(scores.mean()) - 1.0) < 0.5  # ~1 on average (the target mass is the visual count)


def test_sinkhorn_scorer_splits_each_target_by_feature_similarity():
    # four tokens on a 2x2 grid, distances switched off: three share a direction, one is orthogonal.
    # With rho -> 0 each target's 1/4 is split over the sources by exp(-(1 - cos) / eps), so a score is
    # a sum of those shares (times n), computed here by hand.
    hidden = angles(0, 0, 0, 90)
    st = TokenState.from_tensors(hidden, torch.ones(1, 4, dtype=torch.bool))
    scores = tp.build_operator("sinkhorn", features="hidden", spatial=0.0, central=0.0, rho=1e-9, epsilon=0.1)(st).scores[0]
    # rho -> 0 by hand: column j splits 1/4 over sources by exp(-(1-cos)/eps); cos is 1 within the group, 0 across
    e = math.exp(-1 / 0.1)
    group = (3 * (1 / (3 + e)) + e / (1 + 3 * e)) / 4 * 4  # times n = 4
    loner = (3 * (e / (3 + e)) + 1 / (1 + 3 * e)) / 4 * 4
    assert torch.allclose(scores, torch.tensor([group, group, group, loner]), atol=1e-5)
