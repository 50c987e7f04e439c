"""KV compactors: what the KV cache keeps once a stage has pruned."""

from __future__ import annotations

from dataclasses import dataclass

from tokenprune.core.operator import Compactor, ParamError
from tokenprune.core.registry import register_operator
from tokenprune.core.state import TokenState


@register_operator("kv_compact")
class KVCompact(Compactor):
    """Trim the KV cache of the layers before the site to the kept tokens too.

    Layers at and after the site only ever cache the kept tokens. With ``earlier_layers: true``
    the layers before the site drop the pruned tokens' keys and values once the prefill has passed
    the site, so every decoding step reads a smaller cache (FastV's KV-cache variant). The prefill
    itself is unchanged; decoding then no longer sees the pruned tokens at any layer.

    ``from_layer: L`` leaves the caches of layers below L whole (MustDrop's output-aware cache policy trims the
    layers from its first pruning layer on and keeps the first ones' caches).
    """

    @dataclass
    class Params:
        earlier_layers: bool = True
        from_layer: int = 0  # the first layer whose cache is trimmed

        def __post_init__(self) -> None:
            if self.from_layer < 0:
                raise ParamError("from_layer", f"a decoder layer >= 0, got {self.from_layer}")

    def forward(self, state: TokenState) -> TokenState:
        state.compact_kv_before_site = self.params.earlier_layers
        state.compact_kv_from = self.params.from_layer
        return state
