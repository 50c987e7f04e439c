"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, anyres_max tiling, Qwen2 LLM."""

from __future__ import annotations

import math

import torch

from tokenprune.adapters.base import received_attention
from tokenprune.adapters.llava_next import LlavaNextAdapter


def _anyres_max(aspect: str) -> int:
    """The tile budget N of a ``vision_aspect_ratio`` ``anyres_max_N``."""
    return int(aspect.removeprefix("anyres_max_"))


def bilinear_nearest(size_in: int, size_out: int) -> torch.Tensor:
    """For each of ``size_out`` outputs of a bilinear resize (``align_corners=False``) of ``size_in`` inputs, the
    input it takes the largest weight from: the one nearest its source coordinate ``(i + 0.5) * in / out - 0.5``."""
    src = (torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out) - 0.5
    return src.clamp(min=0).round().long().clamp(max=size_in - 1)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (Li et al. 2024, "LLaVA-OneVision: Easy Visual Task Transfer").

    The layout is LLaVA-NeXT's (a base tile, then the unpadded anyres grid with an ``image_newline`` closing each
    row; all of them ``<image>`` placeholders), with three differences this adapter follows:

    - ``vision_aspect_ratio: anyres_max_N``: an unpadded grid larger than about N tiles is resized (bilinear) to N
      tiles' worth of tokens before the newlines are added, so a visual token of a large image mixes up to four
      neighbouring patches. Its vision-tower signal row is that of the patch it takes the largest weight from
      (:func:`bilinear_nearest`); the tokens are an exact function of the patches, their signals an approximation.
    - an image of a sample with several images is its base tile alone (``batch_num_images``), closed by one newline.
    - the tower is SigLIP, which has no CLS token: the vision ``cls_attention`` signal is the attention each patch
      receives at the layer, averaged over the queries of its tile (as VisionZip scores CLS-free towers), and
      ``vision_feature_select_strategy: full`` keeps every patch.

    Videos are refused before the forward runs (:meth:`unsupported_inputs`): their frames' pooled tokens are not
    laid out here.
    """

    model_types = ("llava_onevision",)
    family = "LLaVA-OneVision"

    def unsupported_inputs(self, kwargs):
        if kwargs.get("pixel_values_videos") is not None:
            return ("pixel_values_videos: LLaVA-OneVision videos are not pruned by tokenprune yet (images are); run "
                    "videos without a pipeline")
        return None

    @staticmethod
    def _call_option(args: tuple, kwargs: dict, name: str, index: int):
        """``get_image_features(pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy,
        vision_aspect_ratio, batch_num_images)``: argument ``name`` at position ``index``, if given."""
        return args[index] if len(args) > index else kwargs.get(name)

    def image_inputs_from_tower(self, args, kwargs):
        out = super().image_inputs_from_tower(args, kwargs)
        count = self._call_option(args, kwargs, "batch_num_images", 5)
        if out is not None and count is not None:
            out["batch_num_images"] = count
        return out

    def vision_tower_capture(self, args, kwargs):
        """[(height, width, tiled)] per image of the call, with ``tiled`` False for an image that is its base tile
        alone (a sample with several images), and the call's ``vision_aspect_ratio``."""
        _, sizes = self._call_images(args, kwargs)
        if sizes is None:
            return None
        count = self._call_option(args, kwargs, "batch_num_images", 5)
        sizes = [tuple(int(x) for x in s) for s in sizes.tolist()]
        tiled = [True] * len(sizes) if count is None else [int(n) == 1 for n in count for _ in range(int(n))]
        aspect = self._call_option(args, kwargs, "vision_aspect_ratio", 4) or self.model.config.vision_aspect_ratio
        return {"images": [(h, w, t) for (h, w), t in zip(sizes, tiled)], "aspect": aspect}

    def image_rows(self, size: tuple[int, int], first: int, tiled: bool = True, aspect: str | None = None
                   ) -> torch.Tensor:
        """As :meth:`LlavaNextAdapter.image_rows`, as ``LlavaOnevisionModel.pack_image_features`` lays the features
        out: an untiled image is its base tile and one newline; a tiled one's unpadded grid of h x w patches is
        resized to ``int(h // r) x int(w // r)`` tokens when ``r = sqrt(h*w / (N * side^2)) > 1.1`` (N from
        ``anyres_max_N``), each token's row that of its nearest source patch."""
        if not tiled or self._tiles(size) == 1:
            return self.close_rows(first, None)
        kept = self.anyres_canvas(size, first)
        h, w = kept.shape
        aspect = aspect or self.model.config.vision_aspect_ratio
        ratio = math.sqrt(h * w / (_anyres_max(aspect) * self._side() ** 2))
        if ratio > 1.1:
            kept = kept[bilinear_nearest(h, int(h // ratio))][:, bilinear_nearest(w, int(w // ratio))]
        return self.close_rows(first, kept)

    def _images_rows(self, capture) -> list[tuple[torch.Tensor, int, int]]:
        if capture is None:
            raise ValueError("the image sizes of the vision tower's call were not captured")
        out, first = [], 0
        for h, w, tiled in capture["images"]:
            count = self._tiles((h, w)) if tiled else 1
            out.append((self.image_rows((h, w), first, tiled, capture["aspect"]), first, count))
            first += count
        return out

    # --- vision-tower signals: SigLIP (no CLS) or a CLIP-like tower ---------------------------------
    def _has_cls(self) -> bool:
        return self.model.config.vision_config.model_type != "siglip_vision_model"

    @classmethod
    def vision_signals_from_config(cls, config) -> str | None:
        strategy = getattr(config, "vision_feature_select_strategy", "full")
        if config.vision_config.model_type == "siglip_vision_model":
            if strategy != "full":
                return ("vision_feature_select_strategy is 'default' on a SigLIP tower, which has no CLS token: the "
                        "model drops its first patch, which no visual token stands for")
            return None
        return LlavaNextAdapter.vision_signals_from_config(config)

    def _tokens_per_image(self) -> tuple[int, int]:
        if self._has_cls():
            return super()._tokens_per_image()
        return self._side() ** 2, 0

    def vision_cls_attention(self, layer, captured, tower=None):
        """With a CLS token, its attention (as LLaVA's); on SigLIP, the attention each patch receives, averaged
        over the tile's queries (the tower attends within each tile)."""
        if self._has_cls():
            return super().vision_cls_attention(layer, captured, tower)
        received = received_attention(*self._qk(layer, captured))  # (tiles, H, P)
        return received.permute(0, 2, 1).reshape(-1, received.shape[1])

    def vision_received_attention(self, layer, captured, tower=None):
        if self._has_cls():
            return super().vision_received_attention(layer, captured, tower)
        return self.vision_cls_attention(layer, captured, tower)  # SigLIP: already the received attention
