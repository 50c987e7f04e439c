"""Where attention-based signals come from: sources of attention logits, and the query sets.

A stage's attention signals are recomputed, never read from an eager forward. An
:class:`AttentionSource` gives raw (unmasked, pre-softmax) attention logits of chosen query rows
against every token of the stage, per sample:

- :class:`~tokenprune.runtime.sources.LayerAttentionSource` recomputes them from a decoder layer's
  input with that layer's own projections (through the model's adapter), for just the rows asked
  for. It can also give them *before* the rotary embedding (``rotary=False``) and for a
  *content-free* input (the same vector at every position; ``content_free=True``), which the
  attention-shift corrections use. It lives with the runtime, which knows the model.
- :class:`LogitsSource` wraps logits you already have (synthetic ones in tests, or ones captured
  elsewhere in a notebook), so every operator can run standalone on a hand-built ``TokenState``.

Masking (causal, padding, the bidirectional visual block), softmax and shift corrections happen
in :class:`tokenprune.core.state.Signals`, the same way for every source.
"""

from __future__ import annotations

import torch

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


class VisionSignalSource:
    """Vision-tower signals per patch row of the flattened (images x patches) features; subclasses give
    :meth:`cls_attention` and :meth:`keys`. ``patch_of`` (B, N_input) maps each visual token of the model's
    input to its patch row (-1 elsewhere)."""

    patch_of: torch.Tensor

    def cls_attention(self, layer: int) -> torch.Tensor:
        """(images * P, H) attention of the CLS query to each patch row at vision ``layer``."""
        raise NotImplementedError

    def keys(self, layer: int) -> torch.Tensor:
        """(images * P, H, hd) patch keys per patch row at vision ``layer``."""
        raise NotImplementedError

    def to_tokens(self, rows: torch.Tensor, source_index: torch.Tensor, fill: float) -> torch.Tensor:
        """Per-patch-row values ``rows`` (R, ...) laid out on a stage's tokens (B, N, ...)."""
        patch = self.patch_of.to(source_index.device).gather(1, source_index)  # (B, N)
        out = torch.full((*patch.shape, *rows.shape[1:]), fill, dtype=rows.dtype, device=rows.device)
        hit = patch >= 0
        out[hit] = rows[patch[hit]]
        return out
