"""LLaMA-3.2-Vision (``MllamaForConditionalGeneration``): images enter the LLM only through cross-attention."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from tokenprune.adapters.base import ModelAdapter
from tokenprune.core.errors import ConfigError
from tokenprune.core.masks import expand_batch, gather_tokens
from tokenprune.core.sites import CrossAttentionSite


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

    @classmethod
    def cross_attention_layers_from_config(cls, config) -> list[int]:
        return sorted(int(i) for i in config.text_config.cross_attention_layers)

    @classmethod
    def check_pipeline(cls, facts, pipeline, guide: bool = False) -> None:
        super().check_pipeline(facts, pipeline, guide)
        for stage in pipeline.stages:
            if not isinstance(stage.site, CrossAttentionSite):
                raise ConfigError(
                    f"{stage.key}.layer", f"got {stage.layer!r}, but the decoder sequence of {cls.family} holds no "
                    f"visual tokens (images enter only through its cross-attention layers "
                    f"{list(facts.cross_attention_layers)}); allowed: cross_attention")

    decoder_only = False

    def visual_token_counts(self, inputs: dict) -> list[int]:
        """The image features each sample's cross-attention layers read: tiles x (patches + CLS)."""
        vision = self.model.config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
        return [int(tiles.sum()) * per_tile for tiles in inputs["aspect_ratio_mask"]]

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The ``<|image|>`` placeholders of the text (one per image; not the image features themselves)."""
        return input_ids == self.model.config.image_token_index

    def project_cross_queries(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        block = self.layers[layer]
        attn = block.cross_attn
        b = hidden.shape[0]
        h = gather_tokens(block.input_layernorm(hidden), rows)
        q = attn.q_proj(h).view(b, rows.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)
        return attn.q_norm(q)

    def project_cross_keys(self, layer: int, image: torch.Tensor) -> torch.Tensor:
        attn = self.layers[layer].cross_attn
        b = image.shape[0]
        k = attn.k_proj(image).view(b, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
        return attn.k_norm(k)

    def attention_scaling(self, layer: int) -> float:
        block = self.layers[layer]
        attn = getattr(block, "cross_attn", None) or block.self_attn
        return float(attn.scaling)

    # --- the keyword arguments of a cross-attention decoder layer ---------------------------------
    def has_cross_attention_states(self, kwargs: dict) -> bool:
        """Whether a cross-attention layer call carries image features (the prefill) rather than the cache."""
        return kwargs.get("cross_attention_states") is not None

    def cross_attention_mask(self, kwargs: dict) -> torch.Tensor | None:
        """The additive cross-attention mask (B, 1, Q, M) of a cross-attention layer call."""
        return kwargs.get("cross_attention_mask")

    def cross_attention_inputs(self, kwargs: dict, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image features (B, M, D), allowed (B, S, M) bool) of a prefill cross-attention layer call.

        ``allowed``: the text token's mask column is open and the row really sees an image. (Mllama
        opens every column of a row that sees no image and zeroes that row's MLP output instead.)
        """
        b, s = hidden.shape[:2]
        states = kwargs["cross_attention_states"]
        image = states.reshape(b, -1, states.shape[-1])
        allowed = torch.ones(b, s, image.shape[1], dtype=torch.bool, device=hidden.device)
        mask = kwargs.get("cross_attention_mask")
        if mask is not None:
            allowed = expand_batch(mask, b)[:, 0] > torch.finfo(mask.dtype).min / 2
        rows = kwargs.get("full_text_row_masked_out_mask")
        if rows is not None:
            allowed = allowed & (expand_batch(rows, b)[:, 0] > 0)
        return image, allowed

    def set_cross_attention_inputs(self, kwargs: dict, mask: torch.Tensor | None,
                                   image: torch.Tensor | None = None) -> None:
        """Hand a cross-attention layer call the kept image features (prefill) and the mask cut to them."""
        if image is not None:
            kwargs["cross_attention_states"] = image
        kwargs["cross_attention_mask"] = mask
