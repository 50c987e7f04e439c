"""Qwen2-VL and Qwen2.5-VL: a Qwen2 LLM with 3-D multimodal rotary positions (M-RoPE)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import LlamaStyleAdapter


class Qwen2VLAdapter(LlamaStyleAdapter):
    """Qwen2-VL / Qwen2.5-VL (Wang et al. 2024; Bai et al. 2025).

    Visual tokens are the image and video placeholders of ``input_ids`` (``mm_token_type_ids``
    marks the same tokens; the model needs it to build positions). Every token has a 3-D
    (temporal, height, width) position; the model turns them into one rotary ``(cos, sin)`` per
    token before the decoder layers, so gathering cos/sin keeps each kept token's 3-D position,
    and decoding continues from the model's own ``rope_deltas``. Renumbering positions has no
    single meaning on a 3-D grid, so ``positions: renumber`` is refused.

    The visual grid of a sample with one image is its ``image_grid_thw`` (h, w) divided by the
    spatial merge size.
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    family = "Qwen2-VL / Qwen2.5-VL"
    supports_renumber = False
    positions_note = "3-D M-RoPE positions; kept tokens keep theirs"

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

    def image_panels(self, inputs: dict, sample: int) -> list[tuple[str, torch.Tensor]]:
        """One image per sample: each visual token merges ``spatial_merge_size``² patches of its grid."""
        if "image_grid_thw" not in inputs:
            return super().image_panels(inputs, sample)
        n = int(self.visual_mask(inputs["input_ids"][sample:sample + 1]).sum())
        merge = self.model.config.vision_config.spatial_merge_size
        t, h, w = (int(x) for x in inputs["image_grid_thw"][sample])
        grid = (t * h // merge, w // merge)
        if grid[0] * grid[1] != n:
            raise ValueError(f"sample {sample}: grid {grid} does not hold its {n} visual tokens")
        return [("image", torch.arange(n).view(*grid))]

    def visual_grids(self, kwargs: dict, visual: torch.Tensor) -> list[tuple[int, int] | None] | None:
        if kwargs.get("video_grid_thw") is not None:
            return None
        thw = kwargs.get("image_grid_thw")
        if thw is None:  # generate() passes the 3-D positions instead: read the grid off them
            return self._grids_from_positions(kwargs.get("position_ids"), visual)
        merge = self.model.config.vision_config.spatial_merge_size
        counts = visual.sum(1).tolist()
        grids: list[tuple[int, int] | None] = []
        i = 0
        for n in counts:  # images are listed in order, sample after sample
            taken, mine = 0, []
            while taken < n and i < thw.shape[0]:
                t, h, w = (int(x) for x in thw[i])
                mine.append((t * h // merge, w // merge))
                taken += t * h * w // merge ** 2
                i += 1
            grids.append(mine[0] if len(mine) == 1 and taken == n else None)
        return grids

    @classmethod
    def vision_signals_from_config(cls, config) -> str | None:
        return ("the Qwen2-VL vision tower has no CLS token, and each visual token merges 2x2 patches; "
                "its vision signals are not mapped yet")

    @staticmethod
    def _grids_from_positions(pos: torch.Tensor | None, visual: torch.Tensor) -> list[tuple[int, int] | None] | None:
        """Grids from M-RoPE positions (3|4, B, N): one image's tokens span rows x cols of (height, width)."""
        if pos is None or pos.dim() != 3:
            return None
        hw = pos[-2:]  # (height, width) components, with or without the leading text row
        grids: list[tuple[int, int] | None] = []
        for b in range(visual.shape[0]):
            h, w = hw[0, b][visual[b]], hw[1, b][visual[b]]
            if h.numel() == 0:
                grids.append(None)
                continue
            rows, cols = int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1
            grids.append((rows, cols) if rows * cols == h.numel() else None)
        return grids

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        raise NotImplementedError("Qwen2-VL positions are 3-D; tokenprune keeps them and never recomputes rotary angles")
