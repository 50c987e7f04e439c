"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower pooled to 256 tokens, bidirectional image blocks,
interleaved sliding-window and global layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import (
    LlamaStyleAdapter,
    block_groups,
    clip_layer_qk,
    received_attention,
    tiles_of_images,
)


class Gemma3Adapter(LlamaStyleAdapter):
    """Gemma 3 (Gemma Team 2025, "Gemma 3 Technical Report").

    An image is ``mm_tokens_per_image`` (256) ``<image_soft_token>`` placeholders between ``<start_of_image>`` and
    ``<end_of_image>``: SigLIP's patch grid (64 x 64 at 896 px) average-pooled in blocks (4 x 4) to a 16 x 16 grid,
    in raster order. Each image is one tile and, alone in its sample, the sample's grid.

    **Attention.** Given ``token_type_ids`` (the processor's, which ``generate()`` passes to the prefill), the
    tokens of one image attend to each other in both directions on top of the causal mask; sliding-window layers
    (``sliding_attention``) and global ones interleave, with different rotary bases. Pruning keeps this exact: each
    later layer's mask and rotary ``(cos, sin)`` are its own, gathered to the kept tokens; attention scores are
    recomputed under the mask the layer uses (:meth:`attention_blocks`: a visual query sees its image's later
    tokens too; a sliding layer's window in original positions); a layer's rotary embedding is its type's
    (:meth:`rotary_kind`).

    **Vision-tower signals.** SigLIP has no CLS token: ``cls_attention`` is the attention a patch receives at the
    layer, averaged over the image's queries and summed over the patches a token pools; vision keys are the
    patches' keys, averaged over them.
    """

    model_types = ("gemma3",)
    family = "Gemma 3"

    @classmethod
    def fixed_resolution_from_config(cls, config):
        side = config.vision_config.image_size
        return (f"its processor resizes every image to {side}x{side} px, {config.mm_tokens_per_image} tokens an "
                "image")

    # --- attention and positions ----------------------------------------------------------------
    def attention_blocks(self, kwargs: dict) -> torch.Tensor | None:
        """Each run of image tokens (``token_type_ids == 1``) is a block: the model's image mask."""
        types = kwargs.get("token_type_ids")
        if types is None:
            return None
        image = types == 1
        start = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        return torch.where(image, start.long().cumsum(1) - 1, -1)

    def rotary_kind(self, layer: int) -> Any:
        return self.model.config.text_config.layer_types[layer]

    def rotary_embeddings(self, hidden, position_ids, layer=0):
        return self.language_model.rotary_emb(hidden, position_ids, self.rotary_kind(layer))

    # --- tiles: every image is a tile -----------------------------------------------------------
    def _side(self) -> int:
        return int(round(self.model.config.mm_tokens_per_image ** 0.5))

    def visual_tiles(self, visual, capture, grids):
        side = self._side()
        per_image = side * side
        counts = visual.sum(1).tolist()
        if any(n % per_image for n in counts):
            raise ValueError(f"visual tokens per sample {counts} are not whole images of {per_image} tokens")
        one = (torch.zeros(per_image, dtype=torch.long), [(side, side)])
        return tiles_of_images(visual, [one] * (sum(counts) // per_image))

    def image_panels(self, inputs: dict, sample: int) -> list[tuple[str, torch.Tensor]]:
        n = int(self.visual_mask(inputs["input_ids"][sample:sample + 1]).sum())
        side = self._side()
        if n == 0 or n % (side * side):
            raise ValueError(f"sample {sample}: {n} visual tokens are not whole images of {side * side}")
        return [(f"image {i}", torch.arange(i * side * side, (i + 1) * side * side).view(side, side))
                for i in range(n // (side * side))]

    # --- vision-tower signals -------------------------------------------------------------------
    def _tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def vision_tower(self) -> nn.Module | None:
        return self._tower()

    @classmethod
    def guide_images_from_config(cls, config) -> str | None:
        return None

    @classmethod
    def vision_signals_from_config(cls, config) -> str | None:
        return None

    def image_inputs_from_tower(self, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        return None if pixels is None else {"pixel_values": pixels}

    def guide_inputs(self, input_ids, image_inputs):
        return {**image_inputs, "token_type_ids": self.visual_mask(input_ids).long()}

    def vision_layers(self) -> nn.ModuleList | None:
        tower = self._tower()
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        return getattr(encoder, "layers", None)

    def vision_signals_unavailable(self) -> str | None:
        layers = self.vision_layers()
        if layers is None or not hasattr(layers[0], "self_attn"):
            return f"the vision tower of this {self.family} model is not SigLIP (encoder.layers[i].self_attn)"
        return None

    def vision_tower_capture(self, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        return None if pixels is None else int(pixels.shape[0])

    def vision_signal_rows(self, tower):
        return None if tower is None else tower * self._side() ** 2

    def _pool(self) -> tuple[int, int]:
        v = self.model.config.vision_config
        patches = v.image_size // v.patch_size
        return patches, patches // self._side()

    def _qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        return clip_layer_qk(self.vision_layers()[layer], hidden)

    def _per_token(self, per_patch: torch.Tensor, reduce: str) -> torch.Tensor:
        """(images, H, P, ...) per patch -> (images * T, H, ...) per pooled token."""
        patches, kernel = self._pool()
        groups = block_groups(patches, kernel).to(per_patch.device)
        merged = per_patch[:, :, groups]
        merged = (merged.sum(3) if reduce == "sum" else merged.mean(3)).transpose(1, 2)
        return merged.reshape(-1, *merged.shape[2:])

    def vision_cls_attention(self, layer, captured, tower=None):
        return self._per_token(received_attention(*self._qk(layer, captured)), "sum")

    def vision_keys(self, layer, captured, tower=None):
        _, k, _ = self._qk(layer, captured)
        return self._per_token(k, "mean")
