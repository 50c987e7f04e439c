"""``TokenState``: what flows through a stage, and its lazily computed signals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

#: Signature of the function the attach machinery provides for attention rows:
#: ``(query_index (B, Q) long) -> probabilities (B, H, Q, N)`` over the tokens of the state,
#: softmax over all (causally visible, non-padding) keys, computed at the layer before the site.
AttentionRowsFn = Callable[[torch.Tensor], torch.Tensor]


class Signals:
    """Lazy signals of a stage, each computed on first use and only once.

    Operators ask for what they need (``state.signals.attention(queries="last")``); nothing is
    computed for a pipeline that does not ask. The attach machinery supplies the functions that
    read the model; operators never touch it.
    """

    def __init__(self, state: TokenState, attention_rows: AttentionRowsFn | None = None):
        self._state = state
        self._attention_rows = attention_rows
        self._cache: dict[tuple, torch.Tensor] = {}

    def query_index(self, queries: str) -> torch.Tensor:
        """(B, Q) indices of the query rows named by ``queries`` (``last``: the final token)."""
        b, n = self._state.visual_mask.shape
        if queries == "last":
            return torch.full((b, 1), n - 1, dtype=torch.long, device=self._state.visual_mask.device)
        raise ValueError(f"queries={queries!r} is not available; allowed: last")

    def attention_rows(self, queries: str = "last") -> torch.Tensor:
        """(B, H, Q, N) attention probabilities of the chosen query rows, recomputed at layer ``site - 1``."""
        key = ("attention_rows", queries)
        if key not in self._cache:
            if self._attention_rows is None:
                raise RuntimeError("attention signals need a model layer before the site; none is available here")
            self._cache[key] = self._attention_rows(self.query_index(queries)).float()
        return self._cache[key]

    def attention(self, queries: str = "last", heads: str = "mean") -> torch.Tensor:
        """(B, N) attention each token receives from the chosen queries, reduced over heads, averaged over queries."""
        key = ("attention", queries, heads)
        if key not in self._cache:
            rows = self.attention_rows(queries)
            reduce = {"mean": torch.mean, "sum": torch.sum, "max": lambda t, dim: t.amax(dim=dim)}
            if heads not in reduce:
                raise ValueError(f"heads={heads!r}; allowed: {', '.join(reduce)}")
            self._cache[key] = reduce[heads](rows, dim=1).mean(dim=1)
        return self._cache[key]


@dataclass
class TokenState:
    """The tokens entering one stage, plus what the stage's operators decide about them.

    Shapes: B samples, N tokens (visual and text, left padding included), D hidden size.

    - ``hidden`` (B, N, D): hidden states entering the site's decoder layer.
    - ``visual_mask`` (B, N) bool: visual tokens (the only ones a selector may drop).
    - ``valid_mask`` (B, N) bool: False on padding.
    - ``positions`` (B, N) long: the original position ids of the tokens.
    - ``source_index`` (B, N) long: index of each token in the model's input sequence.
    - ``sizes`` (B, N) float: how many original tokens each token stands for.
    - ``scores`` (B, N) float: sum of the scorers' weighted scores (None before any scorer).
    - ``keep_mask`` (B, N) bool: the tokens that survive the stage (set by the selector).
    - ``compact_kv_before_site``: set by a compactor; the KV cache of earlier layers keeps only the kept tokens.
    """

    hidden: torch.Tensor
    visual_mask: torch.Tensor
    valid_mask: torch.Tensor
    positions: torch.Tensor
    source_index: torch.Tensor
    sizes: torch.Tensor
    layer: int
    scores: torch.Tensor | None = None
    keep_mask: torch.Tensor | None = None
    compact_kv_before_site: bool = False
    signals: Signals = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.signals = Signals(self)

    @property
    def batch_size(self) -> int:
        return self.visual_mask.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.visual_mask.shape[1]

    def num_visual(self) -> torch.Tensor:
        """(B,) number of visual tokens per sample."""
        return self.visual_mask.sum(dim=1)

    def add_scores(self, scores: torch.Tensor, weight: float = 1.0) -> None:
        """Accumulate ``weight * scores`` into ``self.scores``."""
        s = weight * scores.float()
        self.scores = s if self.scores is None else self.scores + s
