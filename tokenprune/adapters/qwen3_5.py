"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): a hybrid LLM of Gated DeltaNet and gated attention layers."""

from __future__ import annotations

from torch import nn

from tokenprune.adapters.base import apply_rope, sample_rows
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter
from tokenprune.core.masks import expand_batch, gather_tokens


class Qwen3_5Adapter(Qwen2VLAdapter):
    """Qwen3.5 (Qwen Team 2026; the MoE variant ``qwen3_5_moe`` routes each token on its own).

    Qwen2-VL's token layout and a Qwen3-VL vision tower (no DeepStack), in front of an LLM whose decoder layers are
    of two kinds (``config.text_config.layer_types``):

    - **linear attention** (``linear_attention``, three layers in four): Gated DeltaNet (Yang et al. 2025, "Gated
      Delta Networks: Improving Mamba2 with Delta Rule") — a short causal convolution and a recurrent state of fixed
      size that every token updates in order. It has no attention to score by and no keys to cache. Pruning before
      layer L still removes a token from every later layer, recurrent ones included: the kept tokens flow on, so a
      recurrent layer's state takes them in order and no others (its compute is linear in them; its state's size does
      not change). A stage whose operators read the attention of the layer before its site must sit right after an
      attention layer, and a ``kv_cache`` stage compresses the attention layers only
      (:meth:`~tokenprune.adapters.base.ModelAdapter.check_recurrent_stage`).
    - **gated attention** (``full_attention``): the query projection gives each head its query and an output gate
      side by side (``q_proj`` is 2 x heads x head_dim wide); q/k norm; interleaved M-RoPE on the first
      ``partial_rotary_factor`` of each head (a quarter in the released models), the rest unrotated.
    """

    model_types = ("qwen3_5", "qwen3_5_moe")
    family = "Qwen3.5"

    def query_projection(self, layer: int) -> nn.Module | None:
        return None if layer in self.recurrent_layers else self.layers[layer].self_attn.q_proj

    def project_queries(self, layer, hidden, position_embeddings, rows, *, rotary=True, sample=0, projected=None):
        block = self.layers[layer]
        attn = block.self_attn
        b = hidden.shape[0]
        if projected is None:
            projected = attn.q_proj(block.input_layernorm(gather_tokens(hidden, rows)))  # per-token: the rows only
        else:
            projected = gather_tokens(projected, rows)
        # each head's [query | output gate]: the query is the first head_dim of its 2 x head_dim
        q = projected.view(b, rows.shape[1], -1, 2 * attn.head_dim)[..., :attn.head_dim]
        q = attn.q_norm(q).transpose(1, 2)
        if rotary:
            cos, sin = (gather_tokens(sample_rows(t, sample, b), rows) for t in position_embeddings)
            q = apply_rope(q, cos, sin)
        return q

    def project_keys(self, layer, hidden, position_embeddings, *, rotary=True):
        block = self.layers[layer]
        attn = block.self_attn
        b, n, _ = hidden.shape
        k = attn.k_norm(attn.k_proj(block.input_layernorm(hidden)).view(b, n, -1, attn.head_dim)).transpose(1, 2)
        if rotary:
            cos, sin = (expand_batch(t, b) for t in position_embeddings)
            k = apply_rope(k, cos, sin)
        return k

    def sliding_window(self, layer: int) -> int | None:
        return None

    def cached_keys(self, cache, layer):
        return None if layer in self.recurrent_layers else super().cached_keys(cache, layer)

    def cached_values(self, cache, layer):
        return None if layer in self.recurrent_layers else super().cached_values(cache, layer)

