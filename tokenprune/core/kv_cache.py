"""The ``kv_cache`` site: compress each decoder layer's cached visual keys/values after the prefill.

A second family of methods keeps the prefill whole and shrinks the visual part of the KV cache
afterwards, layer by layer, so that decoding reads less and longer contexts fit (AirCache,
Cross-Self Pruning, Elastic Cache; MINT re-prunes while decoding). A ``kv_cache`` stage expresses
them with the ordinary operators:

- **scoring** runs inside the prefill, in the pre-hook of every compressed layer, on the tokens
  that layer is about to cache, with that layer's *own* attention recomputed for the query rows
  the scorers ask for (:class:`~tokenprune.runtime.sources.LayerAttentionSource` at the layer itself);
- **selection and merging** run once the prefill has finished, per layer, on a state whose
  ``hidden`` is the cached ``[keys | values]`` of each token (heads concatenated) and whose
  ``features("keys")`` are the cached keys, so a merger averages cache entries;
- the layer's cache is then cut to the kept entries (merged ones rewritten), and decoding goes on
  through stock ``generate()``: the layer's mask keeps only the columns of what it still holds.

Stage settings (the ``cache`` key of the stage; :class:`CacheSettings`): which layers, uniform or
adaptive per-layer budgets (:func:`adaptive_weights`, :func:`allocate`), and decoding-time re-pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenprune.core.budget import check_keep, resolve_keep
from tokenprune.core.errors import ConfigError
from tokenprune.core.operator import ParamError

BUDGETS = ("uniform", "adaptive")


#: What a decoding-time re-pruning does with the entries it does not choose.
DECODE_MODES = ("evict", "mask")
#: What a decoding-time re-pruning chooses by: the current token's exact attention, or the stage's own scorers.
DECODE_SCORERS = ("attention", "stage")


@dataclass
class DecodeSettings:
    """Re-score and re-prune the held visual entries at chosen decoding steps (MINT, DyCoke).

    ``steps``: decoding steps (1 = the first forward after the prefill), or ``all``, at which every compressed layer
    keeps the ``keep`` (fraction of what it holds, or a count) visual entries that the current token attends to
    most — at its own layer, or at ``score_layer`` for all of them (MINT reads one shallow layer; the score layer
    need not be compressed itself). ``mode``: ``evict`` cuts the others from the cache for good (MINT); ``mask``
    keeps every entry and hides the others until the next re-pruning step chooses again, so an entry hidden at one
    step can return at a later one (DyCoke's dynamic pruning). ``scorer``: ``attention`` ranks the entries by the
    attention the current token pays them (known only as the step runs: MINT, DyCoke); ``stage`` ranks them with
    the stage's own scorers before the step attends, fed by the layer's attention history — the prompt's last rows,
    then each decoded token's exact attention over every entry the layer holds — so a scorer that predicts the next
    step's attention (AttentionPredictor) chooses what the step may see. ``history``: the rows it keeps (null: the
    stage's scorers' largest ``history`` parameter, 1 without one).
    """

    steps: list[int] | str = field(default_factory=list)
    keep: float | int = 0.5
    score_layer: int | None = None
    mode: str = "evict"
    scorer: str = "attention"
    history: int | None = None

    def at(self, step: int) -> bool:
        """Whether decoding step ``step`` re-prunes."""
        return self.steps == "all" or step in self.steps


@dataclass
class CacheSettings:
    """The ``cache`` key of a ``kv_cache`` stage.

    ``layers``: ``all``, ``{from: L}`` (layers L and after) or a list of decoder layers whose caches are
    compressed. ``budget``:
    ``uniform`` gives every layer the selector's budget; ``adaptive`` keeps the same total
    (layers × the selector's ``keep``) but shares it out by :func:`adaptive_weights` (AirCache; needs a
    ``topk`` selector). ``decode``: see :class:`DecodeSettings`.
    """

    layers: str | list[int] = "all"
    budget: str = "uniform"
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    #: with ``layers: all``, the first compressed layer (``{from: L}``)
    first: int = 0

    @classmethod
    def parse(cls, raw: Any, key: str) -> CacheSettings:
        """Settings from the YAML mapping at ``key`` (None: defaults); errors name the key."""

        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(key, f"must be a mapping with keys layers, budget, decode; got {raw!r}")
        unknown = set(raw) - {"layers", "budget", "decode"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown cache key; allowed: layers, budget, decode")
        layers = raw.get("layers", "all")
        first = 0
        if isinstance(layers, dict):
            start = layers.get("from")
            if set(layers) != {"from"} or isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise ConfigError(f"{key}.layers", f"a mapping must be {{from: L}} with L a decoder layer (integer "
                                  f">= 0), got {layers!r}")
            layers, first = "all", start
        if layers != "all" and not (isinstance(layers, list) and layers and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)):
            raise ConfigError(f"{key}.layers", f"must be 'all', {{from: L}} or a non-empty list of decoder layers "
                              f"(integers >= 0), got {layers!r}")
        if isinstance(layers, list):
            layers = sorted(set(layers))
        budget = raw.get("budget", "uniform")
        if budget not in BUDGETS:
            raise ConfigError(f"{key}.budget", f"got {budget!r}; allowed: {', '.join(BUDGETS)}")
        dec = raw.get("decode") or {}
        if not isinstance(dec, dict) or set(dec) - {"steps", "keep", "score_layer", "mode", "scorer", "history"}:
            raise ConfigError(f"{key}.decode", f"must be a mapping with keys steps, keep, score_layer, mode, scorer, "
                              f"history; got {dec!r}")
        steps = dec.get("steps", [])
        if steps != "all" and (not isinstance(steps, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps)):
            raise ConfigError(f"{key}.decode.steps", f"must be 'all' or a list of decoding steps >= 1 (1 = the first "
                              f"token after the prefill), got {steps!r}")
        mode = dec.get("mode", "evict")
        if mode not in DECODE_MODES:
            raise ConfigError(f"{key}.decode.mode", f"got {mode!r}; allowed: {', '.join(DECODE_MODES)}")
        keep = dec.get("keep", 0.5)
        try:
            check_keep(keep)
        except ParamError as e:
            raise ConfigError(f"{key}.decode.keep", f"{e}; got {keep!r}") from None
        score_layer = dec.get("score_layer")
        if score_layer is not None and (isinstance(score_layer, bool) or not isinstance(score_layer, int)
                                        or score_layer < 0):
            raise ConfigError(f"{key}.decode.score_layer", f"must be a decoder layer (integer >= 0) or null, "
                              f"got {score_layer!r}")
        scorer = dec.get("scorer", "attention")
        if scorer not in DECODE_SCORERS:
            raise ConfigError(f"{key}.decode.scorer", f"got {scorer!r}; allowed: {', '.join(DECODE_SCORERS)}")
        if scorer == "stage" and score_layer is not None:
            raise ConfigError(f"{key}.decode.score_layer", f"scorer: stage ranks each layer's entries by its own "
                              f"attention history, so score_layer must be null; got {score_layer!r}")
        history = dec.get("history")
        if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 1):
            raise ConfigError(f"{key}.decode.history", f"must be a number of attention rows (integer >= 1) or null, "
                              f"got {history!r}")
        if history is not None and scorer != "stage":
            raise ConfigError(f"{key}.decode.history", f"only scorer: stage keeps an attention history; this stage's "
                              f"decode.scorer is {scorer!r}")
        return cls(layers=layers, budget=budget, first=first,
                   decode=DecodeSettings(steps=steps if steps == "all" else sorted(set(steps)), keep=keep,
                                         score_layer=score_layer, mode=mode, scorer=scorer, history=history))

    def layer_list(self, num_layers: int, key: str = "cache") -> list[int]:
        """The compressed layers of a model with ``num_layers`` decoder layers (checked against its depth)."""
        if self.layers == "all":
            if self.first >= num_layers:
                raise ConfigError(f"{key}.layers", f"from {self.first} is beyond the model's depth: it has "
                                  f"{num_layers} decoder layers, so from must be in 0..{num_layers - 1}")
            return list(range(self.first, num_layers))
        bad = [x for x in self.layers if x >= num_layers]
        if bad:
            raise ConfigError(f"{key}.layers", f"layer {bad[0]} is beyond the model's depth: it has {num_layers} "
                              f"decoder layers, so layers must be in 0..{num_layers - 1}")
        return list(self.layers)

    def as_dict(self) -> dict[str, Any]:
        layers: Any = list(self.layers) if self.layers != "all" else {"from": self.first} if self.first else "all"
        steps = self.decode.steps if self.decode.steps == "all" else list(self.decode.steps)
        return {"layers": layers, "budget": self.budget,
                "decode": {"steps": steps, "keep": self.decode.keep, "score_layer": self.decode.score_layer,
                           "mode": self.decode.mode, "scorer": self.decode.scorer,
                           "history": self.decode.history}}


def adaptive_weights(visual_scores: list[torch.Tensor]) -> torch.Tensor:
    """(L,) budget weights of L layers from each layer's importance scores of its visual entries (one sample).

    Our reading of AirCache (Huang et al., "AirCache: Activating Inter-modal Relevancy KV Cache
    Compression for Efficient Large Vision-Language Model Inference", ICCV 2025), whose abstract
    shares the budget by the *strength* and *skewness* of each layer's importance distribution:

    - strength ``s_l`` = the layer's total importance on its visual entries (for attention scores: the
      attention mass the observation window puts on the image), so layers that look at the image more
      get more of it;
    - skewness ``g_l`` = the third standardised moment of those scores; a right-skewed distribution
      means a few entries carry the layer's importance, so fewer need to stay.

    ``w_l = s_l / (1 + max(g_l, 0))``. A layer whose scores are all equal has skewness 0.
    """
    w = []
    for v in visual_scores:
        v = v.double().flatten()
        if v.numel() == 0:
            w.append(0.0)
            continue
        strength = float(v.clamp_min(0).sum())
        std = float(v.std(unbiased=False))
        skew = float(((v - v.mean()) ** 3).mean() / std ** 3) if std > 1e-12 else 0.0
        w.append(strength / (1.0 + max(skew, 0.0)))
    return torch.tensor(w, dtype=torch.float64)


def allocate(weights: torch.Tensor, total: int, caps: list[int], floor: int = 1) -> list[int]:
    """Integer budgets, one per layer, proportional to ``weights``, layer l's in [floor, caps[l]], summing to
    ``total`` (clamped to what the bounds allow).

    Shares are found by water-filling (a layer whose share leaves its bounds is fixed at the bound and
    the rest re-shared) and rounded by largest remainders, so the sum is exact. All-zero weights share
    equally.
    """
    n = weights.numel()
    if n == 0:
        return []
    cap = torch.tensor(caps, dtype=torch.float64)
    low = torch.minimum(torch.full_like(cap, float(floor)), cap)
    total = int(max(float(low.sum()), min(float(cap.sum()), float(total))))
    w = weights.double().clamp_min(0)
    if float(w.sum()) <= 0:
        w = torch.ones(n, dtype=torch.float64)
    share = torch.zeros(n, dtype=torch.float64)
    free = torch.ones(n, dtype=torch.bool)
    left = float(total)
    for _ in range(n + 1):  # water-filling: fix the layers that leave their bounds, re-share the rest
        if not bool(free.any()):
            break
        ws = w[free]
        share[free] = ws / ws.sum() * left if float(ws.sum()) > 0 else torch.full_like(ws, left / int(free.sum()))
        over, under = free & (share > cap), free & (share < low)
        if not bool(over.any() or under.any()):
            break
        share[over], share[under] = cap[over], low[under]
        free &= ~(over | under)
        left = total - float(share[~free].sum())
    base = torch.minimum(torch.maximum(share.floor(), low), cap).long()
    rest = total - int(base.sum())
    order = torch.argsort(-(share - share.floor()), stable=True).tolist()
    for _ in range(2):  # by largest remainder first, then wherever a bound still allows
        for i in order:
            if rest == 0:
                break
            step = 1 if rest > 0 else -1
            if float(low[i]) <= int(base[i]) + step <= float(cap[i]):
                base[i] += step
                rest -= step
    return base.tolist()


def uniform_total(keep: float | int, num_visual: int, num_layers: int) -> int:
    """The adaptive budget's total: what a uniform ``keep`` would keep over ``num_layers`` layers."""

    return resolve_keep(keep, num_visual) * num_layers


def kv_entry_bytes(keys: torch.Tensor) -> int:
    """Bytes of one cached token's keys and values for one sample at one layer ((B, H_kv, T, hd) keys)."""
    return int(2 * keys.shape[1] * keys.shape[3] * keys.element_size())


def flatten_entries(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, T, 2·H_kv·hd): each cached token's keys then values, heads concatenated."""
    b, h, t, d = keys.shape
    return torch.cat([keys.transpose(1, 2).reshape(b, t, h * d), values.transpose(1, 2).reshape(b, t, h * d)], dim=-1)


def unflatten_entries(flat: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`flatten_entries`: (keys, values), each (B, H_kv, T, hd)."""
    b, t, _ = flat.shape
    half = heads * head_dim
    k = flat[..., :half].reshape(b, t, heads, head_dim).transpose(1, 2)
    v = flat[..., half:].reshape(b, t, heads, head_dim).transpose(1, 2)
    return k.contiguous(), v.contiguous()
