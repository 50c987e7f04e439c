"""Scorers: how much each token is worth keeping (higher is better)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tokenprune.operator import Scorer, ScorerParams
from tokenprune.registry import register_operator
from tokenprune.state import TokenState


@register_operator("attention")
class AttentionScorer(Scorer):
    """Attention that chosen query rows pay to each token at the layer before the site (FastV).

    FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) ranks visual tokens
    by the attention the last token gives them, averaged over heads. The attention rows are
    recomputed from the previous layer's input with its own q/k projections and rotary embedding
    for just the query rows, so the model keeps SDPA/FlashAttention and no ``output_attentions``
    is needed. Needs ``layer >= 1``.
    """

    @dataclass
    class Params(ScorerParams):
        queries: Literal["last"] = "last"  # which query rows: the last token
        heads: Literal["mean", "max", "sum"] = "mean"  # how heads are reduced

    min_layer = 1

    def score(self, state: TokenState) -> torch.Tensor:
        return state.signals.attention(queries=self.params.queries, heads=self.params.heads)


@register_operator("random")
class RandomScorer(Scorer):
    """Uniform random scores, seeded; the baseline every scorer must beat.

    Each sample draws its visual tokens' scores from its own generator seeded with ``seed``, so a
    sample gets the same scores alone or in any batch.
    """

    @dataclass
    class Params(ScorerParams):
        seed: int = 0

    def score(self, state: TokenState) -> torch.Tensor:
        scores = torch.zeros(state.visual_mask.shape, dtype=torch.float32)
        counts = state.num_visual().tolist()
        for b, n in enumerate(counts):
            gen = torch.Generator().manual_seed(self.params.seed)
            scores[b, state.visual_mask[b].cpu()] = torch.rand(int(n), generator=gen)
        return scores.to(state.visual_mask.device)
