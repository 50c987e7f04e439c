"""The operator base classes: one small ``nn.Module`` per idea, talking only through ``TokenState``."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from tokenprune.core.errors import ConfigError
from tokenprune.core.state import AttentionContext, TokenState
from tokenprune.core.values import given as given_text

#: The operator kinds, in the order a stage must list them: shift* → scorer* → selector (or a selecting merger) → merger? → compactor?
KINDS: tuple[str, ...] = ("shift", "scorer", "selector", "merger", "compactor")


class ParamError(ValueError):
    """Raised from a parameter dataclass's ``__post_init__``; names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


@dataclass
class NoParams:
    """An operator without parameters."""


class TokenOperator(nn.Module):
    """Base of every operator.

    Subclasses set ``kind`` (one of :data:`KINDS`), a nested ``Params`` dataclass (the typed
    parameters, which double as the operator's OmegaConf schema), and implement
    ``forward(state) -> state``. They never touch the model: everything they read comes from the
    :class:`~tokenprune.core.state.TokenState` and its lazy signals.
    """

    kind: ClassVar[str] = ""
    op_name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    #: True for operators that read vision-tower signals (CLS attention, vision keys).
    needs_vision: ClassVar[bool] = False
    #: True for operators that read a guide model's attention (attach with ``guide=``).
    needs_guide: ClassVar[bool] = False
    #: True for operators that lay each sample's visual tokens out as one raster grid (rows x cols).
    needs_grid: ClassVar[bool] = False
    #: True for operators that read the video structure of the tokens (``state.frames``, ``state.cells``).
    needs_frames: ClassVar[bool] = False
    #: True for operators that read each token's tile (``state.tiles``, ``state.tile_grids``) in any stage.
    needs_tiles: ClassVar[bool] = False
    #: Smallest decoder-layer site this operator can run at (1 for scorers that need the previous layer).
    min_layer: ClassVar[int] = 0

    def __init__(self, params: Any = None, key: str | None = None):
        super().__init__()
        self.params = params if params is not None else self.Params()
        #: the operator's key path in its pipeline (``stages.0.operators.1``), for messages
        self.config_key = key or self.op_name

    @property
    def reads_attention_layer(self) -> bool:
        """Whether the operator reads the attention (queries, keys) of the layer before its site — a model whose
        layer there has none (a linear-attention layer) cannot run it. By default: what needs that layer does."""
        return self.min_layer >= 1

    def forward(self, state: TokenState) -> TokenState:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, state: TokenState) -> TokenState:
        # a named range in torch.profiler traces (``tokenprune.<op>``), so an operator's kernels can be told apart
        with torch.profiler.record_function(f"tokenprune.{self.op_name or type(self).__name__}"):
            return super().__call__(state)

    @classmethod
    def parse_params(cls, raw: Mapping[str, Any] | None, key: str | None = None) -> Any:
        """Validate ``raw`` against ``Params`` and return the dataclass instance.

        Errors name the key path (``key.field``), the value given and what is allowed.
        """
        raw = dict(raw or {})
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}

        def where(f: str) -> str:
            return f"{key}.{f}" if key else f

        for name in raw:
            if name not in fields:
                close = difflib.get_close_matches(name, list(fields), n=2, cutoff=0.5)
                hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
                allowed = ", ".join(fields) if fields else "none"
                raise ConfigError(where(name), f"unknown parameter of operator {cls.op_name!r}{hint}; allowed: {allowed}")
        hints = typing.get_type_hints(cls.Params)
        for name, value in raw.items():
            if isinstance(value, bool) and hints.get(name) not in (bool, Any):
                raise ConfigError(where(name), f"expected {_type_name(hints.get(name))}, got boolean {value!r}")
            if isinstance(value, str) and _scalar_only(hints.get(name)):  # OmegaConf would read 'yes' as true
                raise ConfigError(where(name), f"expected {_type_name(hints.get(name))}, got {given_text(value)}")
        try:
            schema = OmegaConf.structured(cls.Params)
            merged = OmegaConf.merge(schema, raw)
            return OmegaConf.to_object(merged)
        except ParamError as e:
            raise ConfigError(where(e.field), f"{e} (given {raw.get(e.field)!r})") from None
        except OmegaConfBaseException as e:
            field = getattr(e, "full_key", None) or ""
            given = raw.get(field.split(".")[0], None) if field else None
            expected = _type_name(hints.get(field)) if field in hints else "a valid value"
            shown = given_text(given) if field else str(e).splitlines()[0]
            raise ConfigError(where(field) if field else key, f"expected {expected}, got {shown}") from None

    @classmethod
    def param_table(cls) -> list[tuple[str, str, Any]]:
        """(name, type, default) of each parameter, for ``tokenprune ops`` and the docs."""
        hints = typing.get_type_hints(cls.Params)
        rows = []
        for f in dataclasses.fields(cls.Params):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
            rows.append((f.name, _type_name(hints.get(f.name)), default))
        return rows

    @classmethod
    def summary(cls) -> str:
        """First line of the docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.params).items())


def _scalar_only(hint: Any) -> bool:
    """A parameter whose type is numbers or booleans only (no string is a valid value)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    args = tuple(a for a in args if a is not type(None))
    return bool(args) and all(a in (int, float, bool) for a in args)


def _type_name(tp: Any) -> str:
    if tp is None:
        return "any"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


# --- the kinds -------------------------------------------------------------------------------


@dataclass
class ScorerParams:
    weight: float = 1.0  # several scorers in one stage are summed with these weights
    into: str = ""  # "" adds to the stage's scores; a name keeps a separate score set (a selector's scores: NAME)


#: Values of a ``features`` parameter (see :meth:`tokenprune.core.state.Signals.features`).
FeatureKind = Literal["hidden", "keys", "vision_keys"]


class FeatureUser:
    """Mixin for operators with a ``features`` parameter: what they need follows from it (``keys``: the
    layer before the site; ``vision_keys``: the vision tower)."""

    @property
    def min_layer(self) -> int:  # type: ignore[override]
        return 1 if self.params.features == "keys" else 0

    @property
    def needs_vision(self) -> bool:  # type: ignore[override]
        return self.params.features == "vision_keys"


class Scorer(TokenOperator):
    """Base of scorers: ``score(state) -> (B, N)``; higher means more worth keeping.

    The shared part lives here once: the score is multiplied by ``weight`` and added to
    ``state.scores`` so that several scorers in one stage combine. A scorer with ``weight: 0`` is not
    computed at all (zeros are added), so weighting one out in an ablation also removes its cost.
    """

    kind = "scorer"
    Params = ScorerParams

    def score(self, state: TokenState) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, state: TokenState) -> TokenState:
        if self.params.weight == 0:  # weighted out (an ablation): contributes nothing, so compute nothing
            s = torch.zeros(state.visual_mask.shape, dtype=torch.float32, device=state.visual_mask.device)
        else:
            s = self.score(state).float()
        if s.shape != state.visual_mask.shape:
            raise RuntimeError(f"{self.op_name}: score shape {tuple(s.shape)} != tokens {tuple(state.visual_mask.shape)}")
        state.add_scores(s, self.params.weight, self.params.into)
        return state


class Selector(TokenOperator):
    """Base of selectors: ``select(state) -> (B, N)`` bool mask of the tokens to keep.

    Non-visual tokens are always kept; selectors choose among the visual tokens of each sample.
    """

    kind = "selector"
    #: False for selectors that ignore scores (a uniform grid): the stage then needs no scorer.
    needs_scores: ClassVar[bool] = True
    #: True for selectors whose budget is a per-sample count that can be set from outside
    #: (:meth:`select_counts`): a kv_cache stage's adaptive budgets share it out across layers.
    takes_counts: ClassVar[bool] = False

    def select(self, state: TokenState) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def expected_kept(self, num_visual: int) -> int:
        """Visual tokens this selector keeps out of ``num_visual`` (for analytic FLOPs)."""
        raise NotImplementedError(f"{self.op_name} has no analytic budget")

    def ranking(self, state: TokenState) -> torch.Tensor:
        """(B, N) the scores this selector ranks tokens by (selectors that take counts)."""
        raise NotImplementedError(f"{self.op_name} does not rank by one score")

    def select_counts(self, state: TokenState, counts: torch.Tensor) -> TokenState:
        """Keep the ``counts[b]`` best visual tokens of each sample by :meth:`ranking` (selectors that take
        counts; the runtime's adaptive budgets set them)."""
        raise NotImplementedError(f"{self.op_name} takes no per-sample counts")

    def forward(self, state: TokenState) -> TokenState:
        if self.needs_scores and state.scores is None and not state.named_scores:
            raise RuntimeError(f"selector {self.op_name!r} ran before any scorer")
        state.keep_mask = self.select(state)
        return state


class Merger(TokenOperator):
    """Base of mergers: fold dropped tokens into kept ones before the drop.

    A merger rewrites ``state.hidden`` (and ``state.sizes``) of the kept tokens; the stage then
    drops the rest. A merger with ``selects = True`` chooses the surviving tokens itself (ToMe's
    matching) and stands in a stage without scorer or selector.
    """

    kind = "merger"
    selects: ClassVar[bool] = False

    def expected_kept(self, num_visual: int) -> int:
        """Visual tokens a selecting merger keeps out of ``num_visual`` (for analytic FLOPs)."""
        raise NotImplementedError(f"{self.op_name} has no analytic budget")

    def added_tokens(self, num_visual: int, kept: int) -> int:
        """Visual tokens this merger keeps on top of the selector's ``kept`` (merged into new ones); 0 by default."""
        return 0


class Compactor(TokenOperator):
    """Base of KV compactors: decide what the KV cache keeps after the stage."""

    kind = "compactor"


class Shift(TokenOperator):
    """Base of attention-shift corrections: change how attention-based scores are computed.

    A shift does not score: it registers itself on the state, and every attention signal the
    stage's scorers ask for afterwards is computed through it. A subclass may score with q/k before
    the rotary embedding (``rotary = False``), add a bias to the logits and change the mask before they are
    computed (:meth:`logit_bias`: the bias then rides in the q·kᵀ product), change the logits or the mask
    after (:meth:`adjust_logits`) or the probabilities after the softmax (:meth:`adjust_probs`). Several
    shifts compose in the order listed.
    """

    kind = "shift"
    #: False: attention logits are taken before the rotary embedding.
    rotary: ClassVar[bool] = True

    def logit_bias(self, ctx: AttentionContext) -> torch.Tensor | None:
        """An additive (H, Q, N) bias for the logits of ``ctx.rows``, asked for before they are computed
        (``ctx.logits`` is None); it may also replace ``ctx.allowed``. Return a tensor of its own: the caller
        writes the mask and the logits into it. None: no bias."""
        return None

    def adjust_logits(self, ctx: AttentionContext) -> None:
        """Change ``ctx.logits`` (H, Q, N) / ``ctx.allowed`` (Q, N); see :class:`AttentionContext`.

        Replace ``ctx.logits`` with a new tensor (``ctx.logits = ctx.logits - bias``): it may be a view of the
        stage's cached logits, which other scorers read. Only once ``ctx.owned`` is True (a shift made it) may it
        be written in place; a shift that hands over a tensor of its own sets ``ctx.owned = True``. Replace
        ``ctx.allowed`` too, never change it in place (a replaced mask is applied again before the softmax)."""

    def adjust_probs(self, ctx: AttentionContext) -> None:
        """Change ``ctx.probs`` (H, Q, N) in place."""

    def cache_key(self) -> tuple:
        return (self.op_name, tuple(sorted(dataclasses.asdict(self.params).items())))

    def forward(self, state: TokenState) -> TokenState:
        state.shifts.append(self)
        return state
