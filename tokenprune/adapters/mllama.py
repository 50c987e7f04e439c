"""LLaMA-3.2-Vision (``MllamaForConditionalGeneration``): images enter the LLM only through cross-attention."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from tokenprune.adapters.base import ModelAdapter
from tokenprune.errors import ConfigError
from tokenprune.masks import gather_tokens


class MllamaAdapter(ModelAdapter):
    """LLaMA-3.2-Vision (Meta, 2024): a Llama LLM with gated cross-attention layers inserted every few
    layers; the image features (tiles x patches, projected) are their keys and values, and the
    text sequence holds only one ``<|image|>`` token per image. The one pruning site is therefore
    ``cross_attention``: the image features before the first cross-attention layer, which every
    cross-attention layer (and its KV cache) then holds in pruned form.
    """

    model_types = ("mllama",)
    family = "LLaMA-3.2-Vision (Mllama)"
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "cross_attention_states")

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def cross_attention_layers(self) -> list[int]:
        return sorted(int(i) for i in self.language_model.cross_attention_layers)

    def validate_pipeline(self, pipeline) -> None:
        super().validate_pipeline(pipeline)
        for stage in pipeline.stages:
            if not stage.cross_attention:
                raise ConfigError(
                    f"{stage.key}.layer", f"got {stage.layer!r}, but the decoder sequence of {self.family} holds no "
                    f"visual tokens (images enter only through its cross-attention layers "
                    f"{self.cross_attention_layers}); allowed: cross_attention")

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The ``<|image|>`` placeholders of the text (one per image; not the image features themselves)."""
        return input_ids == self.model.config.image_token_index

    def _cross(self, layer: int) -> nn.Module:
        return self.layers[layer].cross_attn

    def project_cross_queries(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        block = self.layers[layer]
        attn = block.cross_attn
        b = hidden.shape[0]
        h = gather_tokens(block.input_layernorm(hidden), rows)
        q = attn.q_proj(h).view(b, rows.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)
        return attn.q_norm(q)

    def project_cross_keys(self, layer: int, image: torch.Tensor) -> torch.Tensor:
        attn = self._cross(layer)
        b = image.shape[0]
        k = attn.k_proj(image).view(b, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
        return attn.k_norm(k)

    def attention_scaling(self, layer: int) -> float:
        block = self.layers[layer]
        attn = getattr(block, "cross_attn", None) or block.self_attn
        return float(attn.scaling)

    def image_features(self, states: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, M, D) image features of each sample from the model's ``cross_attention_states``."""
        return states.reshape(batch, -1, states.shape[-1])
