"""InternVL (``InternVLForConditionalGeneration``): InternViT tower, pixel shuffle, Qwen2 / Llama LLM."""

from __future__ import annotations

import torch
from torch import nn

from tokenprune.adapters.base import LlamaStyleAdapter, block_groups, received_attention, tiles_of_images


class InternVLAdapter(LlamaStyleAdapter):
    """InternVL 2.5 / 3 (Chen et al. 2024, "Expanding Performance Boundaries of Open-Source Multimodal Models with
    Model, Data, and Test-Time Scaling"; Zhu et al. 2025, "InternVL3").

    An image is cut into tiles (the processor's crops, then a thumbnail of the whole image when there are several);
    each tile goes through InternViT on its own, and a pixel shuffle turns each ``merge`` x ``merge`` block of
    patches (``merge = 1 / downsample_ratio``, 2: 1024 patches of a 448-px tile become 256 tokens) into one visual
    token, in raster order over the tile. Every visual token is one ``<IMG_CONTEXT>`` placeholder
    (``config.image_token_id``) between ``<img>`` and ``</img>``; a tile's tokens follow one another, so the tiles
    are consecutive runs of ``(side / merge)²`` tokens (``budget: per_tile`` runs grid operators on each).

    **Vision-tower signals.** InternViT has a CLS token: ``cls_attention`` is its attention to each patch at the
    layer, summed over the patches a visual token concatenates (per tile and head the values sum to 1 over the
    patches, as over CLIP's); vision keys are the patch keys (after InternViT's q/k norm), averaged over them.
    ``vision_feature_select_strategy: full`` (the CLS feature shuffled in with the patches) has no such layout
    and is refused.
    """

    model_types = ("internvl",)
    family = "InternVL"

    # --- tiles ----------------------------------------------------------------------------------
    def _merge(self) -> int:
        merge = round(1 / float(self.model.config.downsample_ratio))
        if abs(merge * float(self.model.config.downsample_ratio) - 1) > 1e-6:
            raise ValueError(f"downsample_ratio {self.model.config.downsample_ratio} is not 1/n")
        return merge

    def _side(self) -> int:
        v = self.model.config.vision_config
        size, patch = v.image_size, v.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return size // patch

    def _tile_grid(self) -> tuple[int, int]:
        side = self._side() // self._merge()
        return side, side

    @classmethod
    def visual_grid_from_config(cls, config) -> str | None:
        return ("a sample's visual tokens are its images' tiles (crops and a thumbnail), each a raster grid of its "
                "own; set the stage's budget: per_tile to run it on each tile's grid")

    def _tile_count(self, visual: torch.Tensor) -> list[int]:
        rows, cols = self._tile_grid()
        per_tile = rows * cols
        counts = visual.sum(1).tolist()
        if any(n % per_tile for n in counts):
            raise ValueError(f"visual tokens per sample {counts} are not whole tiles of {per_tile} tokens")
        return [n // per_tile for n in counts]

    def visual_tiles(self, visual, capture, grids):
        """Every tile the tower saw is a tile: ``(side / merge)²`` consecutive visual tokens in raster order."""
        rows, cols = self._tile_grid()
        tiles = sum(self._tile_count(visual))
        one = (torch.zeros(rows * cols, dtype=torch.long), [(rows, cols)])
        return tiles_of_images(visual, [one] * tiles)

    def image_panels(self, inputs: dict, sample: int) -> list[tuple[str, torch.Tensor]]:
        """Each tile of the sample, in order (the processor's crops, then the thumbnail when there are several)."""
        visual = self.visual_mask(inputs["input_ids"][sample:sample + 1])
        if int(visual.sum()) == 0:
            raise ValueError(f"sample {sample} holds no visual tokens")
        (count,) = self._tile_count(visual)
        rows, cols = self._tile_grid()
        names = [f"tile {t}" for t in range(count)]
        if count > 1:
            names[-1] = "thumbnail"
        return [(name, torch.arange(t * rows * cols, (t + 1) * rows * cols).view(rows, cols))
                for t, name in enumerate(names)]

    # --- vision-tower signals -------------------------------------------------------------------
    def _tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def vision_tower(self) -> nn.Module | None:
        return self._tower()

    @classmethod
    def guide_images_from_config(cls, config) -> str | None:
        return None  # the tower's input is the model's pixel_values

    def image_inputs_from_tower(self, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        return None if pixels is None else {"pixel_values": pixels}

    def vision_layers(self) -> nn.ModuleList | None:
        encoder = getattr(self._tower(), "encoder", None)
        return getattr(encoder, "layer", None)

    @classmethod
    def vision_signals_from_config(cls, config) -> str | None:
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            return ("vision_feature_select_strategy is 'full': the pixel shuffle then mixes the CLS feature into the "
                    "patches' layout, which no patch grid stands for")
        return None

    def vision_signals_unavailable(self) -> str | None:
        reason = self.vision_signals_from_config(self.model.config)
        if reason is not None:
            return reason
        layers = self.vision_layers()
        if layers is None or not hasattr(layers[0], "attention") or not hasattr(layers[0], "layernorm_before"):
            return f"the vision tower of this {self.family} model is not InternViT (encoder.layer[i].attention)"
        return None

    def vision_tower_capture(self, args, kwargs):
        pixels = args[0] if args else kwargs.get("pixel_values")
        return None if pixels is None else int(pixels.shape[0])  # tiles the tower saw

    def vision_signal_rows(self, tower):
        if tower is None:
            return None
        rows, cols = self._tile_grid()
        return tower * rows * cols

    def _qk(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        block = self.vision_layers()[layer]
        attn = block.attention
        h = block.layernorm_before(hidden)
        b, n, _ = h.shape
        q = attn.q_norm(attn.q_proj(h)).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h)).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        return q, k, float(attn.scale)

    def _per_token(self, per_patch: torch.Tensor, reduce: str) -> torch.Tensor:
        """(tiles, H, P, ...) per patch (CLS dropped) -> (tiles * T, H, ...) per visual token, tiles in order."""
        groups = block_groups(self._side(), self._merge()).to(per_patch.device)  # (T, m²): pixel shuffle
        merged = per_patch[:, :, groups]  # (tiles, H, T, m², ...)
        merged = merged.sum(3) if reduce == "sum" else merged.mean(3)
        merged = merged.transpose(1, 2)  # (tiles, T, H, ...)
        return merged.reshape(-1, *merged.shape[2:])

    def vision_cls_attention(self, layer, captured, tower=None):
        q, k, scale = self._qk(layer, captured)
        probs = torch.softmax((q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale, dim=-1)[:, :, 0]
        return self._per_token(probs[:, :, 1:], "sum")

    def vision_received_attention(self, layer, captured, tower=None):
        received = received_attention(*self._qk(layer, captured))  # (tiles, H, 1 + P): every query, CLS too
        return self._per_token(received[:, :, 1:], "sum")

    def vision_keys(self, layer, captured, tower=None):
        _, k, _ = self._qk(layer, captured)
        return self._per_token(k[:, :, 1:], "mean")
