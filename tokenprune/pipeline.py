"""``Stage`` and ``Pipeline``: operators grouped by site, built from YAML, attached to a model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from tokenprune.config import (
    CROSS_ATTENTION,
    KV_CACHE,
    apply_overrides,
    import_plugins,
    load_source,
    validate_pipeline_config,
)
from tokenprune.errors import ConfigError
from tokenprune.kv_cache import CacheSettings
from tokenprune.operator import KINDS, TokenOperator
from tokenprune.registry import build_operator
from tokenprune.state import TokenState

if TYPE_CHECKING:
    from tokenprune.attach import AttachedPipeline

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
    :class:`~tokenprune.kv_cache.CacheSettings` of a ``kv_cache`` stage.
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

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("stage", "layer", "tokens_before", "tokens_after",
                                              "visual_before", "visual_after", "kept", "operator_ms", "site", "step")}


class Pipeline(nn.Module):
    """A list of stages built from a YAML config; ``with pipeline.attach(model): ...`` runs it.

    After a forward, :attr:`trace` holds one :class:`StageTrace` per stage that ran.
    """

    def __init__(self, stages: Iterable[Stage], name: str = "pipeline", config: DictConfig | None = None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.name = name
        self.config = config
        self.trace: list[StageTrace] = []
        self.runs: list[int] = [0] * len(self.stages)
        #: time each operator of a stage on its own (``StageTrace.operator_ms_by_op``); on a GPU this
        #: synchronises between operators, so it is off unless asked for (``tokenprune bench`` turns it on)
        self.time_operators = False

    def attach(self, model: nn.Module, guide: nn.Module | None = None) -> AttachedPipeline:
        """Install the pipeline's hooks on ``model`` for the duration of a ``with`` block.

        ``guide``: a small VLM that tokenises images like ``model``, for the ``guide_model`` scorer (SGL).
        """
        from tokenprune.attach import AttachedPipeline

        return AttachedPipeline(self, model, guide=guide)

    def validate_for_depth(self, num_layers: int) -> None:
        """Check every site against a model with ``num_layers`` decoder layers."""
        for i, stage in enumerate(self.stages):
            if stage.cross_attention:
                continue
            if stage.kv_cache:
                stage.cache.layer_list(num_layers, f"stages.{i}.cache")
                sl = stage.cache.decode.score_layer
                if sl is not None and sl >= num_layers:
                    raise ConfigError(f"stages.{i}.cache.decode.score_layer", f"{sl} is beyond the model's depth: "
                                      f"it has {num_layers} decoder layers")
                continue
            if stage.layer >= num_layers:
                raise ConfigError(f"stages.{i}.layer", f"{stage.layer} is beyond the model's depth: "
                                  f"it has {num_layers} decoder layers, so layer must be in 0..{num_layers - 1}")

    def report(self) -> str:
        """Per-stage kept counts of the last prefill, one line per stage."""
        if not self.trace:
            return f"{self.name}: no stage has run"
        lines = []
        for t in self.trace:
            where = {"prefill": f"layer {t.layer}", "kv_cache": f"layer {t.layer}'s KV cache",
                     "decode": f"layer {t.layer}'s KV cache, decoding step {t.step}"}[t.site]
            lines.append(f"stage {t.stage} ({where}): visual tokens {t.visual_before} -> {t.visual_after}, "
                         f"tokens {t.tokens_before} -> {t.tokens_after}")
        return "\n".join(lines)


def build_pipeline(cfg: DictConfig) -> Pipeline:
    """Validate a pipeline config and build its operators."""
    import_plugins(cfg.get("plugins"))
    stages = []
    for i, raw in enumerate(validate_pipeline_config(cfg)):
        ops = []
        for j, op_cfg in enumerate(raw["operators"]):
            params = {k: v for k, v in op_cfg.items() if k != "op"}
            op = build_operator(op_cfg["op"], _key=f"stages.{i}.operators.{j}.op", **params)
            if raw["layer"] not in (CROSS_ATTENTION, KV_CACHE) and raw["layer"] < op.min_layer:
                raise ConfigError(f"stages.{i}.layer", f"operator {op.op_name!r} (stages.{i}.operators.{j}) needs the "
                                  f"decoder layer before its site, so layer must be >= {op.min_layer}; got {raw['layer']}")
            ops.append(op)
        stages.append(Stage(raw["layer"], ops, key=f"stages.{i}", positions=raw.get("positions", "keep"),
                            protect=raw.get("protect", ()), cache=raw.get("cache")))
    return Pipeline(stages, name=str(cfg.get("name", "pipeline")), config=cfg)


def resolve_pipeline_config(source: str | Path | Mapping | DictConfig, overrides: Iterable[str] = ()) -> DictConfig:
    """The config of ``source`` with ``overrides`` applied, validated and with operator defaults filled in."""
    cfg = apply_overrides(load_source(source), overrides)
    pipeline = build_pipeline(cfg)
    resolved = {"name": pipeline.name}
    if cfg.get("plugins"):
        resolved["plugins"] = list(cfg.plugins)
    resolved["stages"] = [
        {"layer": s.layer, "positions": s.positions, **({"protect": list(s.protect)} if s.protect else {}),
         **({"cache": s.cache.as_dict()} if s.cache is not None else {}),
         "operators": [{"op": op.op_name, **OmegaConf.to_container(OmegaConf.structured(op.params))}
                                         for op in s.operators]}
        for s in pipeline.stages
    ]
    return OmegaConf.create(resolved)


def load_pipeline(source: str | Path | Mapping | DictConfig, overrides: Iterable[str] = ()) -> Pipeline:
    """Build a :class:`Pipeline` from a preset name, a YAML path, a dict or a DictConfig.

    >>> pipe = load_pipeline("fastv", ["stages.0.operators.1.keep=0.25"])
    """
    cfg = apply_overrides(load_source(source), overrides)
    return build_pipeline(cfg)

