"""Sites: where a stage runs. A stage's ``layer`` key names one; each kind has one runtime
(:mod:`tokenprune.runtime`).

- :class:`LayerSite` — before decoder layer ``L`` of the LLM (``L = 0``: before the LLM, on the
  projected visual tokens); the tokens that survive flow on through every later layer.
- :class:`CrossAttentionSite` — the image features every cross-attention layer reads (Mllama).
- :class:`KVCacheSite` — each named layer's KV cache after the prefill (and, with ``decode``
  settings, again while decoding); the prefill itself runs whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokenprune.core.errors import ConfigError

#: The ``layer`` value of the cross-attention site.
CROSS_ATTENTION = "cross_attention"
#: The ``layer`` value of the KV-cache site.
KV_CACHE = "kv_cache"


@dataclass(frozen=True)
class Site:
    """Base of the site kinds."""

    #: ``prefill`` (tokens flow on), ``cross_attention`` or ``kv_cache``: the kind, for traces and messages.
    kind: ClassVar[str] = ""

    @property
    def value(self) -> int | str:
        """The site as the YAML ``layer`` key writes it."""
        raise NotImplementedError

    @property
    def decoder_layer(self) -> int | None:
        """The decoder layer whose input the site prunes, or None when it does not prune the token stream."""
        return None

    def check_depth(self, num_layers: int, key: str) -> None:
        """Raise :class:`ConfigError` (under ``key``) if the site does not exist in an LLM of ``num_layers``."""

    def __str__(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class LayerSite(Site):
    """Before decoder layer ``layer`` (0: before the LLM)."""

    layer: int
    kind: ClassVar[str] = "prefill"

    @property
    def value(self) -> int:
        return self.layer

    @property
    def decoder_layer(self) -> int:
        return self.layer

    def check_depth(self, num_layers: int, key: str) -> None:
        if self.layer >= num_layers:
            raise ConfigError(key, f"{self.layer} is beyond the model's depth: it has {num_layers} decoder layers, "
                              f"so layer must be in 0..{num_layers - 1}")


@dataclass(frozen=True)
class CrossAttentionSite(Site):
    """The image features of a cross-attention model's cross-attention layers (Mllama)."""

    kind: ClassVar[str] = "cross_attention"

    @property
    def value(self) -> str:
        return CROSS_ATTENTION


@dataclass(frozen=True)
class KVCacheSite(Site):
    """Each layer's cached visual keys and values after the prefill (the layers are the stage's ``cache``)."""

    kind: ClassVar[str] = "kv_cache"

    @property
    def value(self) -> str:
        return KV_CACHE


def site_of(layer: Any, key: str = "layer") -> Site:
    """The site a ``layer`` value names: a decoder layer index >= 0, ``cross_attention`` or ``kv_cache``."""
    if isinstance(layer, Site):
        return layer
    if layer == CROSS_ATTENTION:
        return CrossAttentionSite()
    if layer == KV_CACHE:
        return KVCacheSite()
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ConfigError(key, f"must be an integer >= 0 (0 = before the LLM), '{CROSS_ATTENTION}' (the image "
                          f"features of a cross-attention model) or '{KV_CACHE}' (each layer's KV cache after the "
                          f"prefill), got {layer!r}")
    return LayerSite(layer)
