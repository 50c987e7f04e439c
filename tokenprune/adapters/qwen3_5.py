"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): a hybrid LLM of Gated DeltaNet and gated attention layers."""

from __future__ import annotations

import torch
from torch import nn

from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter


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
    frame_videos = ("qwen3_5", "qwen3_5_moe")
    timestamped_frames = True  # each temporal patch after its own timestamp

    def query_heads(self, attn: nn.Module, projected: torch.Tensor) -> torch.Tensor:
        """Each head's [query | output gate] side by side: the query is the first head_dim of its 2 x head_dim."""
        return projected.view(*projected.shape[:2], -1, 2 * attn.head_dim)[..., :attn.head_dim]
