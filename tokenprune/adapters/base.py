"""The adapter interface, and the parts shared by decoder-only LVLMs with a Llama-style LLM."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tokenprune.core.errors import ConfigError
from tokenprune.core.masks import expand_batch, gather_tokens
from tokenprune.core.sites import CrossAttentionSite, KVCacheSite


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the two halves of the head dimension (Su et al., RoFormer)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, N, hd) by per-token ``cos``/``sin`` (B, N, r). With r < hd (partial rotary: Qwen3.5
    rotates a quarter of each head) the first r dimensions rotate and the rest pass unchanged."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@dataclass(frozen=True)
class ModelFacts:
    """What the model-dependent checks of a pipeline read (:meth:`ModelAdapter.check_pipeline`): from
    ``config.json`` before any weights load, or from the loaded model."""

    #: Decoder layers of the LLM.
    num_layers: int
    #: The LLM's cross-attention layers (Mllama); empty for decoder-only LVLMs.
    cross_attention_layers: tuple[int, ...] = ()
    #: Why the model cannot give vision-tower signals; None: it can.
    vision_signals: str | None = None
    #: Why the images of each forward cannot be recovered for a guide model; None: they can.
    guide_images: str | None = None
    #: Why a sample's visual tokens form no single raster grid; None: they do.
    visual_grid: str | None = None
    #: The mask convention of the LLM's attention (:func:`mask_format_of`); None: not known yet (before loading).
    mask_format: str | None = None
    #: The decoder layers that attend within a sliding window.
    sliding_layers: tuple[int, ...] = ()
    #: The attention implementation's name, for messages.
    attn_implementation: str | None = None
    #: The decoder layers without attention: linear-attention (recurrent) layers, which hold a fixed-size state
    #: instead of keys and values (Qwen3.5's Gated DeltaNet).
    recurrent_layers: tuple[int, ...] = ()
    #: Why an image shown at a lower resolution gives this model no fewer visual tokens (a processor that resizes
    #: every image to one size, or picks its tiles by aspect ratio); None: it gives fewer.
    fixed_resolution: str | None = None


def _spans(layers: list[int]) -> str:
    """``layers`` for a message: ``3, 7, 11, ...`` cut after eight."""
    shown = ", ".join(str(i) for i in layers[:8])
    return shown + (", ..." if len(layers) > 8 else "") if layers else "(none)"


def tiles_of_images(visual: torch.Tensor, images: list[tuple[torch.Tensor, list[tuple[int, int]]]]
                    ) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
    """Lay images' tiles onto a batch's visual tokens (images in order, sample after sample, as the model fills
    its placeholders): ``images[i]`` is (the tile of each of image i's visual tokens, -1 in none; its tiles'
    (rows, cols)). Returns :meth:`ModelAdapter.visual_tiles`' ``(tile_of, shapes)``, tiles numbered per sample."""
    total = sum(t.numel() for t, _ in images)
    if total != int(visual.sum()):
        raise ValueError(f"the images of the tower's call lay out {total} visual tokens but the prompt holds "
                         f"{int(visual.sum())}")
    tile_of = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
    shapes: list[list[tuple[int, int]]] = []
    i = 0
    for b in range(visual.shape[0]):
        idx = visual[b].nonzero().flatten()
        parts: list[torch.Tensor] = []
        mine: list[tuple[int, int]] = []
        taken = 0
        while taken < idx.numel():
            tile, grids = images[i]
            parts.append(torch.where(tile >= 0, tile + len(mine), -1))
            mine.extend(grids)
            taken += tile.numel()
            i += 1
        if taken != idx.numel():
            raise ValueError(f"sample {b}'s {idx.numel()} visual tokens do not end where an image ends")
        if parts:
            tile_of[b, idx] = torch.cat(parts).to(visual.device)
        shapes.append(mine)
    return tile_of, shapes


def block_groups(side: int, merge: int) -> torch.Tensor:
    """(T, merge²) long: for each token of a ``side`` x ``side`` patch grid merged in ``merge`` x ``merge`` blocks
    (InternVL's pixel shuffle, Gemma 3's average pooling; tokens in raster order over the ``side/merge`` square),
    the patches (raster indices) it is made of: token (i, j) holds patches (merge*i + a, merge*j + b), a, b < merge."""
    cells = torch.arange(side * side).view(side // merge, merge, side // merge, merge)
    return cells.permute(0, 2, 1, 3).reshape(-1, merge * merge)


def clip_layer_qk(block: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(queries, keys, scale) of a CLIP- or SigLIP-style encoder layer (``layer_norm1``, ``self_attn.{q,k}_proj``)
    on its input ``hidden`` (B, N, D): (B, H, N, hd) each, before the softmax's scale."""
    attn = block.self_attn
    h = block.layer_norm1(hidden)
    b, n, _ = h.shape
    q = attn.q_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2)
    return q, k, float(attn.scale)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """(B, H, N) fp32: the attention each of N tokens receives from the N queries of its row (softmax of ``q``
    (B, H, N, hd) against ``k`` over all keys, no mask), averaged over the queries — what stands for a CLS token's
    attention in a tower without one (SigLIP). Queries go ``chunk`` at a time."""
    received = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
    for c in range(0, q.shape[2], chunk):
        received += torch.softmax((q[:, :, c:c + chunk].float() @ k.float().transpose(-1, -2)) * scale, dim=-1).sum(2)
    return received / q.shape[2]


def mask_format_of(impl: str) -> str:
    """The mask convention of attention implementation ``impl``: ``bool``, ``additive`` or ``2d``
    (:attr:`ModelAdapter.mask_format`)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask, sdpa_mask

    try:
        fn = ALL_MASK_ATTENTION_FUNCTIONS[impl]
    except KeyError:
        fn = None
    if fn is flash_attention_mask:
        return "2d"
    if fn is sdpa_mask:
        return "bool"
    if fn is None and "flash" in impl:
        return "2d"
    return "additive"


def layer_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder (or vision) layer's input hidden states, from its forward pre-hook's arguments."""
    return args[0] if args else kwargs["hidden_states"]


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, longest row) of token ``rows``, left-padded with ``pad``."""
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


def expand_placeholder(ids: list[int], token: int, count: int) -> list[int]:
    """``ids`` with its one ``token`` (a clip's placeholder in the chat template's prompt) written ``count`` times."""
    if ids.count(token) != 1:
        raise ValueError(f"a video prompt holds one video placeholder, this one {ids.count(token)}")
    at = ids.index(token)
    return ids[:at] + [token] * count + ids[at + 1:]


#: The key an adapter's :meth:`ModelAdapter.hook_image_call` adds to the keyword arguments it reports of a video
#: call (the call itself gets them unchanged), for families whose forward encodes images and videos in two calls.
VIDEO_CALL = "tokenprune_video_call"


class MethodHook:
    """Wraps ``obj.name`` (a bound method) on the instance so that ``fn(args, kwargs)`` runs before each call (a
    result other than None is the ``(args, kwargs)`` the method is called with instead); :meth:`remove` unwraps it
    (a wrapper left under a later one passes calls straight through)."""

    def __init__(self, obj, name: str, fn):
        self.obj, self.name, self.active = obj, name, True
        self.had = name in obj.__dict__
        self.previous = obj.__dict__.get(name)
        inner = getattr(obj, name)

        @functools.wraps(inner)  # callers read its signature (generate() picks the arguments to pass by it)
        def wrapper(*args, **kwargs):
            if self.active:
                given = fn(args, kwargs)
                if given is not None:
                    args, kwargs = given
            return inner(*args, **kwargs)

        self.wrapper = wrapper
        setattr(obj, name, wrapper)

    def remove(self) -> None:
        self.active = False
        if self.obj.__dict__.get(self.name) is self.wrapper:
            if self.had:
                setattr(self.obj, self.name, self.previous)
            else:
                delattr(self.obj, self.name)


class ModelAdapter:
    """Everything tokenprune needs to know about one model family.

    Subclasses set ``model_types`` (values of ``config.model_type``) and locate the LLM's decoder
    layers; the rest of tokenprune never branches on a model's class.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: Human name of the family, for messages.
    family: ClassVar[str] = "this model"
    #: The model types whose video inputs :meth:`frame_video_inputs` builds from the image processor (no video
    #: processor, so no torchvision); empty: none.
    frame_videos: ClassVar[tuple[str, ...]] = ()
    #: Axes of the rotary positions (1; 3 for M-RoPE, whose renumbering :mod:`tokenprune.core.positions` defines).
    rope_axes: ClassVar[int] = 1
    #: Kinds of visual token a stage can ``protect`` from pruning (LLaVA-NeXT: ``image_newline``).
    token_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # --- what a pipeline's model-dependent checks read -----------------------------------------
    @classmethod
    def facts_from_config(cls, config: Any) -> ModelFacts:
        """The :class:`ModelFacts` that ``config`` (the model's ``config.json``) states, before any weights load."""
        text = getattr(config, "text_config", None) or config
        return ModelFacts(num_layers=int(text.num_hidden_layers),
                          cross_attention_layers=tuple(cls.cross_attention_layers_from_config(config)),
                          vision_signals=cls.vision_signals_from_config(config),
                          guide_images=cls.guide_images_from_config(config),
                          visual_grid=cls.visual_grid_from_config(config),
                          mask_format=mask_format_of(impl) if (impl := getattr(text, "_attn_implementation", None))
                          else None, attn_implementation=impl, sliding_layers=cls.sliding_layers_from_config(config),
                          recurrent_layers=cls.recurrent_layers_from_config(config),
                          fixed_resolution=cls.fixed_resolution_from_config(config))

    @classmethod
    def fixed_resolution_from_config(cls, config: Any) -> str | None:
        """Why an image at a lower resolution gives this family no fewer visual tokens (its processor resizes every
        image to the tower's size, or picks tiles by aspect ratio); None when the count follows the image's size
        (dynamic resolution, tiles chosen by size). The default: a family of dynamic resolution."""
        return None

    @classmethod
    def sliding_layers_from_config(cls, config: Any) -> tuple[int, ...]:
        """The decoder layers ``config`` has attend within a sliding window: those its ``layer_types`` name
        ``sliding_attention``, or every layer when it sets a ``sliding_window`` and no layer types (Mistral)."""
        text = getattr(config, "text_config", None) or config
        types = getattr(text, "layer_types", None)
        if types is not None:
            return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        return tuple(range(int(text.num_hidden_layers))) if getattr(text, "sliding_window", None) else ()

    @classmethod
    def recurrent_layers_from_config(cls, config: Any) -> tuple[int, ...]:
        """The decoder layers ``config``'s ``layer_types`` name ``linear_attention``: recurrent layers with no
        attention to read and no keys to cache."""
        text = getattr(config, "text_config", None) or config
        types = getattr(text, "layer_types", None) or ()
        return tuple(i for i, t in enumerate(types) if t == "linear_attention")

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        """The LLM's linear-attention (recurrent) decoder layers (:meth:`recurrent_layers_from_config`)."""
        return self.recurrent_layers_from_config(self.model.config)

    def attending_layers(self) -> list[int]:
        """The decoder layers that attend (and cache keys and values): all but :attr:`recurrent_layers`."""
        recurrent = set(self.recurrent_layers)
        return [i for i in range(self.num_layers) if i not in recurrent]

    def facts(self) -> ModelFacts:
        """The :class:`ModelFacts` of the loaded model (its layers as built, its vision tower as loaded)."""
        return ModelFacts(num_layers=self.num_layers, cross_attention_layers=tuple(self.cross_attention_layers),
                          vision_signals=self.vision_signals_unavailable(),
                          guide_images=self.guide_images_from_config(self.model.config) or (
                              None if self.vision_tower() is not None else
                              "it has no vision tower that takes the model's image input"),
                          visual_grid=self.visual_grid_from_config(self.model.config),
                          mask_format=self.mask_format, attn_implementation=self.attn_implementation,
                          sliding_layers=tuple(i for i in range(self.num_layers) if self.sliding_window(i)),
                          recurrent_layers=self.recurrent_layers,
                          fixed_resolution=self.fixed_resolution_from_config(self.model.config))

    @classmethod
    def resolve_site(cls, site: Any) -> Any:
        """The site a stage's ``site`` runs at on this family: itself, unless the family reads it as another
        (Mllama: ``layer: 0`` is its image features, the ``cross_attention`` site)."""
        return site

    @classmethod
    def cross_attention_layers_from_config(cls, config: Any) -> list[int]:
        """The cross-attention layers ``config`` lists (Mllama); none for decoder-only LVLMs."""
        return []

    @classmethod
    def vision_signals_from_config(cls, config: Any) -> str | None:
        """Why this family cannot give vision-tower signals, as far as ``config`` tells; None if it can (the
        loaded model may still refuse, :meth:`vision_signals_unavailable`)."""
        return f"{cls.family} has no vision-tower signals in tokenprune yet"

    @classmethod
    def visual_grid_from_config(cls, config: Any) -> str | None:
        """Why a sample's visual tokens form no single raster grid in this family; None if they do (one image's
        patches in raster order, :meth:`visual_grids`)."""
        return None

    @classmethod
    def guide_images_from_config(cls, config: Any) -> str | None:
        """Why the images of each forward cannot be recovered for a guide model, as far as ``config`` tells;
        None if they can."""
        return "its image inputs are not mapped to a vision tower yet"

    def validate_pipeline(self, pipeline: Any, guide: bool = False) -> None:
        """:meth:`check_pipeline` against the loaded model's :meth:`facts`."""
        self.check_pipeline(self.facts(), pipeline, guide)

    @classmethod
    def check_pipeline(cls, facts: ModelFacts, pipeline: Any, guide: bool = False) -> None:
        """Raise :class:`~tokenprune.core.errors.ConfigError` for a stage a model with ``facts`` cannot run: a
        site or cache layer beyond its depth, a site or signal the family does not have, or an operator that
        needs a guide model when none is given (``guide``). The pipeline's own checks ran when it was built;
        this is every check that depends on the model, and it needs only ``config.json``
        (:meth:`facts_from_config`) or the loaded model (:meth:`facts`)."""
        if getattr(pipeline, "input", None) is not None and facts.fixed_resolution is not None:
            raise ConfigError("input.scale", f"showing the image at a lower resolution gives {cls.family} no fewer "
                                             f"visual tokens: {facts.fixed_resolution} (average pooling of the visual "
                                             "tokens, the pooling preset, is the baseline that has a meaning there)")
        for stage in pipeline.stages:
            stage.check_depth(facts.num_layers)
            if facts.recurrent_layers:
                cls.check_recurrent_stage(facts, stage)
            if isinstance(cls.resolve_site(stage.site), CrossAttentionSite) and not facts.cross_attention_layers:
                raise ConfigError(f"{stage.key}.layer", f"'cross_attention' is not a site of {cls.family}: it has no "
                                  f"cross-attention layers; allowed: a decoder layer 0..{facts.num_layers - 1}")
            for j, op in enumerate(stage.operators):
                if getattr(op, "needs_guide", False) and facts.guide_images is not None:
                    raise ConfigError(f"{stage.key}.operators.{j}.op", f"{op.op_name!r} needs the images of each "
                                      f"forward for its guide model, which {cls.family} cannot give: "
                                      f"{facts.guide_images}")
                if getattr(op, "needs_guide", False) and not guide:
                    raise ConfigError(f"{stage.key}.operators.{j}.op", f"{op.op_name!r} needs a guide model: "
                                      "pipeline.attach(model, guide=small_model)")
                if getattr(op, "needs_vision", False) and facts.vision_signals is not None:
                    raise ConfigError(f"{stage.key}.operators.{j}.op", f"{op.op_name!r} needs vision-tower signals, "
                                      f"which {cls.family} cannot give: {facts.vision_signals}")
                if getattr(op, "needs_grid", False) and facts.visual_grid is not None and stage.budget != "per_tile":
                    raise ConfigError(f"{stage.key}.operators.{j}.op", f"{op.op_name!r} lays the visual tokens out "
                                      f"as one grid, which {cls.family} has not: {facts.visual_grid}")
            if facts.mask_format == "2d":
                cls.check_flash_stage(facts, stage)
            for kind in stage.protect:
                if kind not in cls.token_kinds:
                    raise ConfigError(f"{stage.key}.protect", f"{kind!r} is not a token kind of {cls.family}; "
                                      f"allowed: {', '.join(cls.token_kinds) or '(none)'}")

    @classmethod
    def check_recurrent_stage(cls, facts: ModelFacts, stage: Any) -> None:
        """Refuse what a linear-attention (recurrent) layer does not have: attention to score by (an operator that
        reads the attention or keys of the layer before its site) and a KV cache to compress."""
        recurrent = set(facts.recurrent_layers)
        attending = [i for i in range(facts.num_layers) if i not in recurrent]
        kind = "a linear-attention (recurrent) layer, with no attention and no KV cache"
        site = cls.resolve_site(stage.site)
        if isinstance(site, KVCacheSite):
            names = stage.cache.layers
            for layer in (names if names != "all" else []):
                if layer in recurrent:
                    raise ConfigError(f"{stage.key}.cache.layers", f"layer {layer} of {cls.family} is {kind}; "
                                      f"allowed: its attention layers {_spans(attending)} (or 'all': those)")
            sl = stage.cache.decode.score_layer
            if sl is not None and sl in recurrent:
                raise ConfigError(f"{stage.key}.cache.decode.score_layer", f"layer {sl} of {cls.family} is {kind}; "
                                  f"allowed: its attention layers {_spans(attending)}")
            return
        source = getattr(site, "decoder_layer", None)
        if source is None or source < 1 or source - 1 not in recurrent:
            return
        for j, op in enumerate(stage.operators):
            if getattr(op, "reads_attention_layer", False):
                after = [i + 1 for i in attending if i + 1 < facts.num_layers]
                raise ConfigError(f"{stage.key}.operators.{j}.op", f"{op.op_name!r} reads the attention (queries, "
                                  f"keys) of layer {source - 1}, the layer before its site; on {cls.family} that is "
                                  f"{kind}; allowed layers for this stage: {_spans(after)} (right after an attention "
                                  "layer), or an operator that reads no attention")

    @classmethod
    def check_flash_stage(cls, facts: ModelFacts, stage: Any) -> None:
        """Refuse what FlashAttention's convention (2-D padding masks, windows counted by the kernel) cannot carry:
        proportional attention (a log-size bias on merged keys needs a 4-D mask) and pruning ahead of a
        sliding-window layer (the kernel would count the window over the kept tokens, not the original positions)."""
        impl = facts.attn_implementation or "FlashAttention"
        for j, op in enumerate(stage.operators):
            if getattr(getattr(op, "params", None), "proportional_attention", False):
                raise ConfigError(f"{stage.key}.operators.{j}.proportional_attention",
                                  f"{op.op_name!r} adds log(size) to merged keys' attention logits, which needs a 4-D "
                                  f"mask; this model runs {impl}, which takes 2-D padding masks only; use "
                                  "attn_implementation: sdpa (or eager), or proportional_attention: false")
        first = 0 if isinstance(cls.resolve_site(stage.site), KVCacheSite) else stage.site.decoder_layer
        later = [i for i in facts.sliding_layers if first is not None and i >= first]
        if later:
            raise ConfigError(f"{stage.key}.layer", f"{stage.site.value!r} prunes ahead of sliding-window layer "
                              f"{later[0]}; under {impl} the kernel counts the window over the kept tokens, not the "
                              "original positions, so the window would move; use attn_implementation: sdpa (or eager)")

    #: Whether the visual tokens sit in the decoder's sequence (False: they enter through cross-attention, which
    #: analytic FLOPs do not model).
    decoder_only: ClassVar[bool] = True

    # --- structure ---------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the LLM's cross-attention layers (Mllama); empty for decoder-only LVLMs."""
        return self.cross_attention_layers_from_config(self.model.config)

    def sliding_window(self, layer: int) -> int | None:
        """The attention window of decoder ``layer`` (a query at sequence index q sees keys at q-W+1..q), or None
        for full attention: the attention module's own ``sliding_window`` (Qwen2, layers that interleave), else
        the text config's (Mistral, every layer)."""
        attn = getattr(self.layers[layer], "self_attn", None)
        if attn is not None and hasattr(attn, "sliding_window"):
            return attn.sliding_window
        text = getattr(self.model.config, "text_config", None) or self.model.config
        return getattr(text, "sliding_window", None)

    @property
    def attn_implementation(self) -> str:
        return getattr(self.language_model.config, "_attn_implementation", None) or "eager"

    @property
    def mask_format(self) -> str:
        """How the LLM's layers take their mask: ``bool`` (SDPA), ``additive`` (eager), ``2d`` (FlashAttention).

        Read from the mask function the implementation is registered with in transformers' attention-mask
        interface, so that any implementation of FlashAttention's convention (a hub kernel, a stand-in, a name
        without "flash") is treated as one; an implementation registered with no mask function falls back to
        transformers' own rule ("flash" in the name: FlashAttention)."""
        return mask_format_of(self.attn_implementation)

    # --- inputs ------------------------------------------------------------------------------
    def input_ids(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return kwargs.get("input_ids", args[0] if args else None)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: which input tokens are visual."""
        raise NotImplementedError

    def mark_token_kinds(self, embeds: torch.Tensor, visual: torch.Tensor) -> dict[str, torch.Tensor]:
        """{kind: (B, N) bool} for each of ``token_kinds``, from the LLM's input embeddings (B, N, D)."""
        return {}

    def attention_blocks(self, kwargs: dict) -> torch.Tensor | None:
        """(B, N) long: the block of tokens each prompt token attends to in both directions besides its causal
        past (-1: none), from the prefill's keyword arguments, where the model's attention is not causal over the
        visual tokens (Gemma 3: each image); None where it is causal throughout."""
        return None

    def visual_grids(self, kwargs: dict, visual: torch.Tensor) -> list[tuple[int, int] | None] | None:
        """Per sample, (rows, cols) of its visual tokens in raster order if known, from the forward's
        keyword arguments; None where unknown (a square grid is then assumed)."""
        return None

    def visual_tiles(self, visual: torch.Tensor, capture: Any, grids: list | None
                     ) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
        """The tiles of each sample's visual tokens, for ``budget: per_tile`` stages: ``(tile_of, shapes)``, with
        ``tile_of`` (B, N) long the tile of each token (-1: text, or a visual token in no tile) and
        ``shapes[b][t]`` the (rows, cols) of sample b's tile t, whose tokens are in raster order. ``capture``
        is :meth:`vision_tower_capture`'s record of the image call, ``grids`` :meth:`visual_grids`'. The
        default: a sample's visual tokens are one tile, of its grid (or the square they form)."""
        tile_of = torch.where(visual, 0, -1).long()
        shapes = []
        for b, n in enumerate(visual.sum(1).tolist()):
            grid = grids[b] if grids is not None else None
            if grid is None:
                side = int(round(n ** 0.5))
                if side * side != n:
                    raise ValueError(f"sample {b}'s {n} visual tokens form no grid that tokenprune knows")
                grid = (side, side)
            shapes.append([tuple(grid)] if n else [])
        return tile_of, shapes

    def position_tiles(self, visual: torch.Tensor, positions: torch.Tensor | None
                       ) -> tuple[torch.Tensor, list[list[tuple[int, int]]]] | None:
        """:meth:`visual_tiles` read off the prefill's multi-axis rotary positions (``positions`` (A, B, N), families
        with :attr:`rope_axes` > 1), where they lay the visual tokens out; None: use :meth:`visual_tiles`."""
        return None

    def layout_tiles(self, visual: torch.Tensor, video: torch.Tensor, capture: Any, grids: list | None
                     ) -> tuple[torch.Tensor, list[list[tuple[int, int]]]] | None:
        """:meth:`visual_tiles` for a prefill that holds video tokens (``video``, :meth:`video_mask`'s), where the
        family lays them out from the prompt itself (each frame a tile); None: :meth:`position_tiles` or
        :meth:`visual_tiles` cover videos."""
        return None

    def video_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, N) bool: which input tokens are video placeholders (a subset of :meth:`visual_mask`); None where the
        family takes no videos."""
        return None

    def frame_video_inputs(self, processor, prompts: list[str], clips: list[list]) -> dict[str, Any]:
        """The model's inputs for ``prompts`` (each with one video placeholder) and their ``clips`` (lists of PIL
        frames), built from the processor's image processor (see :attr:`frame_videos`)."""
        raise NotImplementedError(f"{self.family}: video inputs are built by its video processor only")

    def position_frames(self, visual: torch.Tensor, positions: torch.Tensor | None, tile_of: torch.Tensor,
                        video: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, N) long: each visual token's frame within its video clip (0 for an image's tokens and a clip's first
        frame; -1 elsewhere), where :meth:`position_tiles` made each frame a tile (``tile_of``): a clip's frames
        are consecutive tiles; ``video`` is :meth:`video_mask`'s. None: the family has no videos (every tile is
        frame 0)."""
        return None

    def feature_tiles(self, batch: int, features: int) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
        """:meth:`visual_tiles` for the image features (B, M) of a cross-attention stage (Mllama)."""
        raise NotImplementedError(f"{self.family} has no cross-attention image features")

    def visual_token_counts(self, inputs: dict) -> list[int]:
        """Per sample, the visual tokens a forward of ``inputs`` (the processor's output) holds: the image
        placeholders of ``input_ids`` (cross-attention models: the image features the cross-attention reads)."""
        return self.visual_mask(inputs["input_ids"]).sum(1).tolist()

    def image_panels(self, inputs: dict, sample: int) -> list[tuple[str, torch.Tensor]]:
        """``sample``'s visual tokens laid out as images: ``[(name, cells)]``, ``cells`` (rows, cols) long holding
        the index of the visual token (among the sample's visual tokens) drawn at each cell (-1: none). The
        default is one square grid."""
        n = int(self.visual_mask(inputs["input_ids"][sample:sample + 1]).sum())
        if n == 0:
            raise ValueError(f"sample {sample} holds no visual tokens")
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"sample {sample}: {n} visual tokens form no square grid")
        return [("image", torch.arange(n).view(side, side))]

    # --- vision-tower signals ----------------------------------------------------------------
    def vision_layers(self) -> nn.ModuleList | None:
        """The vision tower's encoder layers whose inputs vision signals are recomputed from, or None."""
        return None

    def vision_signals_unavailable(self) -> str | None:
        """Why this model cannot give vision-tower signals (CLS attention, vision keys), or None if it can."""
        return self.vision_signals_from_config(self.model.config)

    def vision_layer_capture(self, layer: int, args: tuple, kwargs: dict) -> Any:
        """What vision signals need of vision ``layer``'s call, from its forward pre-hook: its input hidden states
        (and, for towers that take them, the per-call keyword arguments: segment bounds, rotary angles)."""
        return layer_hidden(args, kwargs)

    def hook_image_call(self, fn: Callable[[tuple, dict], None]) -> list[Any]:
        """Have ``fn(args, kwargs)`` called with the arguments of every call that takes the model's image input
        (by default the :meth:`vision_tower`'s forward, through a pre-hook) — also the one ``generate()`` makes
        before the prefill. Returns removable handles."""
        tower = self.vision_tower()
        if tower is None:
            return []
        return [tower.register_forward_pre_hook(lambda module, args, kwargs: fn(args, kwargs), with_kwargs=True)]

    def hook_visual_injection(self, fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                              ) -> list[Any]:
        """Where the LLM adds visual features to the hidden states of its visual tokens inside the decoder
        (Qwen3-VL's DeepStack): have ``fn(mask, features)`` — ``mask`` (B, N) over the prompt's tokens, ``features``
        one row per True of it in row-major order — return the pair for the tokens flowing now. Returns removable
        handles; none where the family injects nothing."""
        return []

    def vision_tower_capture(self, args: tuple, kwargs: dict) -> Any:
        """What vision signals need of the image call :meth:`hook_image_call` sees (Qwen2-VL: the image grids;
        LLaVA-NeXT: the image sizes), from its arguments; None by default."""
        return None

    def add_tower_call(self, previous: Any, capture: Any) -> tuple[Any, bool]:
        """(the record of the tower calls so far, whether this call joins the previous one) once a call recorded as
        ``capture`` (:meth:`vision_tower_capture`) follows the one recorded as ``previous``. By default the latest
        call's record, not joined; a family whose forward encodes images and videos in two calls joins them, and
        its vision layers' captures are then joined too (:meth:`join_layer_captures`)."""
        return capture, False

    def join_layer_captures(self, previous: Any, capture: Any) -> Any:
        """One vision layer's capture of a call that joins the previous call (:meth:`add_tower_call`): the two
        calls' signal rows in order."""
        raise NotImplementedError(f"{self.family}: its tower calls are not joined")

    def vision_signal_layer(self, layer: int) -> int:
        """The vision layer a signal asked at ``layer`` (0-based, already range-checked) is read from: ``layer``
        itself, unless the family reads it elsewhere (Qwen2.5-VL: a windowed block's next full-attention block)."""
        return layer

    def vision_patch_map(self, visual: torch.Tensor, tower: Any = None, video: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """(B, N) long: for each visual input token, its row among the vision signal rows (-1 on other tokens);
        ``tower`` is :meth:`vision_tower_capture`'s record of the tower call, ``video`` (B, N) the video
        placeholders among the visual tokens where the prompt holds any (:meth:`video_mask`). The default: the visual tokens, in
        order over the batch, are the rows in order (one row per visual token, none left over)."""
        rows = self.vision_signal_rows(tower)
        count = int(visual.sum())
        if rows is not None and rows != count:
            raise ValueError(f"the vision tower gave {rows} feature rows but the prompt holds {count} visual tokens")
        out = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        out[visual] = torch.arange(count, device=visual.device)
        return out

    def vision_signal_rows(self, tower: Any) -> int | None:
        """How many signal rows the latest tower call gives, if the adapter knows (for the check above)."""
        return None

    def vision_cls_attention(self, layer: int, captured: Any, tower: Any = None) -> torch.Tensor:
        """(R, H) per signal row (:meth:`vision_patch_map`), the attention it receives at vision ``layer`` from the
        tower's summary query: the CLS token where the tower has one; from ``captured``, the layer's
        :meth:`vision_layer_capture`."""
        raise NotImplementedError

    def vision_received_attention(self, layer: int, captured: Any, tower: Any = None) -> torch.Tensor:
        """(R, H) per signal row, the attention its patch receives at vision ``layer``, averaged over every query of
        its attention span (all of an image's tokens, the CLS token included where there is one; a window in
        Qwen's windowed layers). By default the tower's summary signal (:meth:`vision_cls_attention`), which is this
        already in a tower without a CLS token; towers with one override it."""
        return self.vision_cls_attention(layer, captured, tower)

    def vision_keys(self, layer: int, captured: Any, tower: Any = None) -> torch.Tensor:
        """(R, H, hd) per signal row, its keys at vision ``layer``, from the layer's :meth:`vision_layer_capture`."""
        raise NotImplementedError

    def vision_tower(self) -> nn.Module | None:
        """The module whose input is the model's image input (for a guide model), or None."""
        return None

    def vision_modules(self) -> list[nn.Module]:
        """The modules that turn the model's images into the LLM's visual features: the vision tower (the
        encoder; Qwen's ``visual`` includes its patch merger) and the projector where the model has one apart
        (``multi_modal_projector``). Their time is the part of a prefill that no pruning after the tower removes."""
        inner = getattr(self.model, "model", self.model)
        return [m for m in (self.vision_tower(), getattr(inner, "multi_modal_projector", None))
                if isinstance(m, nn.Module)]

    def image_inputs_from_tower(self, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        """The model-level image keyword arguments, rebuilt from the vision tower's call; None if impossible."""
        return None

    def guide_inputs(self, input_ids: torch.Tensor, image_inputs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of a guide model's forward beyond ``input_ids`` and ``attention_mask``, from the
        images :meth:`image_inputs_from_tower` rebuilt (Qwen2-VL adds ``mm_token_type_ids``)."""
        return image_inputs

    #: Keyword arguments of the model's forward that carry images.
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")

    def unsupported_inputs(self, kwargs: dict) -> str | None:
        """Why the visual inputs of a prefill's ``kwargs`` cannot be pruned on this family (raised before the
        forward runs); None if they can."""
        return None

    def has_image_inputs(self, kwargs: dict) -> bool:
        """Whether a forward call carries images (so its visual tokens will be filled from them)."""
        return any(kwargs.get(k) is not None for k in self.image_input_keys)

    # --- KV cache ----------------------------------------------------------------------------
    def cache_length(self, cache: Any) -> int:
        if cache is None:
            return 0
        return int(cache.get_seq_length())

    def cached_keys(self, cache: Any, layer: int) -> torch.Tensor | None:
        """(B, H_kv, T, hd) rotary-embedded keys cached by ``layer``, or None."""
        if cache is None or not hasattr(cache, "layers") or layer >= len(cache.layers):
            return None
        keys = getattr(cache.layers[layer], "keys", None)
        return keys if isinstance(keys, torch.Tensor) and keys.numel() else None

    def cached_values(self, cache: Any, layer: int) -> torch.Tensor | None:
        """(B, H_kv, T, hd) values cached by ``layer``, or None."""
        if cache is None or not hasattr(cache, "layers") or layer >= len(cache.layers):
            return None
        values = getattr(cache.layers[layer], "values", None)
        return values if isinstance(values, torch.Tensor) and values.numel() else None

    def select_cache_entries(self, cache: Any, layer: int, index: torch.Tensor) -> None:
        """Keep only the cached entries ``index`` (B, K) of ``layer``."""
        entry = cache.layers[layer]
        entry.keys = gather_tokens(entry.keys, index, dim=2).contiguous()
        entry.values = gather_tokens(entry.values, index, dim=2).contiguous()

    def set_cache_entries(self, cache: Any, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace ``layer``'s cached keys and values (B, H_kv, T, hd) (merged entries of a kv_cache stage)."""
        entry = cache.layers[layer]
        entry.keys, entry.values = keys.contiguous(), values.contiguous()

    # --- signals -----------------------------------------------------------------------------
    def project_queries(self, layer: int, hidden: torch.Tensor, position_embeddings: Any, rows: torch.Tensor, *,
                        rotary: bool = True, sample: int = 0, projected: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, Q, hd) queries of ``layer`` for rows ``rows`` (B, Q) of its input ``hidden`` (B, N, D).

        ``hidden`` may be one sample of the batch: ``sample`` says which, to pick its rotary angles.
        ``projected`` (B, N, H·hd): the output of :meth:`query_projection` for ``hidden``, captured in the
        model's forward; the rows are then gathered from it instead of projected again.
        """
        raise NotImplementedError

    def query_projection(self, layer: int) -> nn.Module | None:
        """The module of ``layer`` whose output is its queries before any query norm and the rotary embedding
        (B, N, H·hd) — captured in the forward so that attention signals need not project them again — or None."""
        return None

    def project_keys(self, layer: int, hidden: torch.Tensor, position_embeddings: Any, *,
                     rotary: bool = True) -> torch.Tensor:
        """(B, H_kv, N, hd) keys of ``layer`` for its input ``hidden`` (B, N, D)."""
        raise NotImplementedError

    def attention_scaling(self, layer: int) -> float:
        """The factor ``layer`` multiplies q·k by (1/sqrt(head_dim) unless the model says otherwise)."""
        raise NotImplementedError

    def attention_module(self, layer: int) -> nn.Module:
        """The self-attention module of decoder ``layer`` (its ``config`` names the attention implementation)."""
        return self.layers[layer].self_attn

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int = 0) -> Any:
        """The LLM's rotary ``(cos, sin)`` for ``position_ids`` (B, N; (A, B, N) with :attr:`rope_axes` A > 1), as
        decoder ``layer`` takes them."""
        raise NotImplementedError

    def rotary_kind(self, layer: int) -> Any:
        """What selects decoder ``layer``'s rotary embedding where the LLM's layers differ (Gemma 3: the layer type;
        its local and global layers rotate with different bases); None where every layer shares one."""
        return None

    def rope_positions(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """(A, B, N) multi-axis rotary positions from the ``position_ids`` the model passes its LLM, for families
        with :attr:`rope_axes` > 1; None where they are not there."""
        return None


def _rows_of(t: torch.Tensor, sample: int, batch: int) -> torch.Tensor:
    """Rows of a batch-first tensor for ``batch`` samples starting at ``sample`` (a batch of 1 broadcasts)."""
    return t if t.shape[0] == 1 else t[sample:sample + batch]


class LlamaStyleAdapter(ModelAdapter):
    """Shared by LVLMs whose LLM layers are Llama-style: ``input_layernorm``, ``self_attn.{q,k}_proj``, RoPE. By
    default the LLM is ``model.model.language_model`` (transformers' LVLMs) and the visual tokens are the
    ``config.image_token_id`` placeholders of ``input_ids``."""

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.model.config.image_token_id

    def project_queries(self, layer, hidden, position_embeddings, rows, *, rotary=True, sample=0, projected=None):
        block = self.layers[layer]
        attn = block.self_attn
        b = hidden.shape[0]
        if projected is not None:
            q = gather_tokens(projected, rows)
        else:
            q = attn.q_proj(block.input_layernorm(gather_tokens(hidden, rows)))  # per-token norm: the rows only
        q = self.query_heads(attn, q)
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        if rotary:
            cos, sin = (gather_tokens(_rows_of(t, sample, b), rows) for t in position_embeddings)
            q = apply_rope(q, cos, sin)
        return q

    def query_heads(self, attn: nn.Module, projected: torch.Tensor) -> torch.Tensor:
        """(B, Q, H, hd) queries from the query projection's output (B, Q, width) of attention module ``attn``."""
        return projected.view(*projected.shape[:2], -1, attn.head_dim)

    def query_projection(self, layer):
        attn = getattr(self.layers[layer], "self_attn", None)  # none in a linear-attention layer
        return None if attn is None else attn.q_proj

    def project_keys(self, layer, hidden, position_embeddings, *, rotary=True):
        block = self.layers[layer]
        attn = block.self_attn
        b, n, _ = hidden.shape
        k = attn.k_proj(block.input_layernorm(hidden)).view(b, n, -1, attn.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        if rotary:
            cos, sin = (expand_batch(t, b) for t in position_embeddings)
            k = apply_rope(k, cos, sin)
        return k

    def attention_scaling(self, layer):
        return float(self.layers[layer].self_attn.scaling)

    def rotary_embeddings(self, hidden, position_ids, layer=0):
        return self.language_model.rotary_emb(hidden, position_ids)
