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
        return None

    @classmethod
    def guide_images_from_config(cls, config) -> str | None:
        return "its vision tower sees flattened anyres tiles; the image sizes a guide model needs are not recoverable"

    @classmethod
    def visual_grid_from_config(cls, config) -> str | None:
        return ("a sample's visual tokens are a base tile and an unpadded anyres tile grid with newline tokens, "
                "and per-tile grids are not mapped yet")

    @classmethod
    def vision_signals_from_config(cls, config) -> str | None:
        return ("the anyres layout of LLaVA-NeXT (base tile, unpadded tile grid, newlines) is not mapped back to "
                "vision-tower patches yet")

    def image_panels(self, inputs: dict, sample: int) -> list[tuple[str, torch.Tensor]]:
        """The base tile, then the unpadded anyres grid (each row closed by a newline token, which has no cell)."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        n = int(self.visual_mask(inputs["input_ids"][sample:sample + 1]).sum())
        if n == 0:
            raise ValueError(f"sample {sample} holds no visual tokens")
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        base = side * side
        rest = n - base
        size = [int(x) for x in inputs["image_sizes"][sample]]
        gh, gw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        rows = int(unpad_image(torch.zeros(1, gh * side, gw * side), torch.tensor(size)).shape[1])
        if rest <= 0 or rest % rows:
            raise ValueError(f"sample {sample}: {rest} anyres tokens do not form {rows} rows closed by newlines")
        grid = torch.arange(base, n).view(rows, rest // rows)[:, :-1]  # drop the newline column
        return [("base", torch.arange(base).view(side, side)), ("anyres", grid.clone())]

    def mark_token_kinds(self, embeds: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        newline = self.model.model.image_newline.to(embeds.dtype)
        return {"image_newline": visual & (embeds == newline).all(dim=-1)}
