"""LLaMA-3.2-Vision (``MllamaForConditionalGeneration``): images enter the LLM only through cross-attention."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from tokenprune.adapters.base import ModelAdapter, layer_hidden
from tokenprune.core.errors import ConfigError
from tokenprune.core.masks import expand_batch, gather_tokens
from tokenprune.core.sites import CrossAttentionSite, KVCacheSite, LayerSite


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
            if isinstance(stage.site, KVCacheSite):
                raise ConfigError(
                    f"{stage.key}.layer", f"a 'kv_cache' stage compresses the visual entries of the self-attention "
                    f"caches, and those of {cls.family} hold none (images enter only through the cross-attention "
                    f"layers {list(facts.cross_attention_layers)}, whose caches hold the image features: prune those "
                    "once for every layer at the cross_attention site; per-layer budgets on the cross-attention "
                    "caches are not built); allowed: cross_attention, or 0")
            if not isinstance(cls.resolve_site(stage.site), CrossAttentionSite):
                raise ConfigError(
                    f"{stage.key}.layer", f"got {stage.layer!r}, but the decoder sequence of {cls.family} holds no "
                    f"visual tokens (images enter only through its cross-attention layers "
                    f"{list(facts.cross_attention_layers)}); allowed: cross_attention, or 0 (before the LLM: the "
                    "same image features)")

    @classmethod
    def resolve_site(cls, site):
        """``layer: 0`` (before the LLM) is the image features every cross-attention layer reads: the
        ``cross_attention`` site (its stage runs before the first cross-attention layer reads them)."""
        return CrossAttentionSite() if isinstance(site, LayerSite) and site.layer == 0 else site

    decoder_only = False

    @classmethod
    def guide_images_from_config(cls, config) -> str | None:
        return ("a guide ranks the decoder sequence's visual tokens by its own attention to them, and Mllama's "
                "decoder sequence holds none (its image features enter through cross-attention)")

    # --- vision-tower signals: a CLS token per tile, every feature of a tile in the cross-attention keys -----
    @classmethod
    def vision_signals_from_config(cls, config) -> str | None:
        return None

    def _vision_model(self) -> nn.Module:
        return self.model.model.vision_model

    def vision_modules(self) -> list[nn.Module]:
        """Its vision model (the tiles' encoder; no guide model takes it, so it is no :meth:`vision_tower`) and the
        projector."""
        return [self._vision_model(), self.model.model.multi_modal_projector]

    def vision_layers(self) -> nn.ModuleList | None:
        """The local encoder's layers, then the global (gated) encoder's: vision layer ``i`` counts through both."""
        vm = self._vision_model()
        local, glob = getattr(vm, "transformer", None), getattr(vm, "global_transformer", None)
        if local is None or glob is None:
            return None
        return nn.ModuleList([*local.layers, *glob.layers])

    def vision_signals_unavailable(self) -> str | None:
        layers = self.vision_layers()
        if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "q_proj"):
            return f"the vision tower of this {self.family} model is not Mllama's (transformer + global_transformer)"
        return None

    def vision_layer_capture(self, layer, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        return layer_hidden(args, kwargs), mask

    def _tile_shape(self) -> tuple[int, int]:
        """(features per tile: CLS + patches, tokens per tile in the tower: padded to a multiple of 8)."""
        v = self.model.config.vision_config
        per = (v.image_size // v.patch_size) ** 2 + 1
        return per, per + (8 - per % 8) % 8

    def _vision_qk(self, layer: int, captured) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
        hidden, mask = captured
        block = self.vision_layers()[layer]
        attn = block.self_attn
        h = block.input_layernorm(hidden)
        n, t, _ = h.shape
        q = attn.q_proj(h).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        return q, k, mask, float(attn.scaling)

    def vision_cls_attention(self, layer, captured, tower=None):
        """Per image feature (images x tiles x (CLS + patches), in the model's order), the attention it receives
        from its own tile's CLS query: the tower attends across all tiles of an image, so each CLS row is
        a softmax over the whole image (with the tower's own mask), read at its tile's features."""
        q, k, mask, scale = self._vision_qk(layer, captured)
        per, padded = self._tile_shape()
        n, heads, t, _ = q.shape
        tiles = t // padded
        cls_rows = torch.arange(tiles, device=q.device) * padded
        logits = (q[:, :, cls_rows].float() @ k.float().transpose(-1, -2)) * scale  # (n, H, tiles, T)
        if mask is not None:
            logits = logits + mask[:, :, cls_rows].float()
        probs = logits.softmax(-1).view(n, heads, tiles, tiles, padded)
        own = probs.diagonal(dim1=2, dim2=3)[..., :per, :]  # (n, H, per, tiles): tile i's CLS over tile i
        return own.permute(0, 3, 2, 1).reshape(-1, heads)

    def feature_tiles(self, batch: int, features: int) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
        """The tiles of the image features (B, M) a cross-attention stage holds, for ``budget: per_tile``: every
        tile's patches (a side x side grid, raster order); its CLS feature is in no tile."""
        per, _ = self._tile_shape()
        side = int(round((per - 1) ** 0.5))
        j = torch.arange(features)
        tile_of = torch.where(j % per == 0, -1, j // per).expand(batch, features)
        return tile_of, [[(side, side)] * (features // per) for _ in range(batch)]

    def vision_keys(self, layer, captured, tower=None):
        _, k, _, _ = self._vision_qk(layer, captured)
        per, padded = self._tile_shape()
        n, heads, t, hd = k.shape
        k = k.transpose(1, 2).reshape(n, t // padded, padded, heads, hd)[:, :, :per]
        return k.reshape(-1, heads, hd)

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
