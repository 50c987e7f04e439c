"""CDPruner's conditional DPP (``dpp``): greedy MAP by hand and against the exact MAP on small kernels, and the
conditioning on the instruction."""

import itertools
import math

import torch

from tokenprune.core.registry import registered_operators
from tokenprune.core.state import TokenState
from tokenprune.operators.selectors import greedy_map


def dpp(**params):
    cls = registered_operators()["dpp"]
    return cls(cls.parse_params(params))


def test_greedy_map_by_hand():
    """Unit vectors e0, e0 (a duplicate), e1, (e0+e1+e2)/sqrt(3): all variances 1, so e0 first (the first tie);
    then the duplicate has nothing left (1 - 1), e1 all (1), the diagonal 1 - 1/3; e1; then the diagonal's
    remaining 1/3 beats the duplicate's 0."""
    e = torch.eye(3)
    x = torch.stack([e[0], e[0], e[1], (e[0] + e[1] + e[2]) / math.sqrt(3)])
    kernel = x @ x.T
    assert greedy_map(kernel, 3).tolist() == [0, 2, 3]


def test_greedy_map_matches_the_exact_map_where_greedy_is_optimal():
    """On random low-dimensional kernels the first two greedy picks span the largest-determinant pair whenever
    that pair contains the largest diagonal (greedy's first pick), checked by enumeration."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(50):
        x = torch.randn(6, 3, generator=g, dtype=torch.float64)
        kernel = x @ x.T
        best = max(itertools.combinations(range(6), 2), key=lambda s: float(torch.det(kernel[list(s)][:, list(s)])))
        first = int(torch.argmax(torch.diagonal(kernel)))
        if first in best:
            assert set(greedy_map(kernel, 2).tolist()) == set(best)
            checked += 1
    assert checked >= 10


def test_the_instruction_conditions_the_choice():
    """Four visual tokens (e0, e0, e1, e2) and an instruction token e2: unconditioned, the DPP keeps e0 and e1 (the
    first tie, then the first of the distinct ones); conditioned on similarity to the instruction, the token most
    like it (e2) comes first, then e0; with the public code's negated relevance e2 weighs next to nothing and
    e0 and e1 are kept."""
    e = torch.eye(4)
    hidden = torch.stack([e[3], e[0], e[0], e[1], e[2], e[2]])[None]  # text, 4 visual, instruction
    visual = torch.tensor([[False, True, True, True, True, False]])
    state = TokenState.from_tensors(hidden, visual, layer=0)
    assert dpp(keep=2, condition="none").select(state)[0].tolist() == [True, True, False, True, False, True]
    assert dpp(keep=1, relevance="similar").select(state)[0].tolist() == [True, False, False, False, True, True]
    assert dpp(keep=2, relevance="similar").select(state)[0, 1:5].tolist() == [True, False, False, True]
    assert dpp(keep=2, relevance="dissimilar").select(state)[0, 1:5].tolist() == [True, False, True, False]


def important_diverse(**params):
    cls = registered_operators()["important_diverse"]
    return cls(cls.parse_params(params))


def test_important_diverse_by_hand():
    """Eight visual tokens scored 8..1 and a budget of 4: the two highest (0, 1) by score; the other six in score
    order 2..7 lose round one's A tokens (2, 4, 6: step 8 capped at A's three), leaving 3, 5, 7; round two splits
    them into A = 3, 7 and B = 5 and drops the A token most like a B token: 3 (a copy of 5). Kept: 0, 1, 5, 7."""
    e = torch.eye(4)
    feats = [e[2], e[2], e[3], e[0], e[3], e[0], e[3], e[1]]
    state = TokenState.from_tensors(torch.stack(feats)[None], torch.ones(1, 8, dtype=torch.bool), layer=0)
    state.scores = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]])
    keep = important_diverse(keep=4, important=0.5).select(state)[0]
    assert keep.nonzero().flatten().tolist() == [0, 1, 5, 7]


def test_important_diverse_keeps_the_budget_and_the_top_scores():
    g = torch.Generator().manual_seed(1)
    for v, keep, share in [(40, 10, 0.5), (33, 7, 0.3), (20, 20, 0.5), (16, 3, 1.0)]:
        state = TokenState.from_tensors(torch.randn(1, v, 5, generator=g), torch.ones(1, v, dtype=torch.bool), layer=0)
        state.scores = torch.randn(1, v, generator=g)
        kept = important_diverse(keep=keep, important=share).select(state)[0]
        assert int(kept.sum()) == keep
        top = state.scores[0].argsort(descending=True)[:int(keep * share)]
        assert bool(kept[top].all())


def test_greedy_map_past_the_kernels_rank_picks_each_item_once():
    """576 tokens with 128-wide features (the reference LLM's width) and 288 picks: past the kernel's rank (128) every
    variance left is rounding noise. Each item is still picked once (dividing by that noise gave NaN variances and
    the same items again: 145 distinct of 288), and the picks before the rank are the plain greedy MAP's."""
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(576, 128, generator=g), dim=-1)
    relevance = torch.rand(576, generator=g)
    kernel = relevance[:, None] * (feats @ feats.T) * relevance[None]
    picked = greedy_map(kernel, 288)
    assert len(set(picked.tolist())) == 288
    assert torch.equal(picked[:64], greedy_map(kernel, 64))
