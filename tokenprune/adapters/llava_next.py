"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres tiling, newline tokens, Llama-style LLM."""

from __future__ import annotations

import torch

from tokenprune.adapters.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge").

    An image becomes a base tile plus an anyres grid of tiles, unpadded to the image's aspect
    ratio, with an ``image_newline`` token closing every row of the grid; so the number of visual
    tokens differs per image and per sample. All of them, newlines included, are the image
    placeholders of ``input_ids``. The newline tokens are marked as token kind ``image_newline``
    (their input embedding is the model's learned ``image_newline`` vector), which a stage can
    ``protect`` from pruning. The visual tokens do not form one grid, so grid-based operators need
    an explicit grid.
    """

    model_types = ("llava_next",)
    family = "LLaVA-NeXT"
    token_kinds = ("image_newline",)

    def vision_tower(self):
        return None  # the tower sees flattened tiles; the image sizes a guide needs are not recoverable

    def vision_signals_unavailable(self) -> str | None:
        return ("the anyres layout of LLaVA-NeXT (base tile, unpadded tile grid, newlines) is not mapped back to "
                "vision-tower patches yet")

    def mark_token_kinds(self, embeds: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        newline = self.model.model.image_newline.to(embeds.dtype)
        return {"image_newline": visual & (embeds == newline).all(dim=-1)}
