"""A small guide VLM that scores the visual tokens of a large one (SGL).

Zhao et al., "A Stitch in Time Saves Nine: Small VLM is a Precise Guidance for Accelerating Large
VLMs" (CVPR 2025): a small VLM that tokenises the image the same way runs on the same inputs, and
the attention its last token (or another query set) pays every visual token, aggregated over *all*
its layers, ranks the large model's visual tokens. Attach with ``pipeline.attach(model,
guide=small_model)``; the ``guide_model`` scorer reads ``state.signals.guide_attention(...)``.

The guide keeps SDPA: the inputs of its decoder layers are captured during one forward and each
layer's attention rows are recomputed through its adapter, as for the large model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tokenprune.adapters import get_adapter
from tokenprune.adapters.base import layer_hidden
from tokenprune.core.errors import PipelineRuntimeError
from tokenprune.core.state import Signals, TokenState
from tokenprune.runtime.sources import LayerAttentionSource


class GuideModel:
    """A guide VLM and what it saw: run once per prefill on the large model's inputs."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = get_adapter(model)
        if self.adapter.cross_attention_layers:
            raise TypeError(f"a guide model must be a decoder-only VLM; {self.adapter.family} is not")

    @torch.no_grad()
    def attention(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_inputs: dict[str, Any],
                  queries: str, heads: str) -> torch.Tensor:
        """(B, N) attention the guide's ``queries`` pay each token, heads reduced, summed over all its layers (those
        that attend, in a hybrid LLM)."""
        captured: dict[int, tuple[torch.Tensor, Any]] = {}

        def capture(i: int):
            def hook(module, args, kwargs):
                captured[i] = (layer_hidden(args, kwargs), kwargs.get("position_embeddings"))
            return hook

        try:
            extra = self.adapter.guide_inputs(input_ids, image_inputs)
        except ValueError as e:
            raise PipelineRuntimeError(f"the guide model: {e}") from None
        # every layer that attends (a hybrid guide's linear-attention layers have no attention to read)
        handles = [self.adapter.layers[i].register_forward_pre_hook(capture(i), with_kwargs=True)
                   for i in self.adapter.attending_layers()]
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        finally:
            for h in handles:
                h.remove()
        visual = self.adapter.visual_mask(input_ids)
        valid = attention_mask.bool()
        total = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
        for i in sorted(captured):
            hidden, pe = captured[i]
            state = TokenState.from_tensors(hidden, visual, valid_mask=valid)
            state.signals = Signals(state, source=LayerAttentionSource(self.adapter, i, hidden, pe, valid))
            total += state.signals.attention(queries=queries, heads=heads).to(total.device)
        return total


def guide_signal(guide: GuideModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 image_inputs: Callable[[], dict[str, Any] | None], visual: torch.Tensor):
    """A function ``(queries, heads) -> (B, N_input)`` that runs the guide on first use, for Signals.

    ``image_inputs()`` gives the images of this forward (captured from the large model's vision tower,
    which runs after the forward starts, or before it under ``generate()``).
    """
    guide_visual = guide.adapter.visual_mask(input_ids)
    if not torch.equal(guide_visual, visual):
        raise PipelineRuntimeError("the guide model marks different visual tokens in the same input_ids: it must "
                                   "tokenise the image the same way as the large model")
    memo: dict[tuple[str, str], torch.Tensor] = {}

    def signal(queries: str, heads: str) -> torch.Tensor:
        if (queries, heads) not in memo:  # once per prefill, however many stages ask
            images = image_inputs()
            if images is None:
                raise PipelineRuntimeError("the guide model needs the images, but none were captured from this forward")
            memo[queries, heads] = guide.attention(input_ids, attention_mask, images, queries, heads)
        return memo[queries, heads]

    return signal
