"""The adapter interface, and the parts shared by decoder-only LVLMs with a Llama-style LLM."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from tokenprune.masks import expand_batch, gather_tokens


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the two halves of the head dimension (Su et al., RoFormer)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, N, hd) by per-token ``cos``/``sin`` (B, N, hd)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class ModelAdapter:
    """Everything tokenprune needs to know about one model family.

    Subclasses set ``model_types`` (values of ``config.model_type``) and locate the LLM's decoder
    layers; the rest of tokenprune never branches on a model's class.
    """

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # --- structure ---------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attn_implementation(self) -> str:
        return getattr(self.language_model.config, "_attn_implementation", None) or "eager"

    @property
    def mask_format(self) -> str:
        """How the LLM's layers take their mask: ``bool`` (SDPA), ``additive`` (eager), ``2d`` (FlashAttention)."""
        impl = self.attn_implementation
        if impl == "sdpa":
            return "bool"
        if "flash" in impl:
            return "2d"
        return "additive"

    # --- inputs ------------------------------------------------------------------------------
    def input_ids(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return kwargs.get("input_ids", args[0] if args else None)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: which input tokens are visual."""
        raise NotImplementedError

    # --- KV cache ----------------------------------------------------------------------------
    def cache_length(self, cache: Any) -> int:
        if cache is None:
            return 0
        return int(cache.get_seq_length())

    def cached_keys(self, cache: Any, layer: int) -> torch.Tensor | None:
        """(B, H_kv, T, hd) rotary-embedded keys cached by ``layer``, or None."""
        if cache is None or not hasattr(cache, "layers") or layer >= len(cache.layers):
            return None
        keys = getattr(cache.layers[layer], "keys", None)
        return keys if isinstance(keys, torch.Tensor) and keys.numel() else None

    def select_cache_entries(self, cache: Any, layer: int, index: torch.Tensor) -> None:
        """Keep only the cached entries ``index`` (B, K) of ``layer``."""
        entry = cache.layers[layer]
        entry.keys = gather_tokens(entry.keys, index, dim=2).contiguous()
        entry.values = gather_tokens(entry.values, index, dim=2).contiguous()

    # --- signals -----------------------------------------------------------------------------
    def attention_rows(self, layer: int, hidden_in: torch.Tensor, position_embeddings: Any,
                       query_index: torch.Tensor, key_valid: torch.Tensor,
                       cached_keys: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, Q, N) attention probabilities of the rows ``query_index`` (B, Q) at ``layer``."""
        raise NotImplementedError


class LlamaStyleAdapter(ModelAdapter):
    """Shared by LVLMs whose LLM layers are Llama-style: ``input_layernorm``, ``self_attn.{q,k}_proj``, RoPE."""

    def attention_rows(self, layer, hidden_in, position_embeddings, query_index, key_valid, cached_keys=None):
        block = self.layers[layer]
        attn = block.self_attn
        b, n, d = hidden_in.shape
        hd = attn.head_dim
        h = block.input_layernorm(hidden_in)
        cos, sin = (expand_batch(t, b) for t in position_embeddings)
        hq = gather_tokens(h, query_index)
        q = attn.q_proj(hq).view(b, query_index.shape[1], -1, hd)
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        q = apply_rope(q.transpose(1, 2), gather_tokens(cos, query_index), gather_tokens(sin, query_index))
        if cached_keys is not None and cached_keys.shape[-2] == n:
            k = cached_keys
        else:
            k = attn.k_proj(h).view(b, n, -1, hd)
            if getattr(attn, "k_norm", None) is not None:
                k = attn.k_norm(k)
            k = apply_rope(k.transpose(1, 2), cos, sin)
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling
        pos = torch.arange(n, device=hidden_in.device)
        allowed = key_valid.bool()[:, None, :] & (pos[None, None, :] <= query_index[:, :, None])
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(logits, dim=-1)
