"""Running a pipeline inside a stock Hugging Face forward, with forward hooks only.

:class:`AttachedPipeline` is what ``pipeline.attach(model)`` returns: entering installs the hooks, leaving
removes them, always. It owns the episode's lifecycle — a pre-hook on the whole model reads ``input_ids``
(to find the visual tokens) and the 2-D padding mask, starts an :class:`~tokenprune.runtime.episode.Episode`
at a prefill that holds visual tokens, and tells the decoding steps of that episode from a new prompt —
and hands each point of the forward to the sites' runtimes:

- :class:`~tokenprune.runtime.layer_site.LayerSiteRuntime` — a stage before decoder layer L;
- :class:`~tokenprune.runtime.kv_cache.KVCacheRuntime` — a ``kv_cache`` stage;
- :class:`~tokenprune.runtime.cross_attention.CrossAttentionRuntime` — a ``cross_attention`` stage (Mllama);

with :class:`~tokenprune.runtime.stream.DecoderStream` keeping every decoder layer's kwargs consistent with
the tokens it runs on. Scores that need attention are recomputed for the few query rows that matter from
the captured layer inputs (:mod:`tokenprune.runtime.sources`), so the model keeps SDPA.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from tokenprune.adapters import ModelAdapter, get_adapter
from tokenprune.core.errors import ConfigError, PipelineRuntimeError
from tokenprune.core.learned import learned_operators
from tokenprune.core.sites import CrossAttentionSite, KVCacheSite, LayerSite
from tokenprune.core.stage import Stage
from tokenprune.core.state import TokenState
from tokenprune.core.trace import StageTrace
from tokenprune.runtime.cross_attention import CrossAttentionRuntime
from tokenprune.runtime.episode import Episode
from tokenprune.runtime.guide import GuideModel, guide_signal
from tokenprune.runtime.kv_cache import KVCacheRuntime
from tokenprune.runtime.layer_site import LayerSiteRuntime
from tokenprune.runtime.site import SiteRuntime, tile_cells
from tokenprune.runtime.sources import VisionSource
from tokenprune.runtime.stream import DecoderStream, cache_argument


class RunnablePipeline(Protocol):
    """What the runtime reads and writes of a :class:`~tokenprune.pipeline.Pipeline`."""

    stages: Sequence[Stage]
    name: str
    trace: list[StageTrace]
    runs: list[int]
    time_operators: bool


#: The runtime of each kind of site.
RUNTIMES: dict[type, type[SiteRuntime]] = {
    LayerSite: LayerSiteRuntime,
    KVCacheSite: KVCacheRuntime,
    CrossAttentionSite: CrossAttentionRuntime,
}


def is_static_cache(cache: Any) -> bool:
    """Whether ``cache`` preallocates its layers to a fixed length (transformers' static cache layers)."""
    from transformers.cache_utils import StaticLayer

    return any(isinstance(layer, StaticLayer) for layer in getattr(cache, "layers", None) or ())


def refuse_static_cache(implementation: Any, key: str, at_attach: bool = True) -> None:
    """A static cache (``generate(cache_implementation="static")``, and ``torch.compile``'d generation built on
    it) writes each layer's entries at fixed slots of a preallocated length: a layer whose cache holds only the
    kept tokens, or is trimmed, has no such slots. Refused at attach when the model's generation config asks for
    one (:class:`ConfigError`), else when the prefill is given one, before any layer runs."""
    if implementation is None or "static" not in str(implementation):
        return
    detail = (f"{implementation!r}; a static cache preallocates every layer to one length and writes entries at fixed "
              "slots, which a pruned or trimmed layer cache cannot follow; allowed with a pipeline: the default "
              "dynamic cache (cache_implementation unset or 'dynamic')")
    if at_attach:
        raise ConfigError(key, detail)
    raise PipelineRuntimeError(f"{key}: {detail}")


class AttachedPipeline:
    """Context manager returned by :meth:`Pipeline.attach`; removes its hooks on exit, always."""

    def __init__(self, pipeline: RunnablePipeline, model: nn.Module, guide: nn.Module | None = None):
        self.pipeline = pipeline
        self.model = model
        self.adapter: ModelAdapter = get_adapter(model)
        self.adapter.validate_pipeline(pipeline, guide=guide is not None)
        learned = learned_operators(pipeline.stages)
        if learned:  # their networks, built for this LLM's width with their weights loaded
            width = model.get_input_embeddings().embedding_dim
            device = next(model.parameters()).device
            for op in learned:
                op.bind(width, device=device)
        refuse_static_cache(getattr(getattr(model, "generation_config", None), "cache_implementation", None),
                            "generation_config.cache_implementation")
        needs_guide = any(getattr(op, "needs_guide", False) for s in pipeline.stages for op in s.operators)
        self._guide = GuideModel(guide) if guide is not None and needs_guide else None
        self._tower_inputs: dict[str, Any] | None = None  # the images of the latest tower call, for the guide
        self.sites: list[SiteRuntime] = [RUNTIMES[type(self.adapter.resolve_site(stage.site))](i, stage, self)
                                         for i, stage in enumerate(pipeline.stages)]
        capture = {s.stage.site.layer - 1 for s in self.sites
                   if isinstance(s, LayerSiteRuntime) and s.stage.site.layer >= 1}
        decoder_sites = [s for s in self.sites if s.uses_decoder]
        self.stream = DecoderStream(self, decoder_sites, capture) if decoder_sites else None
        self._handles: list[Any] = []
        self.episode: Episode | None = None
        self._forwards = 0
        # Inputs of the vision tower's layers in its latest forward (generate() runs the tower before the
        # prefill forward, so these are kept outside any episode), for vision-tower signals.
        self._vision_inputs: dict[int, Any] = {}
        self._vision_tower: Any = None
        self._join_call = False  # the latest tower call continues the one before it (its captures are joined)
        self._vision_unavailable = self.adapter.vision_signals_unavailable()
        # Vision layers are hooked only for pipelines that read them (their inputs stay held until the next forward).
        self._needs_vision = any(getattr(op, "needs_vision", False) for s in pipeline.stages for op in s.operators)

    # --- context manager ---------------------------------------------------------------------
    def __enter__(self) -> AttachedPipeline:
        if self._handles:
            raise RuntimeError("this AttachedPipeline is already active")
        self.pipeline.trace = []
        self.pipeline.runs = [0] * len(self.pipeline.stages)
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._model_post_hook, with_kwargs=True))
            if self.stream is not None or self._needs_vision:
                self._handles.extend(self.adapter.hook_image_call(self._image_call))
            if self._needs_vision and self._vision_unavailable is None:
                for i, layer in enumerate(self.adapter.vision_layers()):
                    self._handles.append(layer.register_forward_pre_hook(self._vision_hook(i), with_kwargs=True))
            if self.stream is not None:
                self._handles.extend(self.stream.install())
                self._handles.extend(self.adapter.hook_visual_injection(self._visual_injection))
            for site in self.sites:
                self._handles.extend(site.install())
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._remove()
        if exc_type is None and self._forwards and self.pipeline.stages and not any(self.pipeline.runs):
            warnings.warn(
                f"pipeline {self.pipeline.name!r} never pruned: none of {self._forwards} forward(s) held visual "
                f"tokens in a prefill (is the image token in input_ids?)", RuntimeWarning, stacklevel=2)

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.episode = None
        self._vision_inputs = {}
        self._vision_tower = None
        self._join_call = False

    # --- what the stages read beyond the decoder layers -----------------------------------------
    def _image_call(self, args: tuple, kwargs: dict) -> None:
        """The call that takes the images (:meth:`ModelAdapter.hook_image_call`): what the guide and the vision
        signals need of it."""
        if self._guide is not None:
            self._tower_inputs = self.adapter.image_inputs_from_tower(args, kwargs)
        previous = None if self._join_call else self._vision_tower  # a forward joins two calls at most
        self._vision_tower, self._join_call = self.adapter.add_tower_call(
            previous, self.adapter.vision_tower_capture(args, kwargs))

    def _visual_injection(self, mask: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual features the LLM adds inside the decoder (DeepStack) go to the tokens flowing now: the mask and the
        feature rows of the visual tokens the stages so far kept (a merged token keeps its own token's row; filler
        slots none)."""
        ep = self.episode
        if ep is None or ep.phase != "prefill" or ep.flow.index is None:
            return mask, features
        index = ep.flow.index.to(mask.device)
        live = ep.flow.live.to(mask.device) if ep.flow.live is not None else torch.ones_like(index, dtype=torch.bool)
        row = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)  # each visual token's feature row
        kept = mask.gather(1, index) & live
        return kept, features[row.gather(1, index)[kept]]

    def _vision_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            capture = self.adapter.vision_layer_capture(layer, args, kwargs)
            if self._join_call and layer in self._vision_inputs:  # the forward's second tower call (its videos)
                capture = self.adapter.join_layer_captures(self._vision_inputs[layer], capture)
            elif layer == 0:
                self._vision_inputs = {}
            self._vision_inputs[layer] = capture

        return hook

    def vision_signals(self, state: TokenState, ep: Episode) -> None:
        """Give a stage's signals the vision tower's inputs of this prefill and the guide model, where there are."""
        state.signals.vision = self._vision_source(ep)
        state.signals.vision_unavailable = self._vision_unavailable
        state.signals.guide = ep.guide

    def cross_vision_signals(self, state: TokenState) -> None:
        """Give a cross-attention stage's signals the vision tower's inputs of this prefill: the stage's tokens are
        the image features, one per signal row, in order over the batch."""
        state.signals.vision_unavailable = self._vision_unavailable
        if self._vision_unavailable is not None or not self._vision_inputs:
            return
        b, m = state.visual_mask.shape
        rows = torch.arange(b * m, device=state.visual_mask.device).view(b, m)
        state.signals.vision = VisionSource(self.adapter, self._vision_inputs, rows, len(self.adapter.vision_layers()),
                                            self._vision_tower)

    def _vision_source(self, ep: Episode) -> VisionSource | None:
        if self._vision_unavailable is not None or not self._vision_inputs:
            return None
        if ep.patch_of is None:
            try:
                ep.patch_of = self.adapter.vision_patch_map(ep.visual, self._vision_tower, ep.video)
            except ValueError as e:
                raise PipelineRuntimeError(f"vision-tower signals: {e}") from None
        return VisionSource(self.adapter, self._vision_inputs, ep.patch_of, len(self.adapter.vision_layers()),
                            self._vision_tower)

    def tiles(self, ep: Episode) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
        """The tiles of this prefill's visual tokens (input frame), for ``budget: per_tile`` stages."""
        if ep.tile_of is None:
            try:
                tiles = self.adapter.position_tiles(ep.visual, ep.rope_prefill)
                if tiles is None and ep.video is not None and bool(ep.video.any()):
                    tiles = self.adapter.layout_tiles(ep.visual, ep.video, self._vision_tower, ep.grids)
                ep.tile_of, ep.tile_grids = tiles if tiles is not None else \
                    self.adapter.visual_tiles(ep.visual, self._vision_tower, ep.grids)
            except ValueError as e:
                raise PipelineRuntimeError(f"per-tile budgets: {e}") from None
        return ep.tile_of, ep.tile_grids

    def frames(self, ep: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """(frame, cell) of this prefill's visual tokens (input frame), for operators that read video structure:
        each token's frame within its clip (0: an image, or a clip's first frame; -1: not visual) and its cell, the
        raster index within its frame's tile."""
        if ep.frame_of is None:
            tile_of, _ = self.tiles(ep)
            frame = self.adapter.position_frames(ep.visual, ep.rope_prefill, tile_of, ep.video)
            ep.frame_of = frame if frame is not None else torch.where(tile_of >= 0, 0, -1)
            ep.cell_of = tile_cells(tile_of)
        return ep.frame_of, ep.cell_of

    # --- the episode -------------------------------------------------------------------------
    def _follow_beams(self, ep: Episode) -> None:
        """Beam search reorders the cache's batch rows between decoding steps (``cache.reorder_cache(beam_idx)``);
        the episode's per-row record of what each layer's cache holds is reordered with them."""
        cache = ep.cache
        reorder = getattr(cache, "reorder_cache", None)
        ep.follows_beams = True
        if reorder is None:
            return

        def follow(beam_idx, *args, **kwargs):
            if self.episode is ep:
                ep.reorder_rows(beam_idx)
            return reorder(beam_idx, *args, **kwargs)

        cache.reorder_cache = follow

    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._forwards += 1
        if any(k.startswith("pixel_values") and isinstance(v, torch.Tensor) for k, v in kwargs.items()):
            self._vision_tower, self._join_call = None, False  # the tower calls of this forward start a new record
        input_ids = self.adapter.input_ids(args, kwargs)
        cache = cache_argument(kwargs)
        past = self.adapter.cache_length(cache)
        if input_ids is None:
            if past == 0 and kwargs.get("inputs_embeds") is not None:
                raise PipelineRuntimeError("a pipeline needs input_ids to find the visual tokens; got only inputs_embeds")
            self.episode = None
            return
        visual = self.adapter.visual_mask(input_ids)
        if past == 0:
            self.episode = None
            if is_static_cache(cache):
                refuse_static_cache("static", "cache_implementation", at_attach=False)
            if (why := self.adapter.unsupported_inputs(kwargs)) is not None:
                raise PipelineRuntimeError(why)
            if bool(visual.any()):
                mask = kwargs.get("attention_mask")
                valid = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else torch.ones_like(visual)
                ep = Episode(cache, visual, valid, first_cache_layer=self.adapter.attending_layers()[0])
                ep.video = self.adapter.video_mask(input_ids)
                ep.grids = self.adapter.visual_grids(kwargs, visual)
                ep.blocks = self.adapter.attention_blocks(kwargs)
                if self._guide is not None:
                    ep.guide = guide_signal(self._guide, input_ids, valid.long(), lambda: self._tower_inputs, visual)
                self.episode = ep
                self.pipeline.trace = []
            return
        ep = self.episode
        if bool(visual.any()) and self.adapter.has_image_inputs(kwargs):
            raise PipelineRuntimeError("images after the prefill (a cached continuation with new images) are not supported")
        # (an image token id generated while decoding, with no image inputs, is just a text token to the model)
        if ep is None or ep.cache is not cache:
            self.episode = None
            return
        ep.begin_decode_step(input_ids.shape[1])
        mask = kwargs.get("attention_mask")
        ep.step_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _model_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ep = self.episode
        if ep is None:
            return
        for site in self.sites:
            site.after_forward(ep)
        if ep.cache is not None and not ep.follows_beams:
            self._follow_beams(ep)
        ep.seen += ep.query_len
        ep.capture = None
        ep.frame = None
