"""The runtime of a ``cross_attention`` stage (:class:`~tokenprune.core.sites.CrossAttentionSite`, Mllama).

The stage runs in the pre-hook of the first cross-attention layer, on the image features that layer reads,
scored by the attention of the text entering it (:class:`~tokenprune.runtime.sources.CrossAttentionSource`).
Every cross-attention layer then gets the kept features and a mask cut to them, in the prefill and, as a
mask over the cached cross-attention keys, in every decoding step (see docs/families.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import layer_hidden
from tokenprune.core.masks import gather_mask, gather_tokens, mask_key_columns, ragged_keep_index
from tokenprune.core.state import Signals, TokenState
from tokenprune.core.trace import StageTrace
from tokenprune.runtime.episode import CrossCut, Episode
from tokenprune.runtime.site import SiteRuntime, tile_cells
from tokenprune.runtime.sources import CrossAttentionSource
from tokenprune.runtime.stream import add_key_bias, cache_argument


class CrossAttentionRuntime(SiteRuntime):
    """Prunes the image features every cross-attention layer reads."""

    uses_decoder = False

    def install(self) -> list[Any]:
        cross = self.adapter.cross_attention_layers
        return [self.adapter.layers[i].register_forward_pre_hook(self._layer_hook(i, first=i == cross[0]),
                                                                  with_kwargs=True) for i in cross]

    def _layer_hook(self, layer: int, first: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            ep = self.attached.episode
            if ep is None:
                return None
            if ep.phase == "prefill":
                if not self.adapter.has_cross_attention_states(kwargs):
                    return None
                if ep.cache is None:  # the LLM made its own cache (use_cache without past_key_values)
                    ep.cache = cache_argument(kwargs)
                if first:
                    self._run(layer, ep, layer_hidden(args, kwargs), kwargs)
                if ep.cross is None:
                    return None
                self.adapter.set_cross_attention_inputs(kwargs, ep.cross.mask, image=ep.cross.image)
                return args, kwargs
            if ep.cross is None:
                return None
            if "cross" not in ep.decode_masks:
                mask = self.adapter.cross_attention_mask(kwargs)
                ep.decode_masks["cross"] = self._mask(ep.cross, mask, layer_hidden(args, kwargs))
            self.adapter.set_cross_attention_inputs(kwargs, ep.decode_masks["cross"])
            return args, kwargs

        return hook

    def _mask(self, cut: CrossCut, mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
        """The cross-attention mask (B, 1, Q, M) of the full image features, cut to the kept ones."""
        if mask is None:
            if cut.live is None and cut.bias is None:
                return None
            mask = torch.zeros(cut.index.shape[0], 1, hidden.shape[1], cut.index.shape[1], dtype=hidden.dtype,
                               device=hidden.device)
        else:
            mask = gather_mask(mask, None, cut.index)
        if cut.live is not None:
            mask = mask_key_columns(mask, cut.live)
        if cut.bias is not None:
            mask = add_key_bias(mask, cut.bias, hidden.dtype, self.adapter)
        return mask

    def _run(self, layer: int, ep: Episode, hidden: torch.Tensor, kwargs: dict) -> None:
        """Run the stage on the image features entering the first cross-attention layer."""
        b = hidden.shape[0]
        image, allowed = self.adapter.cross_attention_inputs(kwargs, hidden)
        m = image.shape[1]
        mask = self.adapter.cross_attention_mask(kwargs)
        allowed = allowed & ep.valid[:, :, None].to(allowed.device)  # and no padding row
        valid = allowed.any(dim=1)  # (B, M)
        idx = torch.arange(m, device=hidden.device).expand(b, m)
        state = TokenState(hidden=image, visual_mask=valid, valid_mask=valid, positions=idx, source_index=idx,
                           sizes=torch.ones(b, m, device=hidden.device), layer=layer)
        state.signals = Signals(state, source=CrossAttentionSource(self.adapter, layer, hidden, image, ep.visual,
                                                                   ep.valid, allowed))
        self.attached.cross_vision_signals(state)
        if self.stage.needs_tiles:
            tile_of, state.tile_grids = self.adapter.feature_tiles(b, m)
            state.tiles = tile_of.to(hidden.device)
        if self.stage.needs_frames:  # images only: every tile is a first frame
            state.frames = torch.where(state.tiles >= 0, 0, -1)
            state.cells = tile_cells(state.tiles)
        state, ms, by_op = self.run_operators(state, hidden)
        # Features no text token may see (padding tiles) are not visual, so selectors keep them: Mllama lets the
        # text rows before an image attend to every feature, so dropping them would change those rows.
        index, live = ragged_keep_index(state.keep_mask.to(device=hidden.device, dtype=torch.bool))
        sizes = gather_tokens(state.sizes.float(), index)
        cut = CrossCut(index, live, sizes.clamp_min(1e-6).log() if state.proportional_attention else None)
        cut.image = gather_tokens(state.hidden, index)
        cut.mask = self._mask(cut, mask, hidden)
        ep.cross = cut
        self.attached.pipeline.runs[self.index] += 1
        held = live if live is not None else torch.ones_like(index, dtype=torch.bool)
        after = valid.gather(1, index) & held
        # tokens_*: every image feature the cross-attention layers hold; visual_*: those some text token sees;
        # kept: indices into the sample's image features (tiles x patches, in the model's order).
        self.attached.pipeline.trace.append(StageTrace(
            stage=self.index, layer=layer,
            tokens_before=[m] * b, tokens_after=held.sum(1).tolist(),
            visual_before=valid.sum(1).tolist(), visual_after=after.sum(1).tolist(),
            kept=[row[h].tolist() for row, h in zip(index, held)],
            operator_ms=ms, operator_ms_by_op=by_op,
        ))
