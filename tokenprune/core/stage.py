"""``Stage``: a site and its ordered operators, with the order checked."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from tokenprune.core.errors import ConfigError
from tokenprune.core.kv_cache import CacheSettings
from tokenprune.core.operator import KINDS, Selector, TokenOperator
from tokenprune.core.registry import registered_operators
from tokenprune.core.sites import KV_CACHE, KVCacheSite, LayerSite, Site, site_of
from tokenprune.core.state import TokenState

#: Values of a stage's ``positions`` key.
POSITIONS: tuple[str, ...] = ("keep", "renumber")
#: Values of a stage's ``budget`` key.
BUDGETS: tuple[str, ...] = ("per_image", "per_tile")

ORDER_TEXT = "shift* → scorer* → selector → merger? → compactor?  (or shift* → a selecting merger → compactor?)"
_RANK = {k: i for i, k in enumerate(KINDS)}


class Stage(nn.Module):
    """A site (:mod:`tokenprune.core.sites`: ``layer`` is a decoder layer index — 0 = before the LLM —,
    ``"cross_attention"``, the image features every cross-attention layer of Mllama reads, or ``"kv_cache"``,
    every layer's cached visual keys/values after the prefill) and its ordered operators.

    ``positions``: ``keep`` (kept tokens keep their position ids, FastV) or ``renumber`` (the
    surviving tokens are numbered contiguously from the site on, PyramidDrop). ``cache``: the
    :class:`~tokenprune.core.kv_cache.CacheSettings` of a ``kv_cache`` stage.

    ``budget``: ``per_image`` (the selector chooses among all of a sample's visual tokens) or ``per_tile``
    (it chooses within each tile separately — LLaVA-NeXT's base tile and each anyres crop, every image elsewhere —,
    each with its own budget, as VisionZip and DART treat LLaVA-NeXT's sub-images; scorers that read the grid
    run per tile too). Visual tokens outside every tile (LLaVA-NeXT's newline tokens) are then kept.
    """

    def __init__(self, layer: int | str | Site, operators: Iterable[TokenOperator], key: str = "stage", positions: str = "keep",
                 protect: Iterable[str] = (), cache: CacheSettings | dict | None = None, budget: str = "per_image"):
        super().__init__()
        #: Where the stage runs.
        self.site: Site = site_of(layer, f"{key}.layer")
        #: The site as YAML writes it: a decoder layer index, ``cross_attention`` or ``kv_cache``.
        self.layer = self.site.value
        self.protect = tuple(protect)
        self.operators = nn.ModuleList(operators)
        self.key = key
        if positions not in POSITIONS:
            raise ConfigError(f"{key}.positions", f"got {positions!r}; allowed: {', '.join(POSITIONS)}")
        self.positions = positions
        if budget not in BUDGETS:
            raise ConfigError(f"{key}.budget", f"got {budget!r}; allowed: {', '.join(BUDGETS)}")
        self.budget = budget
        kv = isinstance(self.site, KVCacheSite)
        if cache is not None and not kv:
            raise ConfigError(f"{key}.cache", f"only a '{KV_CACHE}' stage takes cache settings (layer is "
                              f"{self.layer!r})")
        self.cache = (cache if isinstance(cache, CacheSettings) else CacheSettings.parse(cache, f"{key}.cache")) \
            if kv else None
        self._validate_order()
        if budget == "per_tile":
            self._validate_per_tile()
        for j, op in enumerate(self.operators):
            if isinstance(self.site, LayerSite) and self.site.layer < op.min_layer:
                raise ConfigError(f"{key}.layer", f"operator {op.op_name!r} ({key}.operators.{j}) needs the decoder "
                                  f"layer before its site, so layer must be >= {op.min_layer}; got {self.site.layer}")
        if kv:
            self._validate_kv()

    def _validate_per_tile(self) -> None:
        if isinstance(self.site, KVCacheSite):
            raise ConfigError(f"{self.key}.budget", f"per-tile budgets split a prefill's visual tokens by tile; "
                              f"this stage's site is {self.layer!r}; allowed here: per_image")
        for j, op in enumerate(self.operators):
            if getattr(op, "selects", False):
                raise ConfigError(f"{self.key}.budget", f"per_tile splits the selector's budget, and merger "
                                  f"{op.op_name!r} ({self.key}.operators.{j}) chooses its own tokens; allowed here: "
                                  "per_image")

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
        sel = self.selector
        if self.cache.budget == "adaptive" and not (isinstance(sel, Selector) and sel.takes_counts):
            takers = [n for n, c in registered_operators().items() if issubclass(c, Selector) and c.takes_counts]
            raise ConfigError(f"{self.key}.cache.budget", "adaptive budgets re-share the selector's budget across "
                              f"layers as per-sample counts; this stage's selector is {sel.op_name!r}, which takes "
                              f"none (selectors that do: {', '.join(takers)})")

    def check_depth(self, num_layers: int) -> None:
        """Raise :class:`ConfigError` if the stage's site or cache layers do not exist in an LLM of ``num_layers``."""
        self.site.check_depth(num_layers, f"{self.key}.layer")
        if self.cache is not None:
            self.cache.layer_list(num_layers, f"{self.key}.cache")
            sl = self.cache.decode.score_layer
            if sl is not None and sl >= num_layers:
                raise ConfigError(f"{self.key}.cache.decode.score_layer", f"{sl} is beyond the model's depth: it has "
                                  f"{num_layers} decoder layers")

    def score(self, state: TokenState,
              clock: Callable[[int, TokenOperator], AbstractContextManager] | None = None) -> TokenState:
        """Run the shifts and scorers only (a kv_cache stage runs them inside the prefill); ``clock`` as in
        :meth:`forward`."""
        return self._run_part(state, ("shift", "scorer"), clock)

    def select(self, state: TokenState, counts: torch.Tensor | None = None,
               clock: Callable[[int, TokenOperator], AbstractContextManager] | None = None) -> TokenState:
        """Run the selector and merger on a scored state (a kv_cache stage runs them once the prefill is done);
        ``counts`` (B,), when given, is how many visual tokens each sample keeps (the selector must take counts:
        :attr:`Selector.takes_counts`); ``clock`` as in :meth:`forward`."""
        return self._run_part(state, ("selector", "merger", "compactor"), clock, counts)

    def _run_part(self, state: TokenState, kinds: tuple[str, ...], clock, counts: torch.Tensor | None = None
                  ) -> TokenState:
        """The operators of ``kinds``, in order, each inside ``clock(index in the stage, op)`` when given."""
        for i, op in enumerate(self.operators):
            if op.kind not in kinds:
                continue
            with clock(i, op) if clock is not None else nullcontext():
                if counts is not None and op is self.selector:
                    state = op.select_counts(state, counts)
                else:
                    state = op(state)
        return state

    @property
    def merges(self) -> bool:
        """Whether a merger folds dropped tokens into kept ones (a kv_cache stage then writes merged entries)."""
        return any(op.kind == "merger" for op in self.operators)

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
    def needs_frames(self) -> bool:
        """Whether an operator reads the tokens' video frames and cells (``state.frames``, ``state.cells``)."""
        return any(getattr(op, "needs_frames", False) for op in self.operators)

    @property
    def needs_tiles(self) -> bool:
        """Whether the stage's tokens need their tiles (``state.tiles``): per-tile budgets, or an operator that reads
        them or the frames."""
        return self.budget == "per_tile" or self.needs_frames or any(getattr(op, "needs_tiles", False)
                                                                       for op in self.operators)

    @property
    def selector(self) -> TokenOperator:
        """The operator that decides how many tokens survive: the selector, or a selecting merger."""
        return next(op for op in self.operators if op.kind == "selector" or getattr(op, "selects", False))

    def expected_kept(self, num_visual: int, tiles: list[tuple[int, int]] | None = None) -> int:
        """Visual tokens the stage keeps out of ``num_visual`` (analytic FLOPs): the selector's budget plus
        the tokens a merger adds back (VisionZip's contextual tokens, SparseVLM's recycled clusters). With
        ``budget: per_tile``, ``tiles`` lists the (rows, cols) of each tile (the visual tokens outside them are
        kept); without it the image is taken as one tile. Raises NotImplementedError when the count depends on
        the input."""
        sel = self.selector
        if self.budget == "per_tile" and tiles is not None:
            kept = num_visual - sum(r * c for r, c in tiles)
            if kept < 0:  # an earlier stage thinned the tiles: each keeps a share of what that stage left it
                raise NotImplementedError("per-tile budgets over tiles an earlier stage thinned depend on what it left")
            for r, c in tiles:
                kept += sel.expected_kept_in_grid(r, c) if hasattr(sel, "expected_kept_in_grid") else \
                    sel.expected_kept(r * c)
        else:
            kept = sel.expected_kept(num_visual)
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
                if self.budget == "per_tile" and (op.kind == "selector" or
                                                  (op.kind == "scorer" and getattr(op, "needs_grid", False))):
                    state = per_tile(op, state)
                else:
                    state = op(state)
        if state.keep_mask is None:
            raise RuntimeError(f"{self.key}: no selector set keep_mask")
        return state

    def extra_repr(self) -> str:
        return f"layer={self.layer}" + (f", cache={self.cache.as_dict()}" if self.cache is not None else "")


def per_tile(op: TokenOperator, state: TokenState) -> TokenState:
    """Run a selector, or a scorer that reads the grid, on each tile of ``state`` separately (``state.tiles``):
    it sees one tile's visual tokens at a time, with that tile's grid; a scorer's scores are written at the
    tile's tokens, a selector keeps what it keeps of each tile and every visual token outside the tiles."""
    if state.tiles is None:
        raise RuntimeError("a per_tile stage's tokens carry no tiles (the runtime sets state.tiles)")
    visual = state.visual_mask
    keep = ~visual | (state.tiles < 0)
    delta: torch.Tensor | None = None
    named: dict[str, torch.Tensor] = {}
    most = max((len(g) for g in state.tile_grids or []), default=0)
    for t in range(most):
        group = visual & (state.tiles == t)
        if not bool(group.any()):
            continue
        present = group.any(dim=1).tolist()
        grids = [g[t] if t < len(g) and present[b] else None for b, g in enumerate(state.tile_grids)]
        sub = dataclasses.replace(state, visual_mask=group, grid=grids)
        sub.signals = state.signals
        if op.kind == "scorer":
            sub.scores, sub.named_scores = None, {}
            sub = op(sub)
            if sub.scores is not None:
                d = torch.where(group, sub.scores, 0.0)
                delta = d if delta is None else delta + d
            for name, sc in sub.named_scores.items():
                d = torch.where(group, sc, 0.0)
                named[name] = named[name] + d if name in named else d
        else:
            keep |= op(sub).keep_mask & group
    if op.kind == "selector":
        state.keep_mask = keep
        return state
    if delta is not None:
        state.add_scores(delta)
    for name, d in named.items():
        state.add_scores(d, into=name)
    return state
