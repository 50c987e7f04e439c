"""Attention and vision-tower sources backed by a live model (through its adapter).

The stage's runtime builds them from what it captured in the forward: a decoder layer's input
(:class:`LayerAttentionSource`), the text entering Mllama's first cross-attention layer
(:class:`CrossAttentionSource`), the inputs of the vision tower's layers (:class:`VisionSource`), or a
layer's cached keys after the prefill (:class:`CachedKeys`). Operators see them only through
:class:`~tokenprune.core.state.Signals`.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.adapters.base import ModelAdapter
from tokenprune.core.attention import AttentionSource, VisionSignalSource, query_rows, scaled_scores


class LayerAttentionSource(AttentionSource):
    """Logits recomputed from decoder layer ``layer``'s input ``hidden`` (B, N, D), via the adapter.

    Keys are computed once for all tokens (or taken from the layer's KV cache when it holds
    exactly these tokens); queries only for the rows asked for (gathered from the layer's own query
    projection when the attach machinery captured it in the forward, ``projected_queries``). On a
    sliding-window layer (``window``; ``source_index`` (B, N): the tokens' original sequence indices) a query
    may attend only to the keys its layer lets it see, as in the model's own forward; with ``blocks`` (B, N) (the
    attention block of each token, -1: none; Gemma 3's images) a query also sees the later tokens of its block.
    """

    def __init__(self, adapter: ModelAdapter, layer: int, hidden: torch.Tensor, position_embeddings: Any,
                 valid_mask: torch.Tensor, cached_keys: torch.Tensor | None = None,
                 projected_queries: torch.Tensor | None = None, window: int | None = None,
                 source_index: torch.Tensor | None = None, blocks: torch.Tensor | None = None):
        self.adapter = adapter
        self.window = window if source_index is not None else None
        self.blocks = blocks
        self.source_index = source_index
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

    def allowed(self, sample, rows):
        if self.window is None and self.blocks is None:
            return None
        n = self.hidden.shape[1]
        rows = rows.to(self.hidden.device)
        allowed = torch.arange(n, device=rows.device)[None, :] <= rows[:, None]
        if self.blocks is not None:  # OR the query's own block, both ways (as the model's mask)
            block = self.blocks[sample].to(rows.device)
            mine = block[rows][:, None]
            allowed = allowed | ((mine == block[None, :]) & (mine >= 0))
        if self.window is not None:  # AND the layer's window, in original indices
            src = self.source_index[sample].to(rows.device)
            allowed = allowed & (src[None, :] > src[rows][:, None] - self.window)
        return allowed


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


class VisionSource(VisionSignalSource):
    """Vision-tower signals recomputed from what the tower's layers were called with, captured during the prefill.

    ``inputs[l]`` is the adapter's capture of vision layer ``l``'s call (its input hidden states, and what else the
    tower passes it); ``tower`` the adapter's capture of the tower call itself (Qwen2-VL: the image grids), or
    None; ``patch_of`` (B, N_input) maps each visual token of the model's input to its signal row (-1
    elsewhere). Queries and keys come from the adapter, which knows the tower.
    """

    def __init__(self, adapter: ModelAdapter, inputs: dict[int, Any], patch_of: torch.Tensor, num_layers: int,
                 tower: Any = None):
        self.adapter = adapter
        self.inputs = inputs
        self.patch_of = patch_of
        self.num_layers = num_layers
        self.tower = tower

    def _input(self, layer: int | float) -> tuple[int, Any]:
        if isinstance(layer, float):  # a share of the depth: the round(f * depth)-th layer
            layer = min(self.num_layers, max(1, round(layer * self.num_layers))) - 1
        idx = layer + self.num_layers if layer < 0 else layer
        if not 0 <= idx < self.num_layers:
            raise ValueError(f"vision layer {layer} does not exist: the tower has {self.num_layers} layers "
                             f"(allowed: {-self.num_layers}..{self.num_layers - 1})")
        idx = self.adapter.vision_signal_layer(idx)
        if idx not in self.inputs:
            raise ValueError(f"vision layer {idx} did not run in this forward")
        return idx, self.inputs[idx]

    def cls_attention(self, layer: int) -> torch.Tensor:
        """(R, H) attention each signal row receives from the tower's summary query (CLS) at vision ``layer``."""
        idx, captured = self._input(layer)
        return self.adapter.vision_cls_attention(idx, captured, self.tower)

    def received_attention(self, layer: int) -> torch.Tensor:
        """(R, H) attention each signal row receives from every query of its span at vision ``layer``."""
        idx, captured = self._input(layer)
        return self.adapter.vision_received_attention(idx, captured, self.tower)

    def keys(self, layer: int) -> torch.Tensor:
        """(R, H, hd) keys per signal row at vision ``layer``."""
        idx, captured = self._input(layer)
        return self.adapter.vision_keys(idx, captured, self.tower)


class DecodeQuerySource(AttentionSource):
    """The attention of a decoding step's last token at decoder ``layer`` over every entry the layer has cached.

    The stage's tokens are the cached entries (B, T) — the held prompt entries, then the tokens decoded so far —
    and the one query (set ``last``) is the last token of the step's input ``hidden`` (B, q, D), projected with
    the layer's own weights and rotary ``position_embeddings``; it may attend to every valid entry.
    """

    def __init__(self, adapter: ModelAdapter, layer: int, hidden: torch.Tensor, position_embeddings: Any,
                 keys: torch.Tensor):
        self.adapter, self.layer, self.hidden, self.position_embeddings, self._keys = \
            adapter, layer, hidden, position_embeddings, keys

    def query_rows(self, name, sample):
        if name != "last":
            raise ValueError(f"a decoding step's attention has the query set 'last' only; got {name!r}")
        return torch.zeros(1, dtype=torch.long, device=self._keys.device)

    def allowed(self, sample, rows):
        return torch.ones(rows.shape[0], self._keys.shape[2], dtype=torch.bool, device=self._keys.device)

    def logits(self, sample, rows, *, rotary=True, content_free=False):
        if content_free or not rotary:
            raise ValueError("a decoding step's attention is given with the rotary embedding and content only")
        h = self.hidden[sample:sample + 1]
        last = torch.full((1, 1), h.shape[1] - 1, device=h.device)
        q = self.adapter.project_queries(self.layer, h, self.position_embeddings, last, sample=sample)[0]  # (H, 1, hd)
        return scaled_scores(q, self._keys[sample], self.adapter.attention_scaling(self.layer))

    def keys(self):
        return self._keys


class AttentionHistory(AttentionSource):
    """A layer's attention history at a decoding step, as a stage's attention (``decode: {scorer: stage}``).

    The stage's tokens are the prompt entries the layer holds (B, K); the query rows are the history's rows, oldest
    first — the prompt's last rows, then the tokens decoded so far — with ``probs`` (B, H, R, K) their attention
    over those entries per head and ``real`` (B, R) the rows a sample has (a short prompt has fewer). Query sets:
    ``all`` (every row: the history a predictor reads) and ``last`` (the newest). The logits are the log of the
    probabilities, so the stage's softmax gives them back, renormalised over the entries the stage may choose among.
    """

    def __init__(self, probs: torch.Tensor, real: torch.Tensor):
        self.probs, self.real = probs, real

    def query_rows(self, name, sample):
        rows = self.real[sample].nonzero().flatten()
        if name == "all":
            return rows
        if name == "last":
            return rows[-1:]
        raise ValueError(f"a decoding step's attention history has the query sets 'all' and 'last'; got {name!r}")

    def allowed(self, sample, rows):
        return torch.ones(rows.shape[0], self.probs.shape[-1], dtype=torch.bool, device=self.probs.device)

    def logits(self, sample, rows, *, rotary=True, content_free=False):
        if content_free or not rotary:
            raise ValueError("an attention history is the rotary attention of the real tokens only")
        return self.probs[sample][:, rows.to(self.probs.device)].float().log()


class CachedKeys(AttentionSource):
    """A kv_cache stage's source after the prefill: the layer's cached keys (``features("keys")``)."""

    def __init__(self, keys: torch.Tensor):
        self._k = keys

    def keys(self):
        return self._k
