"""One sequence's bookkeeping, from its prefill through its decoding steps, in typed records.

An :class:`Episode` starts at a prefill forward that holds visual tokens and lasts while the same KV cache
is extended. It knows the input frame (which tokens are visual, which are real), the tokens flowing
through the decoder now (:class:`Flow`), what each layer's cache holds (:class:`Held`), and what each
site recorded for later (:class:`KVRecord`, :class:`CrossCut`). :meth:`Episode.cut` is the one place
where a layer's cache is made to hold fewer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenprune.adapters.base import ModelAdapter
from tokenprune.core.masks import gather_tokens


@dataclass
class Held:
    """What one layer's KV cache holds of the prompt, beyond the full frame (None: every input token)."""

    #: (B, K) input-frame indices of the cached prompt entries, or None for the whole prompt.
    index: torch.Tensor | None = None
    #: (B, K) False on filler slots (rows of a ragged batch left-filled to equal length) and on entries a
    #: decoding-time re-pruning in ``mask`` mode hides for now, or None: none.
    live: torch.Tensor | None = None
    #: (B, K) additive log-size attention bias of the entries (proportional attention), or None.
    bias: torch.Tensor | None = None
    #: (B,) how far a renumbering stage moved the layer's positions down, or None.
    shift: torch.Tensor | None = None


@dataclass
class Flow:
    """The tokens flowing through the decoder after the latest stage (all None before the first)."""

    #: (B, K) input-frame indices of the tokens flowing now.
    index: torch.Tensor | None = None
    #: (B, K) False on filler slots, or None: no filler.
    live: torch.Tensor | None = None
    #: (B, K) position ids of the flowing tokens.
    positions: torch.Tensor | None = None
    #: whether a stage renumbered positions contiguously.
    renumbered: bool = False
    #: (B, K) how many original tokens each flowing token stands for (merging).
    sizes: torch.Tensor | None = None
    #: (B, K) log-size attention bias, when some stage asked for proportional attention.
    key_bias: torch.Tensor | None = None
    #: (B,) how far renumbering stages moved the positions after the prompt down (1-D: the tokens they removed).
    pos_shift: torch.Tensor | None = None
    #: (A, B, K) multi-axis rotary positions of the flowing tokens once a stage renumbered them (M-RoPE), or None.
    rope_positions: torch.Tensor | None = None

    def held(self) -> Held:
        """What a layer entered now will cache."""
        return Held(self.index, self.live, self.key_bias, self.pos_shift)


@dataclass
class FullFrame:
    """The layer keyword arguments the LLM built once for the whole prompt, read at the first layer."""

    position_ids: torch.Tensor  # (B, N)
    position_embeddings: Any  # the rotary (cos, sin), or None
    attention_mask: torch.Tensor | None
    positions_given: bool  # whether the LLM passed position_ids to its layers


@dataclass
class Capture:
    """A decoder layer's input in the prefill, for the attention signals of the stage right after it."""

    layer: int
    hidden: torch.Tensor
    position_embeddings: Any
    queries: torch.Tensor | None = None  # the layer's query projection of ``hidden``, from its own forward


@dataclass
class KVRecord:
    """A kv_cache stage's scores of one layer's cached tokens, taken in the prefill right after the layer ran."""

    scores: torch.Tensor | None
    named_scores: dict[str, torch.Tensor]
    index: torch.Tensor  # (B, K) input-frame indices of the tokens the layer cached
    live: torch.Tensor | None
    sizes: torch.Tensor
    positions: torch.Tensor
    ms: float  # time in the stage's shifts and scorers
    ms_by_op: dict[str, float] = field(default_factory=dict)  # {"<i>:<op>": ms} when the pipeline times operators


@dataclass
class CrossCut:
    """What a cross_attention stage kept of the image features, and what every cross-attention layer then reads."""

    index: torch.Tensor  # (B, K) kept image-feature indices
    live: torch.Tensor | None  # (B, K) False on filler slots
    bias: torch.Tensor | None  # (B, K) log-size attention bias (proportional attention)
    image: torch.Tensor | None = None  # (B, K, D) the kept features
    mask: torch.Tensor | None = None  # the prefill's cross-attention mask cut to them


@dataclass
class Episode:
    """Bookkeeping of one sequence, from its prefill through its decoding steps."""

    cache: Any
    visual: torch.Tensor  # (B, N) bool, in the input frame
    valid: torch.Tensor  # (B, N) bool: real tokens (not padding)
    phase: str = "prefill"
    seen: int = 0  # tokens fed so far, in the full (unpruned) frame
    query_len: int = 0  # tokens of the forward now running
    decode_step: int = 0  # 1 = the first forward after the prefill
    flow: Flow = field(default_factory=Flow)
    held: dict[int, Held] = field(default_factory=dict)  # per layer, what its prefill cache holds
    #: per layer, what it held before a decoding-time re-pruning in ``mask`` mode first hid entries of it
    decode_base: dict[int, Held] = field(default_factory=dict)
    full: FullFrame | None = None
    #: the layer kwargs of ``flow.index``, gathered once per stage: (index, kwargs)
    #: (index, kwargs, the layer mask and rotary embeddings they came from): the latest gathered layer kwargs
    frame: tuple[torch.Tensor, dict[str, Any], Any, Any] | None = None
    capture: Capture | None = None
    #: True once the first layer's cache is shorter than the prompt: the LLM must then be handed full-frame masks
    short_first_cache: bool = False
    decode_masks: dict[Any, torch.Tensor] = field(default_factory=dict)  # per step, built once per held index
    #: FlashAttention's convention after the first cache was trimmed: this step's full-frame 2-D padding mask (B, T),
    #: from which each layer's own is gathered (None: nothing padded, every layer attends causally to its cache)
    frame_mask_2d: torch.Tensor | None = None
    follows_beams: bool = False  # the cache's reorder_cache (beam search) reorders this episode's rows too
    decode_pe: dict[Any, Any] = field(default_factory=dict)  # per step, position shift and rotary kind
    grids: list[tuple[int, int] | None] | None = None  # per sample (rows, cols) of its visual tokens
    #: (B, N) long, input frame: the bidirectional attention block of each token (-1: none), where the model
    #: lets the tokens of one image attend to each other both ways (Gemma 3); None: causal attention only
    blocks: torch.Tensor | None = None
    #: (B, T) the 2-D attention mask the model was given this decoding step (models that build one mask per layer
    #: type from it before their LLM runs)
    step_mask: torch.Tensor | None = None
    kinds: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, N) masks of the adapter's token kinds
    patch_of: torch.Tensor | None = None  # (B, N) row of each visual token in the vision features
    tile_of: torch.Tensor | None = None  # (B, N) tile of each visual token (-1: none), for per-tile budgets
    tile_grids: list[list[tuple[int, int]]] | None = None  # per sample, (rows, cols) of each tile
    video: torch.Tensor | None = None  # (B, N) bool: video placeholders (None: the family takes no videos)
    frame_of: torch.Tensor | None = None  # (B, N) frame of each visual token within its clip (0: an image), -1: none
    cell_of: torch.Tensor | None = None  # (B, N) raster index of each visual token within its tile, -1: none
    guide: Any = None  # (queries, heads) -> (B, N) attention of the guide model, run on first use
    kv: dict[int, KVRecord] = field(default_factory=dict)  # kv_cache stage: per compressed layer, until cut
    kv_pending: dict[int, tuple[torch.Tensor, Any]] = field(default_factory=dict)  # layer input until it ran
    decode_scores: torch.Tensor | None = None  # (B, N_prefill) of decode.score_layer, this step
    #: ``decode: {scorer: stage}``: per compressed layer, its attention history over the prompt entries it holds,
    #: (probs (B, H, R, K), real rows (B, R)) (:class:`~tokenprune.runtime.sources.AttentionHistory`)
    decode_history: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    cross: CrossCut | None = None
    #: (A, B, N) the multi-axis rotary positions the model gave its LLM for this forward (M-RoPE), or None.
    rope: torch.Tensor | None = None
    rope_prefill: torch.Tensor | None = None  # the prefill's, kept for renumbering stages
    #: the first layer with a KV cache — the one the LLM sizes its decoding masks by (a hybrid LLM's first
    #: attention layer; layer 0 elsewhere)
    first_cache_layer: int = 0
    #: (index, mask) the 2-D padding mask of the tokens flowing now, for linear-attention layers
    recurrent_mask: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __post_init__(self) -> None:
        self.query_len = self.visual.shape[1]

    @property
    def prefill_len(self) -> int:
        return self.visual.shape[1]

    def valid_now(self) -> torch.Tensor:
        """(B, K) real (not padding, not filler) tokens among those flowing now."""
        valid = self.valid.gather(1, self.flow.index)
        return valid if self.flow.live is None else valid & self.flow.live

    def real(self, index: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
        """(B, K) real (not padding, not filler) tokens among ``index`` with filler mask ``live``."""
        valid = self.valid.gather(1, index)
        return valid if live is None else valid & live

    def held_at(self, layer: int) -> Held:
        return self.held.get(layer) or Held()

    def begin_decode_step(self, query_len: int) -> None:
        self.phase = "decode"
        self.query_len = query_len
        self.decode_masks = {}
        self.decode_pe = {}
        self.decode_step += 1
        self.decode_scores = None

    def reorder_rows(self, beam_idx: torch.Tensor) -> None:
        """Beam search moved the cache's batch rows (row r now holds what row ``beam_idx[r]`` held): what each layer's
        cache holds, and each row's prompt, follow. A decoding-time re-pruning leaves the beams of one sample holding
        different entries, so this is what keeps their masks on their own entries."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, beam_idx.to(t.device))

        self.held = {layer: Held(pick(h.index), pick(h.live), pick(h.bias), pick(h.shift))
                     for layer, h in self.held.items()}
        self.decode_base = {layer: Held(pick(h.index), pick(h.live), pick(h.bias), pick(h.shift))
                            for layer, h in self.decode_base.items()}
        self.decode_history = {layer: (pick(p), pick(r)) for layer, (p, r) in self.decode_history.items()}
        self.valid, self.visual = pick(self.valid), pick(self.visual)
        self.decode_masks.clear()
        self.decode_pe.clear()

    def record(self, layer: int) -> None:
        """Layer ``layer`` is about to run in the prefill on the tokens flowing now: its cache will hold them."""
        self.held[layer] = self.flow.held()
        if layer == self.first_cache_layer and self.flow.index is not None:  # a stage before it: every cache is short
            self.short_first_cache = True

    def cut(self, adapter: ModelAdapter, layer: int, rel: torch.Tensor, index: torch.Tensor, live: torch.Tensor | None,
            *, bias: torch.Tensor | None | str = "gather", entries: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> None:
        """Layer ``layer``'s cache now holds the tokens ``index`` (B, K) (input frame; ``live`` marks fillers): the
        entries at ``rel`` (B, K) of what it held, or, with ``entries``, the given (keys, values) (merged).

        ``bias``: the entries' log-size bias; ``"gather"`` keeps the held one for the entries that stay.
        """
        if entries is not None:
            adapter.set_cache_entries(self.cache, layer, *entries)
        else:
            adapter.select_cache_entries(self.cache, layer, rel)
        old = self.held_at(layer)
        if isinstance(bias, str):
            bias = gather_tokens(old.bias, rel) if old.bias is not None else None
        self.held[layer] = Held(index, live, bias, old.shift)
        if layer == self.first_cache_layer:
            self.short_first_cache = True
        self.decode_masks.clear()
