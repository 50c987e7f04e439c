"""The runtime of a stage before decoder layer L (:class:`~tokenprune.core.sites.LayerSite`).

In the prefill, the stage runs in layer L's pre-hook on the tokens entering it. Its attention signals are
recomputed from layer L-1's input, captured one layer earlier (with the query projection that layer
computed in its own forward), so the model keeps SDPA. The kept tokens — each sample's kept *real* tokens,
padding dropped — flow on; samples that keep fewer are left-filled with masked filler slots. A compactor
may cut the caches of the layers before L to the same tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.core.errors import PipelineRuntimeError
from tokenprune.core.masks import gather_tokens
from tokenprune.core.positions import gather_axes, renumber_grid_positions, visual_runs
from tokenprune.core.sites import LayerSite
from tokenprune.core.state import TokenState
from tokenprune.runtime.episode import Episode
from tokenprune.runtime.site import SiteRuntime, keep_index, merges
from tokenprune.runtime.sources import LayerAttentionSource


class LayerSiteRuntime(SiteRuntime):
    """Runs one stage at its decoder layer."""

    @property
    def layer(self) -> int:
        site = self.stage.site
        assert isinstance(site, LayerSite)
        return site.layer

    def install(self) -> list[Any]:
        if self.layer < 1:
            return []
        projection = self.adapter.query_projection(self.layer - 1)
        return [] if projection is None else [projection.register_forward_hook(self._query_capture_hook)]

    def _query_capture_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Keep the query projection that layer L-1 computes in its own forward: the stage's attention signals
        then gather the queries they need instead of projecting them again (at thousands of visual queries and
        a 7B model's width, that projection costs as much as the products themselves)."""
        ep = self.attached.episode
        if ep is not None and ep.capture is not None and ep.capture.layer == self.layer - 1 \
                and isinstance(output, torch.Tensor):
            ep.capture.queries = output

    def prefill_layer(self, layer: int, ep: Episode, hidden: torch.Tensor) -> torch.Tensor:
        if layer != self.layer:
            return hidden
        flow = ep.flow
        b, n = hidden.shape[:2]
        cur = flow.index if flow.index is not None else torch.arange(n, device=hidden.device).expand(b, n)
        live = flow.live if flow.live is not None else torch.ones(b, n, dtype=torch.bool, device=hidden.device)
        state, visual_before = self.stage_state(layer, hidden, ep, cur, live, flow.sizes, flow.positions)
        capture = ep.capture
        if capture is not None and capture.layer == layer - 1:
            state.signals.source = LayerAttentionSource(
                self.adapter, layer - 1, capture.hidden, capture.position_embeddings, state.valid_mask,
                cached_keys=self.adapter.cached_keys(ep.cache, layer - 1), projected_queries=capture.queries,
                window=self.adapter.sliding_window(layer - 1), source_index=cur,
                blocks=None if ep.blocks is None else ep.blocks.gather(1, cur))
        self.attached.vision_signals(state, ep)
        state, ms, by_op = self.run_operators(state, hidden)
        rel, new_live = keep_index(state.keep_mask, state.valid_mask)
        new_index = cur.gather(1, rel)
        hidden = gather_tokens(state.hidden, rel)
        if state.compact_kv_before_site:
            self._compact_earlier_layers(layer, new_index, new_live, ep, state.compact_kv_from)
        ep.flow.index, ep.flow.live = new_index, new_live
        self._carry_token_data(ep, state, rel)
        self.attached.pipeline.runs[self.index] += 1
        self.trace(ep, layer, state.valid_mask, visual_before, new_index, new_live, operator_ms=ms,
                   merged_into=merges(state.merged_into, cur), operator_ms_by_op=by_op,
                   tiles=[list(g) for g in state.tile_grids] if state.tile_grids is not None else [])
        return hidden

    def _carry_token_data(self, ep: Episode, state: TokenState, rel: torch.Tensor) -> None:
        """Positions, sizes and the proportional-attention bias of the surviving tokens."""
        flow = ep.flow
        pos = gather_tokens(state.positions, rel)
        if flow.rope_positions is not None:  # multi-axis positions an earlier stage renumbered: the kept ones'
            flow.rope_positions = gather_axes(flow.rope_positions, rel)
        if self.stage.positions == "renumber":
            # Contiguous from the sequence's first position; decoding then continues right after the last
            # kept token, i.e. every full-frame position shifts down by the number of tokens removed so far.
            full_pos, full_valid = ep.full.position_ids, ep.valid
            first = full_pos.masked_fill(~full_valid, torch.iinfo(full_pos.dtype).max).amin(1)
            valid = ep.valid_now()
            pos = torch.where(valid, first[:, None] + valid.long().cumsum(1) - 1, pos)
            flow.pos_shift = (full_valid.sum(1) - valid.sum(1)).to(pos.dtype)
            if self.adapter.rope_axes > 1:
                self._renumber_rope(ep, valid)
            flow.renumbered = True
        flow.positions = pos
        flow.sizes = gather_tokens(state.sizes.float(), rel)
        if state.proportional_attention or flow.key_bias is not None:
            flow.key_bias = flow.sizes.clamp_min(1e-6).log()

    def _renumber_rope(self, ep: Episode, valid: torch.Tensor) -> None:
        """Multi-axis (M-RoPE) renumbering of the flowing tokens, as :mod:`tokenprune.core.positions` defines it."""
        flow, full = ep.flow, ep.rope_prefill
        if full is None:
            raise PipelineRuntimeError(f"positions: renumber on {self.adapter.family} needs the multi-axis positions "
                                       "the model passes its LLM; this forward passed none")
        full = full.expand(-1, ep.visual.shape[0], -1)
        kept = flow.rope_positions if flow.rope_positions is not None else gather_axes(full, flow.index)
        runs = visual_runs(ep.visual).gather(1, flow.index)
        flow.rope_positions, nxt = renumber_grid_positions(kept, runs, valid)
        unpruned = full.masked_fill(~ep.valid[None], torch.iinfo(full.dtype).min).amax(dim=(0, 2)) + 1
        flow.pos_shift = (unpruned - nxt).to(flow.pos_shift.dtype)

    def _compact_earlier_layers(self, layer: int, new_index: torch.Tensor, new_live: torch.Tensor | None,
                                ep: Episode, first: int = 0) -> None:
        if ep.cache is None:
            return
        for j in range(first, layer):
            if self.adapter.cached_keys(ep.cache, j) is None:
                continue
            held = ep.held_at(j).index
            # ``held`` is sorted; filler slots repeat the first kept token before it, so take the last match.
            rel = new_index if held is None else torch.searchsorted(held, new_index, right=True) - 1
            ep.cut(self.adapter, j, rel, new_index, new_live)
