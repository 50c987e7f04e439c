"""The one budget knob, ``keep``: a fraction in (0, 1] or an integer count >= 1, everywhere."""

from __future__ import annotations

import math

import torch

from tokenprune.core.operator import ParamError


def check_keep(keep: float | int, field: str = "keep") -> None:
    """Raise :class:`ParamError` unless ``keep`` is a fraction in (0, 1] or an integer >= 1."""
    if isinstance(keep, bool):
        raise ParamError(field, "must be a fraction in (0, 1] or an integer count >= 1, not a boolean")
    if isinstance(keep, int):
        if keep < 1:
            raise ParamError(field, "an integer keep is a token count and must be >= 1")
    elif isinstance(keep, float):
        if not (0.0 < keep <= 1.0):
            hint = " (write an integer, e.g. 64, for a token count)" if keep > 1 else ""
            raise ParamError(field, f"a fractional keep must lie in (0, 1]{hint}")
    else:
        raise ParamError(field, f"must be a number, got {type(keep).__name__}")


def resolve_keep(keep: float | int, num_visual: int) -> int:
    """Number of visual tokens kept out of ``num_visual``.

    A fraction keeps ``round(keep * num_visual)`` (halves round up), at least 1 when there is any
    visual token; a count keeps ``min(keep, num_visual)``. ``1.0`` keeps everything, ``1`` keeps one.
    """
    if num_visual <= 0:
        return 0
    if isinstance(keep, float):
        return max(1, min(num_visual, math.floor(keep * num_visual + 0.5)))
    return min(int(keep), num_visual)


def rank_within_visual(scores: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """(B, N) rank of each visual token by descending score (stable: ties to the earlier token)."""
    order = torch.sort(scores.masked_fill(~visual, float("-inf")), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank


def keep_top_visual(scores: torch.Tensor, visual: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: every non-visual token, and each sample's ``counts[b]`` highest-scoring visual tokens."""
    rank = rank_within_visual(scores.float(), visual)
    return ~visual | (visual & (rank < counts.to(rank.device)[:, None]))
