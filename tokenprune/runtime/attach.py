"""Running a pipeline inside a stock Hugging Face forward, with forward pre-hooks only.

How it rides the forward (see docs/concepts.md):

- a pre-hook on the whole model reads ``input_ids`` (to find the visual tokens) and the 2-D padding
  mask, and tells a prefill (empty cache) from a decoding step;
- a pre-hook on decoder layer L runs the stage at L and gathers the hidden states to the kept
  tokens; the pre-hooks of every layer >= L gather the rotary cos/sin, the position ids and the
  mask, which the LLM built once for the full sequence. Kept tokens keep their original positions;
- layers >= L therefore cache only kept tokens; while decoding, their mask's key columns become
  ``cat(kept, prefill_len..total_len)``. A compactor may trim the cache of earlier layers too.

Scores that need attention are recomputed for the few query rows that matter from the previous
layer's input (see :class:`~tokenprune.runtime.sources.LayerAttentionSource`), so the model keeps SDPA.

When the samples of a batch keep different numbers of tokens, the shorter ones are left-filled with
masked filler slots (``_Episode.live``). A ``cross_attention`` stage (Mllama) instead runs in the
pre-hook of the first cross-attention layer and hands every cross-attention layer the kept image
features and a mask cut to them (see docs/families.md).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from tokenprune.adapters import ModelAdapter, get_adapter
from tokenprune.core.budget import keep_top_visual, resolve_keep
from tokenprune.core.errors import ConfigError, PipelineRuntimeError
from tokenprune.core.kv_cache import adaptive_weights, allocate, flatten_entries, unflatten_entries
from tokenprune.core.masks import (
    decode_key_index,
    expand_batch,
    full_causal_mask,
    gather_mask,
    gather_tokens,
    mask_key_columns,
    ragged_keep_index,
)
from tokenprune.core.stage import Stage
from tokenprune.core.state import Signals, TokenState
from tokenprune.core.trace import StageTrace
from tokenprune.runtime.guide import GuideModel, guide_signal
from tokenprune.runtime.sources import CachedKeys, CrossAttentionSource, LayerAttentionSource, VisionSource


def _cache_kwarg(kwargs: dict) -> Any:
    """The KV cache a forward was given: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


@dataclass
class _Capture:
    layer: int
    hidden: torch.Tensor
    position_embeddings: Any
    queries: torch.Tensor | None = None  # the layer's query projection of ``hidden``, from its own forward


class _Episode:
    """Bookkeeping of one sequence, from its prefill through its decoding steps."""

    def __init__(self, cache: Any, visual: torch.Tensor, valid: torch.Tensor):
        self.cache = cache
        self.visual = visual  # (B, N) bool, in the input frame
        self.valid = valid  # (B, N) bool
        self.prefill_len = visual.shape[1]
        self.seen = 0  # tokens fed so far, in the full (unpruned) frame
        self.phase = "prefill"
        self.query_len = visual.shape[1]
        self.index: torch.Tensor | None = None  # (B, K) input-frame indices of the tokens flowing now
        # (B, K) False on filler slots: when samples keep different numbers of tokens, the shorter ones are
        # left-filled with copies of their first kept token, masked out as keys everywhere (None: no filler).
        self.live: torch.Tensor | None = None
        self.layer_index: dict[int, torch.Tensor | None] = {}  # what each layer's prefill cache holds
        self.layer_live: dict[int, torch.Tensor | None] = {}
        self.full: dict[str, Any] = {}  # full-frame layer kwargs of the prefill
        self.frame: tuple[torch.Tensor, dict[str, Any]] | None = None
        self.capture: _Capture | None = None
        self.short_first_cache = False
        self.decode_masks: dict[int, torch.Tensor] = {}
        # Per token now flowing (aligned with ``index``): position ids, sizes, log-size attention bias.
        self.positions: torch.Tensor | None = None
        self.renumbered = False
        self.sizes: torch.Tensor | None = None
        self.key_bias: torch.Tensor | None = None
        self.pos_shift: torch.Tensor | None = None  # (B,) tokens removed by renumbering stages so far
        # What each layer's prefill cache holds beyond its token index: bias and position shift.
        self.layer_bias: dict[int, torch.Tensor | None] = {}
        self.layer_shift: dict[int, torch.Tensor | None] = {}
        self.decode_pe: dict[int, Any] = {}
        self.grids: list[tuple[int, int] | None] | None = None  # per sample, from the adapter
        self.positions_given = True  # whether the LLM passed position_ids to its layers
        self.kinds: dict[str, torch.Tensor] = {}  # (B, N) masks of the adapter's token kinds, input frame
        # At a cross_attention site: kept image-feature index (B, K), filler liveness, log-size bias, and the
        # pruned features and mask every cross-attention layer receives in the prefill.
        self.cross: dict[str, Any] | None = None
        self.patch_of: torch.Tensor | None = None  # (B, N) row of each visual token in the vision features
        self.guide: Any = None  # (queries, heads) -> (B, N) attention of the guide model, run on first use
        # kv_cache stage: per compressed layer, what its scorers gave in the prefill (scores, frame); and the
        # decoding step now running (1 = the first forward after the prefill).
        self.kv: dict[int, dict[str, Any]] = {}
        self.decode_step = 0
        self.decode_scores: torch.Tensor | None = None  # (B, N_prefill) of decode.score_layer, this step
        self.kv_pending: dict[int, tuple[torch.Tensor, Any]] = {}  # layer input and rotary, until it has run

    def valid_now(self) -> torch.Tensor:
        """(B, K) real (not padding, not filler) tokens among those flowing now."""
        valid = self.valid.gather(1, self.index)
        return valid if self.live is None else valid & self.live


class RunnablePipeline(Protocol):
    """What the runtime reads and writes of a :class:`~tokenprune.pipeline.Pipeline`."""

    stages: Sequence[Stage]
    name: str
    trace: list[StageTrace]
    runs: list[int]
    time_operators: bool


class AttachedPipeline:
    """Context manager returned by :meth:`Pipeline.attach`; removes its hooks on exit, always."""

    def __init__(self, pipeline: RunnablePipeline, model: nn.Module, guide: nn.Module | None = None):
        self.pipeline = pipeline
        self.model = model
        self.adapter: ModelAdapter = get_adapter(model)
        pipeline.validate_for_depth(self.adapter.num_layers)
        self.adapter.validate_pipeline(pipeline)
        needs_guide = [(s.key, j, op) for s in pipeline.stages for j, op in enumerate(s.operators)
                       if getattr(op, "needs_guide", False)]
        if needs_guide and guide is None:
            key, j, op = needs_guide[0]
            raise ConfigError(f"{key}.operators.{j}.op", f"{op.op_name!r} needs a guide model: "
                              "pipeline.attach(model, guide=small_model)")
        self._guide = GuideModel(guide) if guide is not None and needs_guide else None
        self._tower_inputs: dict[str, Any] | None = None  # the images of the latest tower call, for the guide
        self._cross_site = any(stage.cross_attention for stage in pipeline.stages)
        layer_stages = [(i, stage) for i, stage in enumerate(pipeline.stages)
                        if not stage.cross_attention and not stage.kv_cache]
        self._kv_i = next((i for i, stage in enumerate(pipeline.stages) if stage.kv_cache), None)
        self._kv_layers: set[int] = set()
        kv = pipeline.stages[self._kv_i] if self._kv_i is not None else None
        if kv is not None:
            self._kv_layers = set(kv.cache.layer_list(self.adapter.num_layers, f"stages.{self._kv_i}.cache"))
        self._kv_decode_steps = set(kv.cache.decode.steps) if kv is not None else set()
        self._site = {stage.layer: i for i, stage in layer_stages}
        self._capture_layers = {stage.layer - 1 for _, stage in layer_stages if stage.layer >= 1}
        self._handles: list[Any] = []
        self._episode: _Episode | None = None
        self._forwards = 0
        # Inputs of the vision tower's layers in its latest forward (generate() runs the tower before the
        # prefill forward, so these are kept outside any episode), for vision-tower signals.
        self._vision_inputs: dict[int, torch.Tensor] = {}
        self._vision_unavailable = self.adapter.vision_signals_unavailable()

    # --- context manager ---------------------------------------------------------------------
    def __enter__(self) -> AttachedPipeline:
        if self._handles:
            raise RuntimeError("this AttachedPipeline is already active")
        self.pipeline.trace = []
        self.pipeline.runs = [0] * len(self.pipeline.stages)
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._model_post_hook, with_kwargs=True))
            if self._cross_site:
                cross = self.adapter.cross_attention_layers
                for i in cross:
                    hook = self._cross_layer_hook(i, first=i == cross[0])
                    self._handles.append(self.adapter.layers[i].register_forward_pre_hook(hook, with_kwargs=True))
            else:
                if self._guide is not None:
                    self._handles.append(self.adapter.vision_tower().register_forward_pre_hook(
                        self._tower_hook, with_kwargs=True))
                if self._vision_unavailable is None:
                    for i, layer in enumerate(self.adapter.vision_layers()):
                        self._handles.append(layer.register_forward_pre_hook(self._vision_hook(i), with_kwargs=True))
                self._handles.append(self.adapter.language_model.register_forward_pre_hook(self._llm_pre_hook,
                                                                                           with_kwargs=True))
                for i, layer in enumerate(self.adapter.layers):
                    self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
                    projection = self.adapter.query_projection(i) if i in self._capture_layers else None
                    if projection is not None:
                        self._handles.append(projection.register_forward_hook(self._query_capture_hook(i)))
                    if i in self._kv_layers:
                        self._handles.append(layer.register_forward_hook(self._kv_layer_post_hook(i)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove()
        if exc_type is None and self._forwards and not any(self.pipeline.runs):
            warnings.warn(
                f"pipeline {self.pipeline.name!r} never pruned: none of {self._forwards} forward(s) held visual "
                f"tokens in a prefill (is the image token in input_ids?)", RuntimeWarning, stacklevel=2)

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._episode = None
        self._vision_inputs = {}

    def _tower_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._tower_inputs = self.adapter.image_inputs_from_tower(args, kwargs)

    def _vision_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if layer == 0:
                self._vision_inputs = {}
            self._vision_inputs[layer] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _vision_source(self, ep: _Episode) -> VisionSource | None:
        if self._vision_unavailable is not None or not self._vision_inputs:
            return None
        if ep.patch_of is None:
            ep.patch_of = self.adapter.vision_patch_map(ep.visual)
        rows = int((ep.patch_of >= 0).sum())
        first = self._vision_inputs[min(self._vision_inputs)]
        per_image = rows // max(first.shape[0], 1)
        if per_image * first.shape[0] != rows:
            raise PipelineRuntimeError(f"the vision tower saw {first.shape[0]} images but the prompt holds {rows} "
                                       "visual tokens, not a whole number per image")
        return VisionSource(self.adapter, self._vision_inputs, ep.patch_of, len(self.adapter.vision_layers()))

    # --- hooks -------------------------------------------------------------------------------
    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._forwards += 1
        input_ids = self.adapter.input_ids(args, kwargs)
        cache = _cache_kwarg(kwargs)
        past = self.adapter.cache_length(cache)
        if input_ids is None:
            if past == 0 and kwargs.get("inputs_embeds") is not None:
                raise PipelineRuntimeError("a pipeline needs input_ids to find the visual tokens; got only inputs_embeds")
            self._episode = None
            return
        visual = self.adapter.visual_mask(input_ids)
        if past == 0:
            self._episode = None
            if bool(visual.any()):
                mask = kwargs.get("attention_mask")
                valid = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else torch.ones_like(visual)
                self._episode = _Episode(cache, visual, valid)
                self._episode.grids = self.adapter.visual_grids(kwargs, visual)
                if self._guide is not None:
                    self._episode.guide = guide_signal(self._guide, input_ids, valid.long(), lambda: self._tower_inputs,
                                                       visual)
                self.pipeline.trace = []
            return
        ep = self._episode
        if bool(visual.any()) and self.adapter.has_image_inputs(kwargs):
            raise PipelineRuntimeError("images after the prefill (a cached continuation with new images) are not supported")
        # (an image token id generated while decoding, with no image inputs, is just a text token to the model)
        if ep is None or ep.cache is not cache:
            self._episode = None
            return
        ep.phase = "decode"
        ep.query_len = input_ids.shape[1]
        ep.decode_masks = {}
        ep.decode_pe = {}
        ep.decode_step += 1
        ep.decode_scores = None

    def _model_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ep = self._episode
        if ep is not None and ep.phase == "prefill" and ep.kv:
            self._compress_kv(ep)
        if ep is not None:
            ep.seen += ep.query_len
            ep.capture = None
            ep.frame = None

    def _llm_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        ep = self._episode
        if ep is None or ep.phase != "decode" or not ep.short_first_cache:
            return None
        # The first layer's cache holds only kept tokens, so the LLM would size its mask and positions from a
        # short cache: hand it the full-frame mask and positions instead; each layer then gathers.
        embeds = kwargs.get("inputs_embeds")
        q = embeds.shape[1]
        total = ep.seen + q
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(embeds.shape[0], total, dtype=torch.long, device=embeds.device)
        if mask.dim() == 2:
            if mask.shape[1] != total:
                raise PipelineRuntimeError(f"attention_mask has {mask.shape[1]} columns; expected {total} (all tokens so far)")
            if self.adapter.mask_format == "2d":
                raise PipelineRuntimeError("trimming the first layer's cache is not supported with FlashAttention yet")
            kwargs["attention_mask"] = full_causal_mask(mask, q, self.adapter.mask_format, embeds.dtype)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = (ep.seen + torch.arange(q, device=embeds.device))[None]
        return args, kwargs

    def _layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            ep = self._episode
            if ep is None:
                return None
            if ep.phase == "decode":
                if layer in self._kv_layers and ep.decode_step in self._kv_decode_steps:
                    self._decode_reprune(layer, ep, args[0] if args else kwargs["hidden_states"], kwargs)
                return self._decode_layer(layer, ep, args, kwargs)
            return self._prefill_layer(layer, ep, args, kwargs)

        return hook

    # --- prefill -----------------------------------------------------------------------------
    def _prefill_layer(self, layer: int, ep: _Episode, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not ep.full:
            ep.kinds = self.adapter.mark_token_kinds(hidden, ep.visual)
            if ep.cache is None:  # the LLM made its own cache (use_cache without past_key_values)
                ep.cache = _cache_kwarg(kwargs)
            b, n = ep.visual.shape
            pos = kwargs.get("position_ids")
            ep.positions_given = pos is not None
            if pos is None:
                pos = torch.arange(n, device=hidden.device)[None]
            ep.full = {
                "position_ids": expand_batch(pos, b),
                "position_embeddings": kwargs.get("position_embeddings"),
                "attention_mask": kwargs.get("attention_mask"),
            }
        stage_i = self._site.get(layer)
        if stage_i is not None:
            hidden = self._run_stage(stage_i, layer, hidden, ep)
        if ep.index is not None:
            kwargs.update(self._frame_kwargs(ep, hidden))
        if layer in self._kv_layers:  # scored in the layer's forward hook, once its keys are in the cache
            ep.kv_pending[layer] = (hidden, kwargs.get("position_embeddings"))
        ep.layer_index[layer] = ep.index
        ep.layer_live[layer] = ep.live
        ep.layer_bias[layer] = ep.key_bias
        ep.layer_shift[layer] = ep.pos_shift
        if layer == 0 and ep.index is not None:  # a stage before the LLM: every cache is short
            ep.short_first_cache = True
        if layer in self._capture_layers:
            ep.capture = _Capture(layer, hidden, kwargs.get("position_embeddings"))
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _query_capture_hook(self, layer: int):
        """Keep the query projection that ``layer`` computes in its own forward, for the stage after it: its
        attention signals then gather the queries they need instead of projecting them again (at thousands of
        visual queries and a 7B model's width, that projection costs as much as the products themselves)."""
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            ep = self._episode
            if ep is not None and ep.capture is not None and ep.capture.layer == layer and isinstance(output, torch.Tensor):
                ep.capture.queries = output
        return hook

    def _frame_kwargs(self, ep: _Episode, hidden: torch.Tensor) -> dict[str, Any]:
        """Full-frame layer kwargs gathered to the tokens now flowing (computed once per stage)."""
        if ep.frame is not None and ep.frame[0] is ep.index:
            return ep.frame[1]
        idx = ep.index
        pe = ep.full["position_embeddings"]
        if ep.renumbered:
            out: dict[str, Any] = {"position_ids": ep.positions}
            if pe is not None:
                out["position_embeddings"] = self.adapter.rotary_embeddings(hidden, ep.positions)
        else:
            out = {"position_ids": ep.full["position_ids"].gather(1, idx)} if ep.positions_given else {}
            if pe is not None:
                out["position_embeddings"] = tuple(gather_tokens(t, idx) for t in pe)
        mask = ep.full["attention_mask"]
        mask = gather_mask(mask, idx if mask is not None and mask.dim() == 4 else None, idx)
        if mask is None and (ep.key_bias is not None or ep.live is not None):
            mask = full_causal_mask(ep.valid_now(), idx.shape[1], "bool", hidden.dtype)
        elif ep.live is not None:
            mask = mask_key_columns(mask, ep.live)
        if ep.key_bias is not None:
            mask = self._add_key_bias(mask, ep.key_bias, hidden.dtype)
        out["attention_mask"] = mask
        ep.frame = (idx, out)
        return out

    def _add_key_bias(self, mask: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An additive 4-D mask: ``mask`` (bool or additive) plus ``bias`` (B, K) on its first K key columns."""
        if mask.dim() != 4:
            raise PipelineRuntimeError("proportional attention needs SDPA or eager attention (a 4-D mask); "
                                       f"this model runs {self.adapter.attn_implementation}")
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        pad = mask.shape[-1] - bias.shape[1]
        full = torch.nn.functional.pad(bias.to(mask.dtype), (0, pad))
        return mask + full[:, None, None, :]

    def _stage_state(self, stage, layer: int, hidden: torch.Tensor, ep: _Episode, cur: torch.Tensor,
                     live: torch.Tensor | None, sizes: torch.Tensor | None, positions: torch.Tensor | None):
        """(state, visual tokens before the stage) over the tokens ``cur`` (B, K), input-frame indices."""
        b, n = cur.shape
        live = live if live is not None else torch.ones(b, n, dtype=torch.bool, device=hidden.device)
        protected = None
        if stage.protect:
            protected = torch.zeros_like(ep.visual)
            for kind in stage.protect:
                protected |= ep.kinds[kind]
            protected = protected.gather(1, cur) & live
        visual_before = ep.visual.gather(1, cur) & live
        state = TokenState(
            hidden=hidden,
            visual_mask=visual_before if protected is None else visual_before & ~protected,
            valid_mask=ep.valid.gather(1, cur) & live,
            positions=positions if positions is not None else ep.full["position_ids"].gather(1, cur),
            source_index=cur,
            sizes=sizes if sizes is not None else torch.ones(b, n, device=hidden.device),
            layer=layer,
            grid=ep.grids,
            protected_mask=protected,
        )
        return state, visual_before

    def _run_operators(self, stage, state: TokenState, like: torch.Tensor):
        """Run a stage's operators: ``(state, clock of all of them, {"<i>:<op>": ms} when time_operators)``."""
        by_op: dict[str, float] = {}
        op_clock = None
        if self.pipeline.time_operators:
            def op_clock(i: int, op: nn.Module) -> _Stopwatch:
                return _Stopwatch(like, into=by_op, label=f"{i}:{op.op_name}")
        with torch.no_grad(), _Stopwatch(like) as clock:
            state = stage(state, clock=op_clock)
        return state, clock, by_op

    def _run_stage(self, stage_i: int, layer: int, hidden: torch.Tensor, ep: _Episode) -> torch.Tensor:
        stage = self.pipeline.stages[stage_i]
        b, n = hidden.shape[:2]
        cur = ep.index if ep.index is not None else torch.arange(n, device=hidden.device).expand(b, n)
        live = ep.live if ep.live is not None else torch.ones(b, n, dtype=torch.bool, device=hidden.device)
        state, visual_before = self._stage_state(stage, layer, hidden, ep, cur, live, ep.sizes, ep.positions)
        capture = ep.capture
        if capture is not None and capture.layer == layer - 1:
            state.signals.source = LayerAttentionSource(
                self.adapter, layer - 1, capture.hidden, capture.position_embeddings, state.valid_mask,
                cached_keys=self.adapter.cached_keys(ep.cache, layer - 1), projected_queries=capture.queries)
        state.signals.vision = self._vision_source(ep)
        state.signals.vision_unavailable = self._vision_unavailable
        state.signals.guide = ep.guide
        state, clock, by_op = self._run_operators(stage, state, hidden)
        keep = state.keep_mask.to(device=hidden.device, dtype=torch.bool) & live
        rel, new_live = ragged_keep_index(keep)
        new_index = cur.gather(1, rel)
        hidden = gather_tokens(state.hidden, rel)
        if state.compact_kv_before_site:
            self._compact_earlier_layers(layer, new_index, new_live, ep)
        ep.index = new_index
        ep.live = new_live
        self._carry_token_data(ep, stage.positions, state, rel)
        self.pipeline.runs[stage_i] += 1
        self.pipeline.trace.append(_trace(ep, stage_i, layer, state.valid_mask, visual_before, new_index, ep.live,
                                          operator_ms=clock.ms, merged_into=_merges(state.merged_into, cur),
                                          operator_ms_by_op=by_op))
        return hidden

    def _carry_token_data(self, ep: _Episode, positions: str, state: TokenState, rel: torch.Tensor) -> None:
        """Positions, sizes and the proportional-attention bias of the surviving tokens."""
        pos = gather_tokens(state.positions, rel)
        if positions == "renumber":
            # Contiguous from the sequence's first position; decoding then continues right after the last
            # kept token, i.e. every full-frame position shifts down by the number of tokens removed so far.
            full_pos, full_valid = ep.full["position_ids"], ep.valid
            first = full_pos.masked_fill(~full_valid, torch.iinfo(full_pos.dtype).max).amin(1)
            valid = ep.valid_now()
            pos = torch.where(valid, first[:, None] + valid.long().cumsum(1) - 1, pos)
            ep.pos_shift = (full_valid.sum(1) - valid.sum(1)).to(pos.dtype)
            ep.renumbered = True
        ep.positions = pos
        ep.sizes = gather_tokens(state.sizes.float(), rel)
        if state.proportional_attention or ep.key_bias is not None:
            ep.key_bias = ep.sizes.clamp_min(1e-6).log()

    def _compact_earlier_layers(self, layer: int, new_index: torch.Tensor, new_live: torch.Tensor | None,
                                ep: _Episode) -> None:
        if ep.cache is None:
            return
        for j in range(layer):
            if self.adapter.cached_keys(ep.cache, j) is None:
                continue
            held = ep.layer_index.get(j)
            # ``held`` is sorted; filler slots repeat the first kept token before it, so take the last match.
            rel = new_index if held is None else torch.searchsorted(held, new_index, right=True) - 1
            self.adapter.select_cache_entries(ep.cache, j, rel)
            ep.layer_index[j] = new_index
            ep.layer_live[j] = new_live
            if j == 0:
                ep.short_first_cache = True

    # --- the kv_cache site -------------------------------------------------------------------
    def _kv_layer_post_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            ep = self._episode
            if ep is not None and ep.phase == "prefill" and layer in ep.kv_pending:
                hidden, pe = ep.kv_pending.pop(layer)
                self._score_kv_layer(layer, hidden, pe, ep)

        return hook

    def _score_kv_layer(self, layer: int, hidden: torch.Tensor, position_embeddings: Any, ep: _Episode) -> None:
        """Run the kv_cache stage's shifts and scorers on the tokens ``layer`` has just cached, with the layer's
        own attention: its cached keys, and queries recomputed from its input for the rows asked for."""
        stage = self.pipeline.stages[self._kv_i]
        b, n = hidden.shape[:2]
        cur = ep.index if ep.index is not None else torch.arange(n, device=hidden.device).expand(b, n)
        state, _ = self._stage_state(stage, layer, hidden, ep, cur, ep.live, ep.sizes, ep.positions)
        state.signals.source = LayerAttentionSource(self.adapter, layer, hidden, position_embeddings, state.valid_mask,
                                                    cached_keys=self.adapter.cached_keys(ep.cache, layer))
        with torch.no_grad(), _Stopwatch(hidden) as clock:
            for op in stage.score_operators():
                state = op(state)
        ep.kv[layer] = {"scores": state.scores, "named": dict(state.named_scores), "index": cur, "live": ep.live,
                        "sizes": state.sizes, "positions": state.positions, "ms": clock.ms}

    def _compress_kv(self, ep: _Episode) -> None:
        """After the prefill: select (and merge) each compressed layer's cached entries and cut its cache."""
        stage_i = self._kv_i
        stage = self.pipeline.stages[stage_i]
        if ep.cache is None:  # a forward without a cache (use_cache=False): nothing to compress
            ep.kv = {}
            return
        layers = sorted(ep.kv)
        budgets = self._adaptive_budgets(stage, layers, ep) if stage.cache.budget == "adaptive" else None
        for li, layer in enumerate(layers):
            rec = ep.kv[layer]
            keys = self.adapter.cached_keys(ep.cache, layer)
            if keys is None:
                raise PipelineRuntimeError(f"{stage.key}: layer {layer} has no KV cache after the prefill "
                                           "(generate(..., use_cache=True) keeps one)")
            values = ep.cache.layers[layer].values
            cur = rec["index"]
            if keys.shape[2] != cur.shape[1]:
                raise PipelineRuntimeError(f"{stage.key}: layer {layer} caches {keys.shape[2]} entries but "
                                           f"{cur.shape[1]} tokens entered it")
            heads, head_dim = keys.shape[1], keys.shape[3]
            flat = flatten_entries(keys, values)
            state, visual_before = self._stage_state(stage, layer, flat, ep, cur, rec["live"], rec["sizes"],
                                                     rec["positions"])
            state.scores, state.named_scores = rec["scores"], dict(rec["named"])
            state.signals.source = CachedKeys(keys)
            with torch.no_grad(), _Stopwatch(flat) as clock:
                ops = stage.select_operators()
                if budgets is not None:  # adaptive: the topk selector with this layer's per-sample budget
                    state.keep_mask = keep_top_visual(state.score_set(ops[0].params.scores), state.visual_mask,
                                                   budgets[:, li])
                    ops = ops[1:]
                for op in ops:
                    state = op(state)
            live = rec["live"] if rec["live"] is not None else torch.ones_like(cur, dtype=torch.bool)
            keep = state.keep_mask.to(dtype=torch.bool, device=cur.device) & live
            rel, new_live = ragged_keep_index(keep)
            if any(op.kind == "merger" for op in stage.select_operators()):
                k, v = unflatten_entries(gather_tokens(state.hidden, rel), heads, head_dim)
                self.adapter.set_cache_entries(ep.cache, layer, k.to(keys.dtype), v.to(values.dtype))
            else:
                self.adapter.select_cache_entries(ep.cache, layer, rel)
            new_index = cur.gather(1, rel)
            old_bias = ep.layer_bias.get(layer)
            if state.proportional_attention:
                ep.layer_bias[layer] = gather_tokens(state.sizes.float(), rel).clamp_min(1e-6).log()
            elif old_bias is not None:
                ep.layer_bias[layer] = gather_tokens(old_bias, rel)
            ep.layer_index[layer] = new_index
            ep.layer_live[layer] = new_live
            if layer == 0:
                ep.short_first_cache = True
            self.pipeline.trace.append(_trace(ep, stage_i, layer, state.valid_mask, visual_before, new_index, new_live,
                                              site="kv_cache", operator_ms=rec["ms"] + clock.ms,
                                              merged_into=_merges(state.merged_into, cur)))
        self.pipeline.runs[stage_i] += 1
        ep.kv = {}

    def _adaptive_budgets(self, stage, layers: list[int], ep: _Episode) -> torch.Tensor:
        """(B, L) visual entries each compressed layer keeps per sample: the topk's budget times the number of
        layers, shared out by :func:`~tokenprune.core.kv_cache.adaptive_weights`."""
        sel = stage.selector
        b = ep.visual.shape[0]
        out = torch.zeros(b, len(layers), dtype=torch.long)
        for i in range(b):
            vis_scores, caps = [], []
            for layer in layers:
                rec = ep.kv[layer]
                cur = rec["index"][i]
                live = rec["live"][i] if rec["live"] is not None else torch.ones_like(cur, dtype=torch.bool)
                vis = ep.visual[i].gather(0, cur) & ep.valid[i].gather(0, cur) & live
                if stage.protect:
                    for kind in stage.protect:
                        vis &= ~ep.kinds[kind][i].gather(0, cur)
                scores = rec["named"][sel.params.scores] if sel.params.scores else rec["scores"]
                vis_scores.append(scores[i][vis])
                caps.append(int(vis.sum()))
            total = sum(resolve_keep(sel.params.keep, c) for c in caps)
            out[i] = torch.tensor(allocate(adaptive_weights(vis_scores), total, caps))
        return out

    def _decode_reprune(self, layer: int, ep: _Episode, hidden: torch.Tensor, kwargs: dict) -> None:
        """Decoding-time re-pruning (MINT): keep the held visual entries of ``layer``'s cache that the current
        token attends to most (at this layer, or at ``decode.score_layer``)."""
        stage = self.pipeline.stages[self._kv_i]
        dec = stage.cache.decode
        keys = self.adapter.cached_keys(ep.cache, layer)
        if keys is None:
            return
        b, _, t, _ = keys.shape
        held = ep.layer_index.get(layer)
        if held is None:
            held = torch.arange(ep.prefill_len, device=keys.device).expand(b, ep.prefill_len)
        live = ep.layer_live.get(layer)
        k_p = held.shape[1]
        valid = ep.valid.gather(1, held) & (live if live is not None else True)
        if dec.score_layer is None or layer == dec.score_layer:
            pe = (kwargs.get("position_embeddings") if ep.layer_shift.get(layer) is None
                  else self._shifted_decode_positions(layer, ep, hidden, kwargs)[1])
            with torch.no_grad():
                q = self.adapter.project_queries(layer, hidden, pe, torch.full((b, 1), hidden.shape[1] - 1,
                                                                                device=hidden.device))  # (B, H, 1, hd)
                kk = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
                logits = (q.float() @ kk.float().transpose(-1, -2))[:, :, 0] * self.adapter.attention_scaling(layer)
                allowed = torch.cat([valid, torch.ones(b, t - k_p, dtype=torch.bool, device=keys.device)], dim=1)
                probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).mean(1)  # (B, T)
            full = torch.full((b, ep.prefill_len), float("-inf"), device=keys.device)
            full.scatter_(1, held, probs[:, :k_p].masked_fill(~valid, float("-inf")))
            if dec.score_layer is not None:
                ep.decode_scores = full
        else:
            if ep.decode_scores is None:  # layers before score_layer keep what they hold
                return
            full = ep.decode_scores
        visual = ep.visual.gather(1, held) & valid
        scores = full.gather(1, held)
        counts = torch.tensor([resolve_keep(dec.keep, int(v)) for v in visual.sum(1).tolist()], device=held.device)
        keep = keep_top_visual(scores, visual, counts)  # padding entries stay, as in the prefill
        if live is not None:
            keep &= live
        rel, new_live = ragged_keep_index(keep)
        rest = torch.arange(k_p, t, device=held.device).expand(b, t - k_p)
        self.adapter.select_cache_entries(ep.cache, layer, torch.cat([rel, rest], dim=1))
        new_index = held.gather(1, rel)
        bias = ep.layer_bias.get(layer)
        if bias is not None:
            ep.layer_bias[layer] = gather_tokens(bias, rel)
        ep.layer_index[layer], ep.layer_live[layer] = new_index, new_live
        if layer == 0:
            ep.short_first_cache = True
        ep.decode_masks.clear()
        self.pipeline.trace.append(_trace(ep, self._kv_i, layer, valid, visual, new_index, new_live, site="decode",
                                          step=ep.decode_step))

    # --- decoding ----------------------------------------------------------------------------
    def _decode_layer(self, layer: int, ep: _Episode, args: tuple, kwargs: dict):
        held = ep.layer_index.get(layer)
        live = ep.layer_live.get(layer)
        mask = kwargs.get("attention_mask")
        bias = ep.layer_bias.get(layer)
        shift = ep.layer_shift.get(layer)
        if held is None and bias is None and shift is None:
            return None
        if held is not None and (mask is not None or bias is not None or live is not None):
            key = id(held)
            if key not in ep.decode_masks:
                total = ep.seen + ep.query_len
                if mask is None:  # SDPA without padding: build the causal mask to carry the bias
                    mask = full_causal_mask(torch.ones(held.shape[0], total, dtype=torch.long, device=held.device),
                                            ep.query_len, "bool", torch.float32)
                    mask = gather_mask(mask, None, decode_key_index(held, ep.prefill_len, total))
                else:
                    mask = gather_mask(mask, None, decode_key_index(held, ep.prefill_len, mask.shape[-1]))
                if live is not None:
                    mask = mask_key_columns(mask, live)
                if bias is not None:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    mask = self._add_key_bias(mask, bias, hidden.dtype)
                ep.decode_masks[key] = mask
            kwargs["attention_mask"] = ep.decode_masks[key]
        if shift is not None:
            pos, pe = self._shifted_decode_positions(layer, ep, args[0] if args else kwargs["hidden_states"], kwargs)
            kwargs["position_ids"] = pos
            kwargs["position_embeddings"] = pe
        return args, kwargs

    def _shifted_decode_positions(self, layer: int, ep: _Episode, hidden: torch.Tensor, kwargs: dict):
        """(position ids, rotary cos/sin) of the decoding tokens at ``layer``, after a renumbering stage moved its
        positions down by ``ep.layer_shift[layer]`` (computed once per step and shift)."""
        shift = ep.layer_shift[layer]
        key = id(shift)
        if key not in ep.decode_pe:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = (ep.seen + torch.arange(ep.query_len, device=hidden.device))[None]
            pos = expand_batch(pos, shift.shape[0]) - shift[:, None]
            ep.decode_pe[key] = (pos, self.adapter.rotary_embeddings(hidden, pos))
        return ep.decode_pe[key]

    # --- the cross_attention site (Mllama) -----------------------------------------------------
    def _cross_layer_hook(self, layer: int, first: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            ep = self._episode
            if ep is None:
                return None
            if ep.phase == "prefill":
                if not self.adapter.has_cross_attention_states(kwargs):
                    return None
                if ep.cache is None:  # the LLM made its own cache (use_cache without past_key_values)
                    ep.cache = _cache_kwarg(kwargs)
                if first:
                    self._run_cross_stage(layer, ep, args[0] if args else kwargs["hidden_states"], kwargs)
                if ep.cross is None:
                    return None
                self.adapter.set_cross_attention_inputs(kwargs, ep.cross["mask"], image=ep.cross["image"])
                return args, kwargs
            if ep.cross is None:
                return None
            if "decode" not in ep.decode_masks:
                mask = self.adapter.cross_attention_mask(kwargs)
                hidden = args[0] if args else kwargs["hidden_states"]
                ep.decode_masks["decode"] = self._cross_mask(ep, mask, hidden)
            self.adapter.set_cross_attention_inputs(kwargs, ep.decode_masks["decode"])
            return args, kwargs

        return hook

    def _cross_mask(self, ep: _Episode, mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
        """The cross-attention mask (B, 1, Q, M) of the full image features, cut to the kept ones."""
        index, live, bias = ep.cross["index"], ep.cross["live"], ep.cross["bias"]
        if mask is None:
            if live is None and bias is None:
                return None
            mask = torch.zeros(index.shape[0], 1, hidden.shape[1], index.shape[1], dtype=hidden.dtype,
                               device=hidden.device)
        else:
            mask = gather_mask(mask, None, index)
        if live is not None:
            mask = mask_key_columns(mask, live)
        if bias is not None:
            mask = self._add_key_bias(mask, bias, hidden.dtype)
        return mask

    def _run_cross_stage(self, layer: int, ep: _Episode, hidden: torch.Tensor, kwargs: dict) -> None:
        """Run the cross_attention stage on the image features entering the first cross-attention layer."""
        stage_i = next(i for i, s in enumerate(self.pipeline.stages) if s.cross_attention)
        stage = self.pipeline.stages[stage_i]
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
        state, clock, by_op = self._run_operators(stage, state, hidden)
        # Features no text token may see (padding tiles) are not visual, so selectors keep them: Mllama lets the
        # text rows before an image attend to every feature, so dropping them would change those rows.
        keep = state.keep_mask.to(device=hidden.device, dtype=torch.bool)
        index, live = ragged_keep_index(keep)
        sizes = gather_tokens(state.sizes.float(), index)
        ep.cross = {"index": index, "live": live,
                    "bias": sizes.clamp_min(1e-6).log() if state.proportional_attention else None}
        ep.cross["image"] = gather_tokens(state.hidden, index)
        ep.cross["mask"] = self._cross_mask(ep, mask, hidden)
        self.pipeline.runs[stage_i] += 1
        held = live if live is not None else torch.ones_like(index, dtype=torch.bool)
        after = valid.gather(1, index) & held
        # tokens_*: every image feature the cross-attention layers hold; visual_*: those some text token sees;
        # kept: indices into the sample's image features (tiles x patches, in the model's order).
        self.pipeline.trace.append(StageTrace(
            stage=stage_i, layer=layer,
            tokens_before=[m] * b, tokens_after=held.sum(1).tolist(),
            visual_before=valid.sum(1).tolist(), visual_after=after.sum(1).tolist(),
            kept=[row[h].tolist() for row, h in zip(index, held)],
            operator_ms=clock.ms, operator_ms_by_op=by_op,
        ))


class _Stopwatch:
    """Wall time of a block in ms (the device synchronised at both ends when ``like`` is on a GPU); with ``into``,
    also stored there under ``label``."""

    def __init__(self, like: torch.Tensor, into: dict[str, float] | None = None, label: str = ""):
        self._cuda = like.is_cuda
        self.ms = 0.0
        self._into, self._label = into, label

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def __enter__(self) -> _Stopwatch:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.ms = (time.perf_counter() - self._t0) * 1000.0
        if self._into is not None:
            self._into[self._label] = self._into.get(self._label, 0.0) + self.ms


def _merges(merged_into: torch.Tensor | None, index: torch.Tensor) -> list[dict[int, int]]:
    """Per sample {merged token: target}, input-frame indices, from a stage's ``merged_into`` over ``index``."""
    if merged_into is None:
        return []
    out = []
    for row, idx in zip(merged_into.cpu(), index.cpu()):
        src = (row >= 0).nonzero().flatten()
        out.append(dict(zip(idx[src].tolist(), idx[row[src]].tolist())))
    return out


def _trace(ep: _Episode, stage: int, layer: int, valid_before: torch.Tensor, visual_before: torch.Tensor,
           index: torch.Tensor, live: torch.Tensor | None, **extra) -> StageTrace:
    """The trace of one stage run: counts before (given) and after (the tokens ``index`` with ``live``), and the
    kept real tokens per sample in input-frame indices."""
    valid_after = ep.valid.gather(1, index) & (live if live is not None else True)
    return StageTrace(stage=stage, layer=layer, tokens_before=valid_before.sum(1).tolist(),
                      tokens_after=valid_after.sum(1).tolist(), visual_before=visual_before.sum(1).tolist(),
                      visual_after=(ep.visual.gather(1, index) & valid_after).sum(1).tolist(),
                      kept=[row[v].tolist() for row, v in zip(index, valid_after)], **extra)
