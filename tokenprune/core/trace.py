"""``StageTrace``: what one stage did in the last forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageTrace:
    """What one stage did in the last prefill.

    ``kept[b]`` lists, for sample b, the kept tokens as indices into the input sequence.
    """

    stage: int
    layer: int
    tokens_before: list[int]
    tokens_after: list[int]
    visual_before: list[int]
    visual_after: list[int]
    kept: list[list[int]] = field(repr=False)
    operator_ms: float = 0.0  # wall time inside the stage's operators (GPU synchronised)
    #: with ``pipeline.time_operators``: ``{"<index>:<op>": ms}`` for each operator (layer and cross-attention sites). A lazy
    #: signal is charged to the first operator that asks for it (ASAP's trend fit to its instruction scorer).
    operator_ms_by_op: dict[str, float] = field(default_factory=dict)
    #: ``prefill`` (tokens flowing on from ``layer``), ``kv_cache`` (what ``layer``'s cache holds after the
    #: prefill: counts are of cached entries) or ``decode`` (a re-pruning of ``layer``'s cache at decoding
    #: step ``step``).
    site: str = "prefill"
    step: int = 0
    #: per sample, {merged token: the kept token it was merged into}, input-frame indices (mergers only)
    merged_into: list[dict[int, int]] = field(default_factory=list, repr=False)
    #: per sample, the (rows, cols) of each tile the stage's per-tile budgets split the image into
    #: (``budget: per_tile``; empty otherwise)
    tiles: list[list[tuple[int, int]]] = field(default_factory=list, repr=False)
    #: a decoding-time re-pruning that chose before the step attended (``decode: {scorer: stage}``): per sample, the
    #: share of the visual entries it kept that the step's own attention ranks in its top as many (empty otherwise)
    hit_rate: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("stage", "layer", "tokens_before", "tokens_after",
                                              "visual_before", "visual_after", "kept", "operator_ms", "site", "step")} | \
            ({"hit_rate": self.hit_rate} if self.hit_rate else {})
