"""KV compactors: what the KV cache keeps once a stage has pruned."""

from __future__ import annotations

from dataclasses import dataclass

from tokenprune.core.operator import Compactor
from tokenprune.core.registry import register_operator
from tokenprune.core.state import TokenState


@register_operator("kv_compact")
class KVCompact(Compactor):
    """Trim the KV cache of the layers before the site to the kept tokens too.

    Layers at and after the site only ever cache the kept tokens. With ``earlier_layers: true``
    the layers before the site drop the pruned tokens' keys and values once the prefill has passed
    the site, so every decoding step reads a smaller cache (FastV's KV-cache variant). The prefill
    itself is unchanged; decoding then no longer sees the pruned tokens at any layer.
    """

    @dataclass
    class Params:
        earlier_layers: bool = True

    def forward(self, state: TokenState) -> TokenState:
        state.compact_kv_before_site = self.params.earlier_layers
        return state
