"""Where attention-based signals come from: sources of attention logits, and the query sets.

A stage's attention signals are recomputed, never read from an eager forward. An
:class:`AttentionSource` gives raw (unmasked, pre-softmax) attention logits of chosen query rows
against every token of the stage, per sample:

- :class:`LayerAttentionSource` recomputes them from a decoder layer's input with that layer's
  own projections (through the model's adapter), for just the rows asked for. It can also give
  them *before* the rotary embedding (``rotary=False``) and for a *content-free* input (the same
  vector at every position; ``content_free=True``), which the attention-shift corrections use.
- :class:`LogitsSource` wraps logits you already have (synthetic ones in tests, or ones captured
  elsewhere in a notebook), so every operator can run standalone on a hand-built ``TokenState``.

Masking (causal, padding, the bidirectional visual block), softmax and shift corrections happen
in :class:`tokenprune.state.Signals`, the same way for every source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokenprune.adapters.base import ModelAdapter

#: Query sets an attention scorer can ask for (see :func:`query_rows`).
QUERY_SETS: tuple[str, ...] = ("last", "text", "instruction", "raters", "visual", "all")


class AttentionSource:
    """Raw attention logits of a stage's tokens; subclasses implement :meth:`logits`."""

    def logits(self, sample: int, rows: torch.Tensor, *, rotary: bool = True,
               content_free: bool = False) -> torch.Tensor:
        """(H, Q, N) fp32 logits (scaled q·k, no mask) of query ``rows`` (Q,) of ``sample`` against all N tokens."""
        raise NotImplementedError

    def keys(self) -> torch.Tensor | None:
        """(B, H_kv, N, hd) keys of the source layer (rotary applied), or None if the source has none."""
        return None

    def scaled_queries(self, sample: int, rows: torch.Tensor, *, rotary: bool = True) -> torch.Tensor | None:
        """(H, Q, hd) fp32 queries of ``rows`` of ``sample`` times the attention scale, so that :meth:`logits` is
        their product with :meth:`logit_keys`; None when the source has logits only. Operators that need only
        linear statistics of the logits (ASAP's trend fit) compute them from queries and keys, without the block."""
        return None

    def logit_keys(self, sample: int, *, rotary: bool = True) -> torch.Tensor | None:
        """(H_kv, N, hd) fp32 keys of every token of ``sample`` (see :meth:`scaled_queries`), or None."""
        return None

    def layer_input(self) -> torch.Tensor | None:
        """(B, N, D) hidden states entering the source layer, or None if the source has none."""
        return None

    def query_rows(self, name: str, sample: int) -> torch.Tensor | None:
        """Query rows of set ``name`` when the queries are not the stage's own tokens (cross-attention); else None."""
        return None

    def allowed(self, sample: int, rows: torch.Tensor) -> torch.Tensor | None:
        """(Q, N) bool keys each query row may attend to, when not the causal mask over the stage's tokens; else None."""
        return None


class LogitsSource(AttentionSource):
    """Precomputed logits (B, H, N, N), optionally with their rotary-free and content-free versions.

    For notebooks and tests: ``TokenState.from_tensors(..., attention=LogitsSource(logits))``.
    Asking for a version that was not given raises a clear error.
    """

    def __init__(self, logits: torch.Tensor, rope_free: torch.Tensor | None = None,
                 content_free: torch.Tensor | None = None, keys: torch.Tensor | None = None):
        for name, t in (("logits", logits), ("rope_free", rope_free), ("content_free", content_free)):
            if t is not None and (t.dim() != 4 or t.shape[-1] != t.shape[-2]):
                raise ValueError(f"LogitsSource {name} must be (B, H, N, N); got {tuple(t.shape)}")
        self._versions = {(True, False): logits, (False, False): rope_free, (True, True): content_free}
        self._keys = keys

    def logits(self, sample, rows, *, rotary=True, content_free=False):
        t = self._versions.get((rotary, content_free))
        if t is None:
            what = "content-free" if content_free else "rotary-free"
            raise ValueError(f"this LogitsSource has no {what} logits; pass them to LogitsSource(...)")
        return t[sample][:, rows.to(t.device)].float()

    def keys(self):
        return self._keys


def scaled_scores(q: torch.Tensor, k: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(H, Q, N) fp32 ``scale · q·k`` for queries (H, Q, hd) and keys (H_kv, N, hd), H a multiple of H_kv.

    Grouped-query attention without repeating the keys: the queries of the H/H_kv heads that share a key
    head (consecutive heads) are stacked into one matmul with it. The scale multiplies the queries, not the
    (H, Q, N) product."""
    h, n_q, hd = q.shape
    h_kv = k.shape[0]
    q = q.float() if scale == 1.0 else q.float() * scale
    return torch.matmul(q.reshape(h_kv, (h // h_kv) * n_q, hd), k.float().transpose(-1, -2)).view(h, n_q, k.shape[1])


class QueryKeySource(AttentionSource):
    """Logits as the product of given queries (B, H, N, hd) and keys (B, H_kv, N, hd), times ``scale``
    (default 1/sqrt(hd)), rotary already applied.

    For notebooks and tests, like :class:`LogitsSource`, but operators that need only linear statistics of
    the logits (ASAP's trend fit) read them from the queries and keys without forming the (N×N) block."""

    def __init__(self, queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None):
        if queries.dim() != 4 or keys.dim() != 4 or queries.shape[2] != keys.shape[2] or \
                queries.shape[-1] != keys.shape[-1] or queries.shape[1] % keys.shape[1]:
            raise ValueError(f"QueryKeySource needs queries (B, H, N, hd) and keys (B, H_kv, N, hd), H a multiple "
                             f"of H_kv; got {tuple(queries.shape)} and {tuple(keys.shape)}")
        self._queries, self._keys = queries, keys
        self.scale = queries.shape[-1] ** -0.5 if scale is None else float(scale)

    def _rotary_only(self, rotary: bool) -> None:
        if not rotary:
            raise ValueError("this QueryKeySource has rotary queries and keys only")

    def scaled_queries(self, sample, rows, *, rotary=True):
        self._rotary_only(rotary)
        return self._queries[sample][:, rows.to(self._queries.device)].float() * self.scale

    def logit_keys(self, sample, *, rotary=True):
        self._rotary_only(rotary)
        return self._keys[sample].float()

    def logits(self, sample, rows, *, rotary=True, content_free=False):
        if content_free:
            raise ValueError("this QueryKeySource has no content-free logits")
        return scaled_scores(self.scaled_queries(sample, rows, rotary=rotary), self.logit_keys(sample, rotary=rotary))

    def keys(self):
        return self._keys


class LayerAttentionSource(AttentionSource):
    """Logits recomputed from decoder layer ``layer``'s input ``hidden`` (B, N, D), via the adapter.

    Keys are computed once for all tokens (or taken from the layer's KV cache when it holds
    exactly these tokens); queries only for the rows asked for (gathered from the layer's own query
    projection when the attach machinery captured it in the forward, ``projected_queries``).
    """

    def __init__(self, adapter: ModelAdapter, layer: int, hidden: torch.Tensor, position_embeddings: Any,
                 valid_mask: torch.Tensor, cached_keys: torch.Tensor | None = None,
                 projected_queries: torch.Tensor | None = None):
        self.adapter = adapter
        #: (B, N, H·hd) the layer's query projection of ``hidden`` captured in the model's own forward (before any
        #: query norm and the rotary embedding), so that queries are gathered, not projected again; or None.
        self.projected_queries = projected_queries if projected_queries is not None and \
            projected_queries.shape[:2] == hidden.shape[:2] else None
        self.layer = layer
        self.hidden = hidden
        self.position_embeddings = position_embeddings
        self.valid_mask = valid_mask
        self._cached_keys = cached_keys if cached_keys is not None and cached_keys.shape[-2] == hidden.shape[1] else None
        self._keys: dict[tuple[bool, bool], torch.Tensor] = {}
        self._content_free_hidden: torch.Tensor | None = None

    def _input(self, content_free: bool) -> torch.Tensor:
        if not content_free:
            return self.hidden
        if self._content_free_hidden is None:
            # The same vector at every position: the mean hidden state of each sample's real tokens.
            w = self.valid_mask.to(self.hidden.dtype)[..., None]
            mean = (self.hidden * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
            self._content_free_hidden = mean.expand_as(self.hidden)
        return self._content_free_hidden

    def _all_keys(self, rotary: bool, content_free: bool) -> torch.Tensor:
        key = (rotary, content_free)
        if key not in self._keys:
            if rotary and not content_free and self._cached_keys is not None:
                self._keys[key] = self._cached_keys
            else:
                self._keys[key] = self.adapter.project_keys(self.layer, self._input(content_free),
                                                            self.position_embeddings, rotary=rotary)
        return self._keys[key]

    def _queries(self, sample: int, rows: torch.Tensor, rotary: bool, content_free: bool) -> torch.Tensor:
        h = self._input(content_free)[sample:sample + 1]
        projected = None
        if self.projected_queries is not None and not content_free:
            projected = self.projected_queries[sample:sample + 1]
        return self.adapter.project_queries(self.layer, h, self.position_embeddings, rows.to(h.device)[None],
                                            rotary=rotary, sample=sample, projected=projected)[0]  # (H, Q, hd)

    def logits(self, sample, rows, *, rotary=True, content_free=False):
        q = self._queries(sample, rows, rotary, content_free)
        return scaled_scores(q, self._all_keys(rotary, content_free)[sample], self.adapter.attention_scaling(self.layer))

    def scaled_queries(self, sample, rows, *, rotary=True):
        return self._queries(sample, rows, rotary, False).float() * self.adapter.attention_scaling(self.layer)

    def logit_keys(self, sample, *, rotary=True):
        return self._all_keys(rotary, False)[sample].float()

    def keys(self):
        return self._all_keys(True, False)

    def layer_input(self):
        return self.hidden


def query_rows(name: str, visual: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """(Q,) indices of one sample's query rows of set ``name`` (see :data:`QUERY_SETS`).

    ``visual``/``valid`` are (N,) bool. ``last``: the final real token; ``text``: every real
    non-visual token; ``instruction``: the text after the last visual token (what can see the
    image under a causal mask); ``raters``: the instruction tokens most relevant to the image
    (SparseVLM, Zhang et al. 2024: text tokens whose relevance to the visual tokens is at least the
    mean relevance; relevance of a text token = mean over visual tokens of the softmax over text
    tokens of scaled hidden-state dot products; needs ``hidden``); ``visual``: the visual tokens;
    ``all``: every real token.
    """
    n = visual.shape[0]
    idx = torch.arange(n, device=visual.device)
    text = valid & ~visual
    if name == "last":
        return idx[valid][-1:]
    if name == "text":
        return idx[text]
    if name == "visual":
        return idx[visual & valid]
    if name == "all":
        return idx[valid]
    after = idx > (idx[visual].max() if bool(visual.any()) else -1)
    instruction = text & after
    if name == "instruction":
        return idx[instruction]
    if name == "raters":
        cand = idx[instruction]
        if hidden is None or cand.numel() <= 1 or not bool(visual.any()):
            return cand
        h = hidden.float()
        hv, ht = h[visual & valid], h[cand]
        rel = torch.softmax(hv @ ht.T / h.shape[-1] ** 0.5, dim=-1).mean(0)  # (T,)
        return cand[rel >= rel.mean()]
    raise ValueError(f"queries={name!r}; allowed: {', '.join(QUERY_SETS)}")


class CrossAttentionSource(AttentionSource):
    """Cross-attention logits of the text queries of a cross-attention layer against image features.

    At a ``cross_attention`` site (Mllama) the stage's tokens are the image features; the queries
    are the text tokens entering the first cross-attention layer, projected with that layer's own
    weights (through the adapter; no rotary embedding: cross-attention has none). Query sets refer
    to the text sequence: ``text``/``all`` are the real text tokens that can see an image, ``last``
    the final real token, ``instruction`` the text after the last image token. A query row may
    attend to the image features its cross-attention mask allows.

    ``text_visual``/``text_valid`` (B, S): the image placeholders and real tokens of the text;
    ``allowed_mask`` (B, S, M) bool: which image feature each text token may attend to.
    """

    def __init__(self, adapter: ModelAdapter, layer: int, text_hidden: torch.Tensor, image: torch.Tensor,
                 text_visual: torch.Tensor, text_valid: torch.Tensor, allowed_mask: torch.Tensor):
        self.adapter = adapter
        self.layer = layer
        self.text_hidden = text_hidden
        self.image = image
        self.text_visual = text_visual
        self.text_valid = text_valid
        self.allowed_mask = allowed_mask
        self._keys: torch.Tensor | None = None

    def keys(self):
        if self._keys is None:
            self._keys = self.adapter.project_cross_keys(self.layer, self.image)
        return self._keys

    def query_rows(self, name, sample):
        sees_image = self.allowed_mask[sample].any(dim=-1)
        return query_rows(name, self.text_visual[sample], self.text_valid[sample] & sees_image)

    def allowed(self, sample, rows):
        return self.allowed_mask[sample][rows.to(self.allowed_mask.device)]

    def logits(self, sample, rows, *, rotary=True, content_free=False):
        if content_free:
            raise ValueError("content-free logits are not defined for cross-attention (its keys are image features)")
        h = self.text_hidden[sample:sample + 1]
        q = self.adapter.project_cross_queries(self.layer, h, rows.to(h.device)[None])[0]  # (H, Q, hd)
        return scaled_scores(q, self.keys()[sample], self.adapter.attention_scaling(self.layer))
