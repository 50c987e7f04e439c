"""``Stage``: a site and its ordered operators, with the order checked."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

from torch import nn

from tokenprune.core.config import CROSS_ATTENTION, KV_CACHE
from tokenprune.core.errors import ConfigError
from tokenprune.core.kv_cache import CacheSettings
from tokenprune.core.operator import KINDS, TokenOperator
from tokenprune.core.state import TokenState

#: Values of a stage's ``positions`` key.
POSITIONS: tuple[str, ...] = ("keep", "renumber")

ORDER_TEXT = "shift* → scorer* → selector → merger? → compactor?  (or shift* → a selecting merger → compactor?)"
_RANK = {k: i for i, k in enumerate(KINDS)}


class Stage(nn.Module):
    """A site (before decoder layer ``layer``; 0 = before the LLM; ``"cross_attention"``, the image
    features every cross-attention layer of Mllama reads; or ``"kv_cache"``, every layer's cached
    visual keys/values after the prefill) and its ordered operators.

    ``positions``: ``keep`` (kept tokens keep their position ids, FastV) or ``renumber`` (the
    surviving tokens are numbered contiguously from the site on, PyramidDrop). ``cache``: the
    :class:`~tokenprune.core.kv_cache.CacheSettings` of a ``kv_cache`` stage.
    """

    def __init__(self, layer: int | str, operators: Iterable[TokenOperator], key: str = "stage", positions: str = "keep",
                 protect: Iterable[str] = (), cache: CacheSettings | dict | None = None):
        super().__init__()
        self.layer = layer
        self.protect = tuple(protect)
        #: True for the ``cross_attention`` site (image features of a cross-attention model).
        self.cross_attention = layer == CROSS_ATTENTION
        #: True for the ``kv_cache`` site (each layer's KV cache, compressed after the prefill).
        self.kv_cache = layer == KV_CACHE
        self.operators = nn.ModuleList(operators)
        self.key = key
        if positions not in POSITIONS:
            raise ConfigError(f"{key}.positions", f"got {positions!r}; allowed: {', '.join(POSITIONS)}")
        self.positions = positions
        if cache is not None and not self.kv_cache:
            raise ConfigError(f"{key}.cache", f"only a '{KV_CACHE}' stage takes cache settings (layer is {layer!r})")
        self.cache = cache if isinstance(cache, CacheSettings) else CacheSettings.parse(cache, f"{key}.cache") \
            if self.kv_cache else None
        self._validate_order()
        if self.kv_cache:
            self._validate_kv()

    def _validate_kv(self) -> None:
        if self.positions != "keep":
            raise ConfigError(f"{self.key}.positions", "a kv_cache stage keeps positions (the cached keys carry "
                              f"their rotary embedding already); got {self.positions!r}")
        for j, op in enumerate(self.operators):
            if op.kind == "compactor":
                raise ConfigError(f"{self.key}.operators.{j}", f"compactor {op.op_name!r} trims caches of a layer "
                                  "stage; a kv_cache stage compresses every cache it names by itself")
            if getattr(op, "needs_vision", False) or getattr(op, "needs_guide", False):
                raise ConfigError(f"{self.key}.operators.{j}", f"{op.op_name!r} reads the vision tower or a guide "
                                  "model, which a kv_cache stage does not capture; score with the layer's attention")
        if self.cache.budget == "adaptive" and self.selector.op_name != "topk":
            raise ConfigError(f"{self.key}.cache.budget", "adaptive budgets re-share a topk selector's budget "
                              f"across layers; this stage's selector is {self.selector.op_name!r}")

    def score_operators(self) -> list[TokenOperator]:
        """The shifts and scorers (a kv_cache stage runs them inside the prefill)."""
        return [op for op in self.operators if op.kind in ("shift", "scorer")]

    def select_operators(self) -> list[TokenOperator]:
        """The selector and merger (a kv_cache stage runs them once the prefill is done)."""
        return [op for op in self.operators if op.kind not in ("shift", "scorer")]

    def _validate_order(self) -> None:
        """Check the operator order; the error names the first operator that breaks it."""
        seen: list[TokenOperator] = []
        for j, op in enumerate(self.operators):
            where = f"{self.key}.operators.{j}"
            kind, name = op.kind, op.op_name
            kinds = [o.kind for o in seen]
            later = [k for k in kinds if _RANK[k] > _RANK[kind]]
            if later:
                raise ConfigError(where, f"{kind} {name!r} comes after a {later[0]}; order is {ORDER_TEXT}")
            if kind in ("selector", "merger", "compactor") and kind in kinds:
                raise ConfigError(where, f"a stage takes at most one {kind}, found a second ({name!r}); order is {ORDER_TEXT}")
            if kind == "selector" and getattr(op, "needs_scores", True) and "scorer" not in kinds:
                raise ConfigError(where, f"selector {name!r} needs a scorer before it; order is {ORDER_TEXT}")
            if kind == "merger" and getattr(op, "selects", False) and ("selector" in kinds or "scorer" in kinds):
                other = next(o.op_name for o in seen if o.kind in ("scorer", "selector"))
                raise ConfigError(where, f"merger {name!r} chooses its own tokens, so the stage takes no scorer or "
                                  f"selector (found {other!r}); order is {ORDER_TEXT}")
            if kind == "merger" and not getattr(op, "selects", False) and "selector" not in kinds:
                raise ConfigError(where, f"merger {name!r} needs a selector before it; order is {ORDER_TEXT}")
            if kind == "compactor" and "selector" not in kinds and not any(getattr(o, "selects", False) for o in seen):
                raise ConfigError(where, f"compactor {name!r} needs a selector before it; order is {ORDER_TEXT}")
            seen.append(op)
        if not any(o.kind == "selector" or getattr(o, "selects", False) for o in seen):
            raise ConfigError(f"{self.key}.operators", f"a stage needs a selector (or a selecting merger); order is {ORDER_TEXT}")
        if any(o.kind == "scorer" for o in seen) and not any(o.kind == "selector" for o in seen):
            raise ConfigError(f"{self.key}.operators", f"a stage with scorers needs a selector after them; order is {ORDER_TEXT}")

    @property
    def selector(self) -> TokenOperator:
        """The operator that decides how many tokens survive: the selector, or a selecting merger."""
        return next(op for op in self.operators if op.kind == "selector" or getattr(op, "selects", False))

    def expected_kept(self, num_visual: int) -> int:
        """Visual tokens the stage keeps out of ``num_visual`` (analytic FLOPs): the selector's budget plus
        the tokens a merger adds back (VisionZip's contextual tokens, SparseVLM's recycled clusters).
        Raises NotImplementedError when the count depends on the input."""
        kept = self.selector.expected_kept(num_visual)
        for op in self.operators:
            if op.kind == "merger" and not getattr(op, "selects", False):
                kept += op.added_tokens(num_visual, kept)
        return kept

    def forward(self, state: TokenState, clock: Callable[[int, TokenOperator], AbstractContextManager] | None = None
                ) -> TokenState:
        """Run the operators in order; ``clock(i, op)``, when given, is a context each operator runs inside
        (per-operator timing)."""
        for i, op in enumerate(self.operators):
            with clock(i, op) if clock is not None else nullcontext():
                state = op(state)
        if state.keep_mask is None:
            raise RuntimeError(f"{self.key}: no selector set keep_mask")
        return state

    def extra_repr(self) -> str:
        return f"layer={self.layer}" + (f", cache={self.cache.as_dict()}" if self.cache is not None else "")
