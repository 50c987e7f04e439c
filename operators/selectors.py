"""Selectors: which visual tokens survive, given the accumulated scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.budget import check_keep, resolve_keep
from tokenprune.operator import Selector
from tokenprune.registry import register_operator
from tokenprune.state import TokenState


@register_operator("topk")
class TopK(Selector):
    """Keep the ``keep`` highest-scoring visual tokens of each sample; text tokens always stay.

    ``keep`` is a fraction of each sample's visual tokens in (0, 1] or an integer count >= 1.
    Ties go to the earlier token.
    """

    @dataclass
    class Params:
        keep: float | int = 0.5

        def __post_init__(self) -> None:
            check_keep(self.keep)

    def expected_kept(self, num_visual: int) -> int:
        return resolve_keep(self.params.keep, num_visual)

    def select(self, state: TokenState) -> torch.Tensor:
        visual = state.visual_mask
        keep = ~visual
        # Stable descending sort: equal scores keep their order, so ties go to the earlier token.
        scores = state.scores.masked_fill(~visual, float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        budgets = torch.tensor([self.expected_kept(int(v)) for v in state.num_visual().tolist()], device=rank.device)
        return keep | (visual & (rank < budgets[:, None]))
