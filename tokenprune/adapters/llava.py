"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, projector, Llama-style LLM."""

from __future__ import annotations

import torch
from torch import nn

from tokenprune.adapters.base import LlamaStyleAdapter, clip_layer_qk, received_attention


class LlavaAdapter(LlamaStyleAdapter):
    """LLaVA-1.5: visual tokens are the ``config.image_token_id`` placeholders of ``input_ids``."""

    model_types = ("llava",)
    family = "LLaVA-1.5"

    @classmethod
    def fixed_resolution_from_config(cls, config):
        side = config.vision_config.image_size
        return f"its processor resizes every image to {side}x{side} px, one grid of the same tokens"

    # --- vision-tower signals: a CLIP-style tower, one image = P patch tokens (+ CLS) -------------
    def _tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def vision_tower(self) -> nn.Module | None:
        return self._tower()

    def image_inputs_from_tower(self, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        return None if pixels is None else {"pixel_values": pixels}

    def vision_layers(self) -> nn.ModuleList | None:
        tower = self._tower()
        model = getattr(tower, "vision_model", tower)
        encoder = getattr(model, "encoder", None)
        return getattr(encoder, "layers", None)

    @classmethod
    def vision_signals_from_config(cls, config) -> str | None:
        return None  # a CLIP-like tower gives them; only the loaded tower tells (vision_signals_unavailable)

    @classmethod
    def guide_images_from_config(cls, config) -> str | None:
        return None  # the tower's input is the model's pixel_values

    def vision_signals_unavailable(self) -> str | None:
        reason = self.vision_signals_from_config(self.model.config)
        if reason is not None:
            return reason
        if self.vision_layers() is None or not hasattr(self.vision_layers()[0], "self_attn"):
            return f"the vision tower of this {self.family} model is not CLIP-like (encoder.layers[i].self_attn)"
        return None

    def _tokens_per_image(self) -> tuple[int, int]:
        """(visual tokens per image, index of the first patch token among the tower's tokens)."""
        v = self.model.config.vision_config
        patches = (v.image_size // v.patch_size) ** 2
        if self.model.config.vision_feature_select_strategy == "full":
            return patches + 1, 0
        return patches, 1

    def vision_patch_map(self, visual: torch.Tensor, tower=None, video=None) -> torch.Tensor:
        per_image, _ = self._tokens_per_image()
        counts = visual.sum(1)
        if bool((counts % per_image != 0).any()):
            raise ValueError(f"visual tokens per sample {counts.tolist()} are not whole images of {per_image} tokens")
        return super().vision_patch_map(visual, tower, video)

    def _qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        return clip_layer_qk(self.vision_layers()[layer], hidden)

    def vision_cls_attention(self, layer, captured, tower=None):
        q, k, scale = self._qk(layer, captured)
        probs = torch.softmax((q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale, dim=-1)[:, :, 0]
        _, first = self._tokens_per_image()
        probs = probs[:, :, first:]  # (images, H, P)
        return probs.permute(0, 2, 1).reshape(-1, probs.shape[1])

    def vision_received_attention(self, layer, captured, tower=None):
        received = received_attention(*self._qk(layer, captured))  # (images, H, tokens): every query, CLS too
        _, first = self._tokens_per_image()
        received = received[:, :, first:]  # the patches' columns
        return received.permute(0, 2, 1).reshape(-1, received.shape[1])

    def vision_keys(self, layer, captured, tower=None):
        _, k, _ = self._qk(layer, captured)
        _, first = self._tokens_per_image()
        k = k[:, :, first:]  # (images, H, P, hd)
        return k.permute(0, 2, 1, 3).reshape(-1, k.shape[1], k.shape[3])

    def vision_tower_capture(self, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        return None if pixels is None else int(pixels.shape[0])  # images the tower saw

    def vision_signal_rows(self, tower):
        return None if tower is None else tower * self._tokens_per_image()[0]

    def visual_tiles(self, visual, capture, grids):
        """Every image is a tile: its patch tokens (in raster order) follow one another."""
        per_image, _ = self._tokens_per_image()
        side = int(round(per_image ** 0.5))
        if side * side != per_image:
            raise ValueError(f"an image's {per_image} visual tokens (its CLS feature kept) form no grid")
        counts = visual.sum(1)
        if bool((counts % per_image != 0).any()):
            raise ValueError(f"visual tokens per sample {counts.tolist()} are not whole images of {per_image} tokens")
        rank = visual.long().cumsum(1) - 1
        tile_of = torch.where(visual, rank // per_image, -1)
        return tile_of, [[(side, side)] * (int(n) // per_image) for n in counts.tolist()]
