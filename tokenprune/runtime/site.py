"""The protocol every site's runtime follows, and what site runtimes share: running a stage's operators
and tracing what it kept."""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.core.masks import ragged_keep_index
from tokenprune.core.stage import Stage
from tokenprune.core.state import TokenState
from tokenprune.core.trace import StageTrace
from tokenprune.runtime.episode import Episode
from tokenprune.runtime.timing import Stopwatch


def tile_cells(tile_of: torch.Tensor) -> torch.Tensor:
    """(B, N) long: each token's raster index within its tile (``tile_of`` (B, N), -1: in none), the tile's tokens
    being in raster order."""
    cell = torch.full_like(tile_of, -1)
    for b in range(tile_of.shape[0]):
        for t in tile_of[b].unique().tolist():
            if t >= 0:
                where = (tile_of[b] == t).nonzero().flatten()
                cell[b, where] = torch.arange(where.numel(), device=cell.device)
    return cell


class SiteRuntime:
    """One stage's part in a forward. The attached pipeline installs its hooks, and the decoder stream
    (:class:`~tokenprune.runtime.stream.DecoderStream`) calls it at each decoder layer; every method is
    optional.

    - :meth:`install` — hooks on modules of its own (cross-attention layers, a layer's query projection);
    - :meth:`prefill_layer` — a decoder layer's input in the prefill, before the layer's kwargs are gathered
      to the flowing tokens: a stage at that layer prunes it here;
    - :meth:`layer_ready` — the same layer's input and kwargs as the layer will run them (prefill);
    - :meth:`decode_layer` — a decoder layer's input in a decoding step, before its mask is built;
    - :meth:`after_forward` — the model's forward has returned.
    """

    #: Whether the decoder stream must run for this site (it gathers each layer's kwargs to the kept tokens).
    uses_decoder = True

    def __init__(self, index: int, stage: Stage, attached: Any):
        self.index = index  # the stage's position in the pipeline
        self.stage = stage
        self.attached = attached  # the AttachedPipeline: adapter, pipeline, and the vision/guide captures

    @property
    def adapter(self):
        return self.attached.adapter

    def install(self) -> list[Any]:
        return []

    def prefill_layer(self, layer: int, ep: Episode, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def layer_ready(self, layer: int, ep: Episode, hidden: torch.Tensor, kwargs: dict) -> None:
        pass

    def decode_layer(self, layer: int, ep: Episode, hidden: torch.Tensor, kwargs: dict) -> None:
        pass

    def after_forward(self, ep: Episode) -> None:
        pass

    # --- shared by the sites ---------------------------------------------------------------------
    def run_operators(self, state: TokenState, like: torch.Tensor, run=None) -> tuple[TokenState, float, dict[str, float]]:
        """Run the stage's operators on ``state`` (or ``run(state, clock=...)``, a part of the stage such as
        :meth:`Stage.score`): ``(state, ms in all of them, {"<i>:<op>": ms} when the pipeline times operators one
        by one)."""
        by_op: dict[str, float] = {}
        # no autograd graph, except while a learned operator of the stage trains (tokenprune train-operator)
        learning = torch.is_grad_enabled() and any(getattr(op, "learned", False) and op.training
                                                   for op in self.stage.operators)
        with torch.set_grad_enabled(learning), Stopwatch(like) as total:
            state = (run or self.stage)(state, clock=self.operator_clock(like, by_op))
        return state, total.ms, by_op

    def operator_clock(self, like: torch.Tensor, into: dict[str, float]):
        """``clock(i, op)`` for :meth:`Stage.select`: each operator timed into ``into`` under ``"<i>:<op>"`` when
        the pipeline times operators one by one, else None."""
        if not self.attached.pipeline.time_operators:
            return None
        return lambda i, op: Stopwatch(like, into=into, label=f"{i}:{op.op_name}")

    def stage_state(self, layer: int, hidden: torch.Tensor, ep: Episode, cur: torch.Tensor,
                    live: torch.Tensor | None, sizes: torch.Tensor | None, positions: torch.Tensor | None
                    ) -> tuple[TokenState, torch.Tensor]:
        """(state, visual tokens before the stage) over the tokens ``cur`` (B, K), input-frame indices."""
        b, n = cur.shape
        live = live if live is not None else torch.ones(b, n, dtype=torch.bool, device=hidden.device)
        protected = None
        if self.stage.protect:
            protected = torch.zeros_like(ep.visual)
            for kind in self.stage.protect:
                protected |= ep.kinds[kind]
            protected = protected.gather(1, cur) & live
        visual_before = ep.visual.gather(1, cur) & live
        state = TokenState(
            hidden=hidden,
            visual_mask=visual_before if protected is None else visual_before & ~protected,
            valid_mask=ep.valid.gather(1, cur) & live,
            positions=positions if positions is not None else ep.full.position_ids.gather(1, cur),
            source_index=cur,
            sizes=sizes if sizes is not None else torch.ones(b, n, device=hidden.device),
            layer=layer,
            grid=ep.grids,
            protected_mask=protected,
        )
        if self.stage.needs_tiles:
            tile_of, state.tile_grids = self.attached.tiles(ep)
            state.tiles = torch.where(live, tile_of.gather(1, cur), -1)
        if self.stage.needs_frames:
            frame_of, cell_of = self.attached.frames(ep)
            state.frames = torch.where(live, frame_of.gather(1, cur), -1)
            state.cells = torch.where(live, cell_of.gather(1, cur), -1)
        return state, visual_before

    def trace(self, ep: Episode, layer: int, valid_before: torch.Tensor, visual_before: torch.Tensor,
              index: torch.Tensor, live: torch.Tensor | None, **extra) -> None:
        """Record one run of the stage: counts before (given) and after (the tokens ``index`` with ``live``), and
        the kept real tokens per sample in input-frame indices."""
        valid_after = ep.real(index, live)
        self.attached.pipeline.trace.append(StageTrace(
            stage=self.index, layer=layer, tokens_before=valid_before.sum(1).tolist(),
            tokens_after=valid_after.sum(1).tolist(), visual_before=visual_before.sum(1).tolist(),
            visual_after=(ep.visual.gather(1, index) & valid_after).sum(1).tolist(),
            kept=[row[v].tolist() for row, v in zip(index, valid_after)], **extra))


def merges(merged_into: torch.Tensor | None, index: torch.Tensor) -> list[dict[int, int]]:
    """Per sample {merged token: target}, input-frame indices, from a stage's ``merged_into`` over ``index``."""
    if merged_into is None:
        return []
    out = []
    for row, idx in zip(merged_into.cpu(), index.cpu()):
        src = (row >= 0).nonzero().flatten()
        out.append(dict(zip(idx[src].tolist(), idx[row[src]].tolist())))
    return out


def keep_index(keep: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rel, live): the slots a stage keeps of each row — its kept *real* tokens (padding and fillers dropped),
    rows left-filled to the longest with masked filler slots (see :func:`~tokenprune.core.masks.ragged_keep_index`).
    After a stage the batch carries max(real kept tokens) slots, however much padding it came with."""
    return ragged_keep_index(keep.to(dtype=torch.bool, device=real.device) & real)
