"""``TokenState``: what flows through a stage, and its lazily computed signals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tokenprune.core.attention import AttentionSource, VisionSignalSource, query_rows


class AttentionShift(Protocol):
    """How :class:`Signals` sees a shift correction (:class:`~tokenprune.core.operator.Shift` implements it)."""

    rotary: bool

    def logit_bias(self, ctx: AttentionContext) -> torch.Tensor | None: ...

    def adjust_logits(self, ctx: AttentionContext) -> None: ...

    def adjust_probs(self, ctx: AttentionContext) -> None: ...


#: What ``Signals.features`` can give (similarity features for diversity, matching and merging).
FEATURE_KINDS: tuple[str, ...] = ("hidden", "keys", "vision_keys")


@dataclass
class AttentionContext:
    """What a shift correction sees and may change while one sample's attention rows are computed.

    ``Shift.logit_bias`` runs first, while ``logits`` is still None, and may replace ``allowed`` (Q, N) bool;
    then ``logits`` (H, Q, N) — with the biases and, when some shift gave one, −inf where not allowed — is
    set, and ``Shift.adjust_logits`` may replace both (``logits`` may be a view of the stage's cached logits:
    never written in place unless ``owned``; a replaced ``allowed`` is applied again before the softmax);
    ``probs`` (H, Q, N) is set after the softmax and changed by ``Shift.adjust_probs``.
    """

    signals: Signals
    sample: int
    rows: torch.Tensor
    rotary: bool
    logits: torch.Tensor | None
    allowed: torch.Tensor
    probs: torch.Tensor | None = None
    #: True once ``logits`` is a tensor made for this computation (a shift replaced it): later steps may then
    #: overwrite it instead of allocating another (H, Q, N) block. False while it may be the stage's cached logits.
    owned: bool = False


class Signals:
    """Lazy signals of a stage, each computed on first use and only once.

    Operators ask for what they need (``state.signals.attention(queries="last")``); nothing is
    computed for a pipeline that does not ask. Attention comes from an
    :class:`~tokenprune.core.attention.AttentionSource` that the attach machinery (or a notebook)
    supplies; operators never touch the model.
    """

    def __init__(self, state: TokenState, source: AttentionSource | None = None):
        self._state = state
        self.source = source
        #: Vision-tower signals (CLS attention, keys), when the model's adapter gives them.
        self.vision: VisionSignalSource | None = None
        self.vision_unavailable: str | None = None  # the adapter's reason, when it cannot give them
        #: ``(queries, heads) -> (B, N_input)`` attention of a small guide model (SGL), when one is attached.
        self.guide: Callable[[str, str], torch.Tensor] | None = None
        self._cache: dict[tuple, Any] = {}

    @property
    def state(self) -> TokenState:
        """The state these signals belong to."""
        return self._state

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per stage under ``key``."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _source(self) -> AttentionSource:
        if self.source is None:
            raise RuntimeError("attention signals need a model layer before the site (layer >= 1) or an "
                               "AttentionSource (TokenState.from_tensors(..., attention=...)); none is available here")
        return self.source

    def query_rows(self, queries: str, sample: int) -> torch.Tensor:
        """(Q,) query rows of ``sample`` in set ``queries`` (see :func:`tokenprune.core.attention.query_rows`)."""
        st = self._state
        if self.source is not None:
            rows = self.source.query_rows(queries, sample)
            if rows is not None:
                return rows
        image = st.visual_mask[sample]
        if st.protected_mask is not None:
            image = image | st.protected_mask[sample]
        return self.cached(("rows", queries, sample), lambda: query_rows(
            queries, image, st.valid_mask[sample], st.hidden[sample]))

    #: Bytes of logit blocks a stage keeps for reuse (all samples together). A block that would exceed it is
    #: computed and handed out but not kept. Small: the big blocks (every visual query, chunk by chunk) are read
    #: once — ASAP's trend fit reads queries and keys, not logits, when the source gives them — and keeping them
    #: costs more than it saves: on a CPU every kept 16 MiB chunk is fresh pages for the next one (at
    #: LLaVA-NeXT-7B width, keeping up to 1 GiB made ASAP's visual scorer 3x slower: 2.9 s vs 0.9 s).
    logit_cache_bytes: int = 64 * 2**20
    #: Largest (H, Q, N) fp32 block of logits or probabilities the attention signals make at once: more query
    #: rows run in chunks of rows (:meth:`row_chunks`), so a few thousand visual queries never make one
    #: gigabyte-sized block (ASAP's visual scorer at LLaVA-NeXT-7B width: 32 heads x 2928 rows x 2943 keys).
    chunk_bytes: int = 16 * 2**20

    def row_chunks(self, sample: int, rows: torch.Tensor, *, rotary: bool = True) -> list[torch.Tensor]:
        """``rows`` split, in order, into chunks whose (H, rows, N) fp32 logits hold at most :attr:`chunk_bytes`
        (at least one row a chunk). The same rows always split the same way, so blocks cached by one operator are
        found again by the next."""
        if rows.numel() == 0:
            return [rows]
        heads, keys = self.cached(("block_shape", sample, rotary), lambda: tuple(
            self._source().logits(sample, rows[:1], rotary=rotary).shape[::2]))  # (H, 1, N): H and N
        return list(rows.split(max(1, self.chunk_bytes // (4 * heads * keys))))

    def logits(self, sample: int, rows: torch.Tensor, *, rotary: bool = True) -> torch.Tensor:
        """(H, Q, N) fp32 raw logits (scaled q·k, unmasked) of query ``rows`` of ``sample``, from the source.

        Computed once per stage: rows that run contiguously through a block computed earlier (the instruction
        and strided visual rows of ASAP's trend fit, asked for again by its scorers) are a view of that block,
        as long as the kept blocks fit in :attr:`logit_cache_bytes`. Callers must not change the result in place."""
        kept = self._kept_logits(sample, rows, rotary)
        if kept is not None:
            return kept
        out = self._source().logits(sample, rows, rotary=rotary).float()
        size = out.numel() * out.element_size()
        total = self._cache.get(("logit_bytes",), 0)
        if total + size <= self.logit_cache_bytes:
            self._cache.setdefault(("logit_blocks", sample, rotary), []).append((rows, out))
            self._cache.setdefault(("logit_block_of_rows", sample, rotary), {})[tuple(rows.tolist())] = out
            self._cache[("logit_bytes",)] = total + size
        return out

    def _kept_logits(self, sample: int, rows: torch.Tensor, rotary: bool) -> torch.Tensor | None:
        """The logits of ``rows`` from a block this stage keeps (a view), or None."""
        exact = self._cache.get(("logit_block_of_rows", sample, rotary), {}).get(tuple(rows.tolist()))
        if exact is not None:  # the same rows again: a lookup
            return exact
        n = rows.numel()
        for block_rows, block in self._cache.get(("logit_blocks", sample, rotary), []):
            starts = torch.nonzero(block_rows == rows[0]).flatten().tolist() if n else []
            for start in starts:
                if start + n <= block_rows.numel() and torch.equal(block_rows[start:start + n], rows):
                    return block[:, start:start + n]
        return None

    def _biased_logits(self, sample: int, rows: torch.Tensor, rotary: bool, bias: torch.Tensor) -> torch.Tensor:
        """``logits + bias`` for ``rows``, written into ``bias`` (H, Q, N): from a kept block when there is one,
        else fused into the q·kᵀ product (one GEMM that reads the bias, no separate logit block) when the source
        gives queries and keys, else added to the source's logits."""
        kept = self._kept_logits(sample, rows, rotary)
        if kept is not None:
            return bias.add_(kept.to(bias.device))
        q_and_k = self.queries_and_keys(sample, rows, rotary=rotary)
        if q_and_k is None:
            return bias.add_(self.logits(sample, rows, rotary=rotary).to(bias.device))
        queries, keys = q_and_k
        bias = bias.contiguous()  # a no-op for the shifts' fresh blocks; the GEMM writes through a view of it
        h, n_q, hd = queries.shape
        h_kv = keys.shape[0]  # grouped-query attention: the heads sharing a key head stacked into one product
        bias.view(h_kv, (h // h_kv) * n_q, -1).baddbmm_(queries.reshape(h_kv, -1, hd), keys.transpose(-1, -2))
        return bias

    def queries_and_keys(self, sample: int, rows: torch.Tensor, *,
                         rotary: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(queries (H, Q, hd), keys (H_kv, N, hd))`` fp32 whose product is :meth:`logits` of ``rows`` of
        ``sample`` (the queries carry the attention scale), or None when the source gives logits only."""
        source = self._source()
        queries = source.scaled_queries(sample, rows, rotary=rotary)
        keys = source.logit_keys(sample, rotary=rotary) if queries is not None else None
        return None if keys is None else (queries, keys)

    def attention_probs(self, sample: int, rows: torch.Tensor) -> torch.Tensor:
        """(H, Q, N) attention probabilities of ``rows`` of ``sample``, with the stage's shift corrections.

        Keys are masked causally (in sequence order) and on padding; a shift may change the mask
        (ASAP's bidirectional visual block), the logits (before the softmax) or the probabilities.
        Rows that may attend to no key come out as zeros.
        """
        st = self._state
        shifts = st.shifts
        rotary = all(s.rotary for s in shifts)
        dev = st.valid_mask.device
        keys = torch.arange(st.num_tokens, device=dev)
        allowed = st.valid_mask[sample][None, :]
        given = self._source().allowed(sample, rows)
        if given is None:
            allowed = allowed & (keys[None, :] <= rows.to(dev)[:, None])  # causal, in sequence order
        else:
            allowed = allowed & given.to(dev)
        ctx = AttentionContext(self, sample, rows, rotary, None, allowed)
        bias = None
        for s in shifts:
            b = s.logit_bias(ctx)
            if b is not None:
                bias = b if bias is None else bias.add_(b.to(bias.device))
        if bias is None:
            ctx.logits = self.logits(sample, rows, rotary=rotary)
        else:  # the mask goes into the bias too, so the softmax needs no pass of its own for it
            ctx.logits = self._biased_logits(sample, rows, rotary, _mask_into(bias, ctx.allowed))
            ctx.owned = True
        ctx.allowed = ctx.allowed.to(ctx.logits.device)
        folded = ctx.allowed if bias is not None else None
        for s in shifts:
            s.adjust_logits(ctx)
        # the mask folded into the logits, unless a shift replaced it after them: then it goes in again
        ctx.probs = masked_softmax(ctx.logits, ctx.allowed, in_place=ctx.owned, masked=ctx.allowed is folded)
        for s in shifts:
            s.adjust_probs(ctx)
        return ctx.probs

    def _live_probs(self, queries: str, stride: int = 1):
        """Per sample with query rows: (b, probs (H, Q', N)) of its rows (every ``stride``-th of the set, in
        sequence order) that may attend to some key, in chunks of rows (:meth:`row_chunks`); a sample may come
        several times, once per chunk."""
        for b in range(self._state.batch_size):
            rows = self.query_rows(queries, b)[::stride]
            if rows.numel() == 0:
                continue
            for chunk in self.row_chunks(b, rows, rotary=all(s.rotary for s in self._state.shifts)):
                probs = self.attention_probs(b, chunk)  # (H, Q, N)
                live = probs[0].sum(-1) > 0  # a row sums to 1 in every head, or is 0 in every head
                if bool(live.all()):
                    yield b, probs  # the common case: no copy of the block
                elif bool(live.any()):
                    yield b, probs[:, live]

    def attention(self, queries: str = "last", heads: str = "mean", stride: int = 1, rows: str = "mean") -> torch.Tensor:
        """(B, N) attention each token receives from the query set, reduced over heads, averaged over queries
        (``rows: max``: the largest over them).

        Only query rows that may attend to some key count. ``stride`` > 1 keeps every
        ``stride``-th row of the set (in sequence order): a cheaper estimate for large sets (``visual``).
        """
        reduce = {"mean": torch.mean, "sum": torch.sum, "max": lambda t, dim: t.amax(dim=dim)}
        if heads not in reduce:
            raise ValueError(f"heads={heads!r}; allowed: {', '.join(reduce)}")
        if rows not in ("mean", "max"):
            raise ValueError(f"rows={rows!r}; allowed: mean, max")
        st = self._state

        def compute() -> torch.Tensor:
            out = torch.zeros(st.visual_mask.shape, dtype=torch.float32, device=st.visual_mask.device)
            n_rows = torch.zeros(st.batch_size, dtype=torch.float32)  # live query rows per sample
            for b, probs in self._live_probs(queries, stride):
                if rows == "max":  # (probabilities are >= 0, so the zeros out starts with do not change a max)
                    out[b] = torch.maximum(out[b], reduce[heads](probs, dim=0).amax(0).to(out.device))
                elif heads == "mean":  # one pass over the block
                    out[b] += probs.sum(dim=(0, 1)).div_(probs.shape[0]).to(out.device)
                else:
                    out[b] += reduce[heads](probs, dim=0).sum(0).to(out.device)
                n_rows[b] += probs.shape[1]
            if rows == "max":
                return out
            return out / n_rows.clamp_min(1).to(out.device)[:, None]

        return self.cached(("attention", queries, heads, stride, rows, self._shift_key()), compute)

    def attention_heads(self, queries: str = "last") -> torch.Tensor:
        """(B, H, N) attention each token receives from the query set, per head, averaged over queries.

        Only query rows that may attend to some key count in the average; samples without any are 0.
        """
        st = self._state

        def compute() -> torch.Tensor:
            out: torch.Tensor | None = None
            n_rows = torch.zeros(st.batch_size, dtype=torch.float32)  # live query rows per sample
            for b, probs in self._live_probs(queries):
                if out is None:
                    out = torch.zeros(st.batch_size, probs.shape[0], st.num_tokens, device=st.visual_mask.device)
                out[b] += probs.sum(1).to(out.device)
                n_rows[b] += probs.shape[1]
            if out is None:
                raise RuntimeError(f"no sample of this batch has query rows of set {queries!r}")
            return out / n_rows.clamp_min(1).to(out.device)[:, None, None]

        return self.cached(("attention_heads", queries, self._shift_key()), compute)

    def _shift_key(self) -> tuple:
        return tuple(s.cache_key() for s in self._state.shifts)

    def guide_attention(self, queries: str = "last", heads: str = "mean") -> torch.Tensor:
        """(B, N) attention a small guide model's ``queries`` pay each token, summed over all its layers (SGL)."""
        if self.guide is None:
            raise RuntimeError("guide_attention needs a guide model: pipeline.attach(model, guide=small_model)")
        return self.cached(("guide", queries, heads), lambda: self.guide(queries, heads).to(
            self._state.source_index.device).gather(1, self._state.source_index))

    # --- vision-tower signals ------------------------------------------------------------------
    def _vision(self) -> VisionSignalSource:
        if self.vision is None:
            if self.vision_unavailable:
                raise RuntimeError(f"vision-tower signals are not available: {self.vision_unavailable}")
            raise RuntimeError("vision-tower signals need a model's vision tower: attach the pipeline to a model "
                               "whose adapter gives them, with an operator that declares needs_vision = True (or "
                               "set state.signals.vision to a VisionSignalSource)")
        return self.vision

    def vision_cls_attention(self, layer: int | float = -2, heads: str = "mean", queries: str = "cls") -> torch.Tensor:
        """(B, N) attention of the vision tower's CLS token to each visual token's patch at vision ``layer``
        (recomputed from that layer's input, heads averaged or summed); 0 on other tokens. ``queries: all``: the
        attention the patch receives from every query instead, averaged over them (HiPrune's global attention);
        in a tower without a CLS token the two are the same."""
        if heads not in ("mean", "sum"):
            raise ValueError(f"heads={heads!r}; allowed: mean, sum")
        if queries not in ("cls", "all"):
            raise ValueError(f"queries={queries!r}; allowed: cls, all")

        def compute() -> torch.Tensor:
            vision = self._vision()
            probs = vision.cls_attention(layer) if queries == "cls" else vision.received_attention(layer)  # (R, H)
            per = probs.mean(-1) if heads == "mean" else probs.sum(-1)
            return vision.to_tokens(per, self._state.source_index, 0.0)

        return self.cached(("vision_cls_attention", layer, heads, queries), compute)

    def vision_keys(self, layer: int = -2) -> torch.Tensor:
        """(B, N, H, hd) keys of each visual token's patch at vision ``layer``; zeros on other tokens."""
        return self.cached(("vision_keys", layer), lambda: self._vision().to_tokens(
            self._vision().keys(layer), self._state.source_index, 0.0))

    def features(self, kind: str, vision_layer: int = -2) -> torch.Tensor:
        """(B, N, F) fp32 per-token features for similarity: ``hidden`` (the states entering the site),
        ``keys`` (the source layer's keys, heads concatenated) or ``vision_keys`` (the vision tower's
        patch keys at ``vision_layer``, heads concatenated; zeros on non-visual tokens)."""
        st = self._state
        if kind == "hidden":
            return st.hidden.float()
        if kind == "keys":
            return self.keys().float().transpose(1, 2).flatten(2).to(st.hidden.device)
        if kind == "vision_keys":
            return self.vision_keys(vision_layer).float().flatten(2).to(st.hidden.device)
        raise ValueError(f"features={kind!r}; allowed: {', '.join(FEATURE_KINDS)}")

    def keys(self) -> torch.Tensor:
        """(B, H_kv, N, hd) keys of the source layer."""
        k = self._source().keys()
        if k is None:
            raise RuntimeError("this attention source has no keys")
        return k

    def layer_input(self) -> torch.Tensor:
        """(B, N, D) hidden states entering the layer before the site (the source layer's input)."""
        h = self._source().layer_input()
        if h is None:
            raise RuntimeError("this attention source has no layer input (it needs a model layer before the site)")
        return h

    def key_norms(self) -> torch.Tensor:
        """(B, N) L2 norm of each token's key at the source layer, averaged over key heads."""
        return self.cached(("key_norms",), lambda: self.keys().float().norm(dim=-1).mean(dim=1).to(
            self._state.visual_mask.device))


def _mask_into(bias: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``bias`` (H, Q, N) with −inf where ``allowed`` (Q, N) is False, in place: a fill of the disallowed columns
    when every row allows the same keys (ASAP's visual block), else one masked fill."""
    allowed = allowed.to(bias.device)
    if bool((allowed == allowed[:1]).all()):
        return bias.index_fill_(-1, (~allowed[0]).nonzero().flatten(), float("-inf"))
    return bias.masked_fill_(~allowed, float("-inf"))


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor, in_place: bool = False,
                   masked: bool = False) -> torch.Tensor:
    """Softmax over the last axis restricted to ``allowed`` (broadcast); all-masked rows give zeros.

    An additive (0 / −inf) mask of ``allowed``'s shape, broadcast in one add (cheaper than a masked fill of
    the full block; into ``logits`` itself with ``in_place``), then torch's fused softmax; only when some row
    may attend to nothing (its softmax is NaN) is a further pass spent to zero it. ``masked``: the logits
    already hold −inf wherever ``allowed`` is False, so no mask is added."""
    if masked:
        probs = torch.softmax(logits, dim=-1)
    else:
        mask = torch.zeros(allowed.shape, dtype=logits.dtype, device=logits.device).masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(logits.add_(mask) if in_place else logits + mask, dim=-1)
    empty = ~allowed.any(dim=-1, keepdim=True)
    if bool(empty.any()):
        probs = probs.masked_fill(empty, 0.0)
    return probs


@dataclass
class TokenState:
    """The tokens entering one stage, plus what the stage's operators decide about them.

    Shapes: B samples, N tokens (visual and text, left padding included), D hidden size.

    - ``hidden`` (B, N, D): hidden states entering the site's decoder layer (a merger may rewrite them).
    - ``visual_mask`` (B, N) bool: visual tokens (the only ones a selector may drop).
    - ``valid_mask`` (B, N) bool: False on padding.
    - ``positions`` (B, N) long: the position ids of the tokens.
    - ``source_index`` (B, N) long: index of each token in the model's input sequence.
    - ``sizes`` (B, N) float: how many original tokens each token stands for (mergers grow them).
    - ``layer``: the site (decoder layer the stage runs before; 0 = before the LLM).
    - ``grid``: (rows, cols) of the visual tokens in raster order, for every sample or as a list with
      one entry (or None) per sample; where unknown, a square is assumed.
    - ``scores`` (B, N) float: sum of the scorers' weighted scores (None before any scorer).
    - ``named_scores``: further score sets by name, for scorers with ``into: NAME`` and selectors with
      ``scores: NAME`` (Cross-Self Pruning ranks by two attentions with separate budgets).
    - ``keep_mask`` (B, N) bool: the tokens that survive the stage (set by the selector).
    - ``shifts``: the attention-shift corrections of the stage, applied by ``signals.attention``.
    - ``compact_kv_before_site``: set by a compactor; the KV cache of earlier layers keeps only the kept tokens
      (those from layer ``compact_kv_from`` on).
    - ``protected_mask`` (B, N) bool or None: visual tokens the stage protects (its ``protect`` key,
      e.g. LLaVA-NeXT's ``image_newline`` tokens). They are left out of ``visual_mask``, so no
      operator drops or merges them and budgets count only the others, but query sets still count
      them as part of the image.
    - ``merged_into`` (B, N) long or None: for each token a merger folded into another, that token's
      index (-1 elsewhere; the strongest target of a soft merge); the trace reports it.
    - ``tiles`` (B, N) long or None: the tile of each visual token (-1: in none), for stages with
      ``budget: per_tile``; ``tile_grids[b][t]`` is the (rows, cols) of sample b's tile t, whose tokens
      are in raster order.
    - ``frames``, ``cells`` (B, N) long or None, for operators that declare ``needs_frames``: each visual token's
      frame within its video clip (0 for an image and a clip's first frame) and its raster index within that
      frame (its tile); the frames of a clip are consecutive tiles (``tiles`` is set too); -1 elsewhere.
    - ``proportional_attention``: set by a merger; layers after the site add ``log(size)`` to
      the attention logits of each key (ToMe's proportional attention).

    Build one from plain tensors with :meth:`from_tensors` to call operators standalone.
    """

    hidden: torch.Tensor
    visual_mask: torch.Tensor
    valid_mask: torch.Tensor
    positions: torch.Tensor
    source_index: torch.Tensor
    sizes: torch.Tensor
    layer: int
    grid: tuple[int, int] | list[tuple[int, int] | None] | None = None
    scores: torch.Tensor | None = None
    named_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    keep_mask: torch.Tensor | None = None
    shifts: list[AttentionShift] = field(default_factory=list)
    compact_kv_before_site: bool = False
    compact_kv_from: int = 0
    proportional_attention: bool = False
    protected_mask: torch.Tensor | None = None
    merged_into: torch.Tensor | None = None
    tiles: torch.Tensor | None = None
    tile_grids: list[list[tuple[int, int]]] | None = None
    frames: torch.Tensor | None = None
    cells: torch.Tensor | None = None
    signals: Signals = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.signals = Signals(self)

    @classmethod
    def from_tensors(cls, hidden: torch.Tensor, visual_mask: torch.Tensor, *, valid_mask: torch.Tensor | None = None,
                     positions: torch.Tensor | None = None, sizes: torch.Tensor | None = None,
                     scores: torch.Tensor | None = None, attention: AttentionSource | None = None,
                     grid: tuple[int, int] | list[tuple[int, int] | None] | None = None,
                     layer: int = 1) -> TokenState:
        """A state from plain tensors, for notebooks and tests: ``op(TokenState.from_tensors(h, vis))``.

        ``hidden`` (B, N, D); ``visual_mask`` (B, N) bool; padding defaults to none, positions to
        ``0..N-1``, sizes to 1; ``attention`` supplies attention signals (e.g. a
        :class:`~tokenprune.core.attention.LogitsSource`).
        """
        visual_mask = torch.as_tensor(visual_mask, dtype=torch.bool)
        if hidden.dim() != 3 or hidden.shape[:2] != visual_mask.shape:
            raise ValueError(f"hidden must be (B, N, D) matching visual_mask {tuple(visual_mask.shape)}; "
                             f"got {tuple(hidden.shape)}")
        b, n = visual_mask.shape
        idx = torch.arange(n, device=hidden.device).expand(b, n)
        state = cls(
            hidden=hidden, visual_mask=visual_mask,
            valid_mask=torch.ones(b, n, dtype=torch.bool) if valid_mask is None else torch.as_tensor(valid_mask).bool(),
            positions=idx.clone() if positions is None else positions,
            source_index=idx.clone(),
            sizes=torch.ones(b, n) if sizes is None else sizes.float(),
            layer=layer, grid=grid,
            scores=None if scores is None else torch.as_tensor(scores, dtype=torch.float32),
        )
        state.signals = Signals(state, source=attention)
        return state

    @property
    def batch_size(self) -> int:
        return self.visual_mask.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.visual_mask.shape[1]

    def num_visual(self) -> torch.Tensor:
        """(B,) number of visual tokens per sample."""
        return self.visual_mask.sum(dim=1)

    def add_scores(self, scores: torch.Tensor, weight: float = 1.0, into: str = "") -> None:
        """Accumulate ``weight * scores`` into ``self.scores`` (``into=""``) or the score set ``into``."""
        s = weight * scores.float()
        if into:
            old = self.named_scores.get(into)
            self.named_scores[into] = s if old is None else old + s
        else:
            self.scores = s if self.scores is None else self.scores + s

    def same_cell(self, sample: int, back: int) -> torch.Tensor:
        """(N,) long: for each of ``sample``'s real visual tokens, the token at the same cell of the tile ``back``
        tiles earlier (a clip's frames are consecutive tiles; ``cells``, ``tiles`` set), -1 where none is left."""
        if self.tiles is None or self.cells is None:
            raise RuntimeError("same_cell needs the tokens' tiles and cells (an operator declaring needs_frames)")
        vis = torch.nonzero(self.visual_mask[sample] & self.valid_mask[sample] & (self.tiles[sample] >= 0)).squeeze(1)
        tiles, cells = self.tiles[sample, vis].tolist(), self.cells[sample, vis].tolist()
        slot = {(t, c): i for i, t, c in zip(vis.tolist(), tiles, cells)}
        out = torch.full(self.visual_mask.shape[1:], -1, dtype=torch.long, device=self.visual_mask.device)
        for i, t, c in zip(vis.tolist(), tiles, cells):
            out[i] = slot.get((t - back, c), -1)
        return out

    def merge_record(self, sample: int) -> torch.Tensor:
        """(N,) long row of ``merged_into`` for ``sample`` (created on first use, -1 = not merged); a merger
        writes, for each token it folds into another, that token's index."""
        if self.merged_into is None:
            self.merged_into = torch.full(self.visual_mask.shape, -1, dtype=torch.long, device=self.visual_mask.device)
        return self.merged_into[sample]

    def score_set(self, name: str = "") -> torch.Tensor:
        """The scores a selector ranks by: ``self.scores`` (``name=""``) or the named set ``name``."""
        s = self.named_scores.get(name) if name else self.scores
        if s is None:
            have = ", ".join((["'' (the stage's scores)"] if self.scores is not None else [])
                             + [repr(k) for k in self.named_scores])
            raise RuntimeError(f"no scores {name!r} in this stage (a scorer writes them with into: {name!r}); "
                               f"present: {have or 'none'}")
        return s

    def visual_grid(self, sample: int) -> tuple[int, int]:
        """(rows, cols) of ``sample``'s visual tokens: ``grid`` if set, else the square they must form."""
        n = int(self.visual_mask[sample].sum())
        grid = self.grid[sample] if isinstance(self.grid, list) else self.grid
        if grid is not None:
            if grid[0] * grid[1] != n:
                raise ValueError(f"grid {tuple(grid)} does not hold the {n} visual tokens of sample {sample}")
            return tuple(grid)
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"sample {sample} has {n} visual tokens, not a square grid; give the grid shape "
                             "(the model's adapter does for its family)")
        return side, side
