"""Memory: bytes a KV cache holds, the prompt's KV bytes per sample, peak resident memory."""

from __future__ import annotations

import resource
import sys

import torch


def cache_bytes(cache) -> int:
    """Bytes of the keys and values a KV cache holds (every layer; padding slots included)."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for kv in cache:  # legacy tuples
        total += sum(t.numel() * t.element_size() for t in kv if isinstance(t, torch.Tensor))
    return total


def prompt_kv_bytes(per_layer_tokens: list[int], trace, pipeline, sample: int, shape, dtype_bytes: int) -> int:
    """Bytes of one sample's prompt keys and values after the prefill: the tokens each layer holds (what entered
    it; a ``kv_compact`` stage also trims the layers before its site (from its ``from_layer``) to its kept tokens; a ``kv_cache`` stage
    cuts each layer it compresses) times 2 x KV heads x head dim x the element size. Padding and the filler
    slots of ragged batches are not counted; decoding-time re-pruning (later) is not either."""
    held = list(per_layer_tokens)
    for t in trace:
        if t.site == "kv_cache":
            held[t.layer] = min(held[t.layer], t.tokens_after[sample])
            continue
        if t.site != "prefill":
            continue
        stage = pipeline.stages[t.stage]
        for op in stage.operators:
            if getattr(op, "kind", None) == "compactor" and getattr(op.params, "earlier_layers", False):
                for layer in range(getattr(op.params, "from_layer", 0), min(t.layer, len(held))):
                    held[layer] = min(held[layer], t.tokens_after[sample])
    return int(sum(held) * 2 * shape.kv_heads * shape.head_dim * dtype_bytes)


def peak_rss() -> int:
    """Peak resident memory of this process, bytes."""

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
