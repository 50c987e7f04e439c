"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, projector, Llama-style LLM."""

from __future__ import annotations

import torch
from torch import nn

from tokenprune.adapters.base import LlamaStyleAdapter


class LlavaAdapter(LlamaStyleAdapter):
    """LLaVA-1.5: visual tokens are the ``config.image_token_id`` placeholders of ``input_ids``."""

    model_types = ("llava",)
    family = "LLaVA-1.5"

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.model.config.image_token_id
