"""The runtime of a ``kv_cache`` stage (:class:`~tokenprune.core.sites.KVCacheSite`).

The prefill runs whole. Right after each named layer has run, the stage's shifts and scorers score the
tokens that layer just cached, with the layer's own attention (its cached keys, queries recomputed from its
input). Once the forward has returned, the selector (and merger) choose each layer's entries and the layer's
cache is cut to them — uniform budgets per layer, or adaptive ones shared out across layers
(:func:`~tokenprune.core.kv_cache.adaptive_weights`). With ``decode`` settings, chosen decoding steps cut
each layer's held visual entries again, by the attention the current token pays them (MINT).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.core.budget import keep_top_visual, resolve_keep
from tokenprune.core.errors import PipelineRuntimeError
from tokenprune.core.kv_cache import adaptive_weights, allocate, flatten_entries, unflatten_entries
from tokenprune.core.masks import gather_tokens
from tokenprune.core.state import TokenState
from tokenprune.runtime.episode import Episode, Held, KVRecord
from tokenprune.runtime.site import SiteRuntime, keep_index, merges
from tokenprune.runtime.sources import AttentionHistory, CachedKeys, DecodeQuerySource, LayerAttentionSource
from tokenprune.runtime.timing import Stopwatch


class KVCacheRuntime(SiteRuntime):
    """Scores each named layer's cache in the prefill, cuts it after the forward, re-prunes while decoding."""

    def __init__(self, index, stage, attached):
        super().__init__(index, stage, attached)
        # the attention layers only: a linear-attention layer's state has a fixed size and no entries to cut
        self.layers = set(stage.cache.layer_list(self.adapter.num_layers, f"{stage.key}.cache")) \
            - set(self.adapter.recurrent_layers)
        self.decode = stage.cache.decode
        #: rows of attention history a ``decode: {scorer: stage}`` re-pruning keeps (default: the scorers' largest
        #: ``history``)
        self.history_rows = self.decode.history or max((int(getattr(op.params, "history", 1)) for op in stage.operators
                                                        if op.kind in ("shift", "scorer")), default=1)

    def install(self) -> list[Any]:
        return [self.adapter.layers[i].register_forward_hook(self._layer_post_hook(i)) for i in sorted(self.layers)]

    def layer_ready(self, layer: int, ep: Episode, hidden: torch.Tensor, kwargs: dict) -> None:
        if layer in self.layers:  # scored in the layer's forward hook, once its keys are in the cache
            ep.kv_pending[layer] = (hidden, kwargs.get("position_embeddings"))

    def _layer_post_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            ep = self.attached.episode
            if ep is not None and ep.phase == "prefill" and layer in ep.kv_pending:
                hidden, pe = ep.kv_pending.pop(layer)
                self._score_layer(layer, hidden, pe, ep)

        return hook

    def _score_layer(self, layer: int, hidden: torch.Tensor, position_embeddings: Any, ep: Episode) -> None:
        """Run the stage's shifts and scorers on the tokens ``layer`` has just cached, with the layer's own
        attention: its cached keys, and queries recomputed from its input for the rows asked for."""
        flow = ep.flow
        b, n = hidden.shape[:2]
        cur = flow.index if flow.index is not None else torch.arange(n, device=hidden.device).expand(b, n)
        state, _ = self.stage_state(layer, hidden, ep, cur, flow.live, flow.sizes, flow.positions)
        state.signals.source = LayerAttentionSource(self.adapter, layer, hidden, position_embeddings, state.valid_mask,
                                                    cached_keys=self.adapter.cached_keys(ep.cache, layer),
                                                    window=self.adapter.sliding_window(layer), source_index=cur,
                                                    blocks=None if ep.blocks is None else ep.blocks.gather(1, cur))
        state, ms, by_op = self.run_operators(state, hidden, self.stage.score)
        if self.decode.scorer == "stage" and self.decode.steps:  # the history the decoding steps extend
            ep.decode_history[layer] = self._prompt_history(state)
        ep.kv[layer] = KVRecord(state.scores, dict(state.named_scores), cur, flow.live, state.sizes, state.positions, ms,
                                by_op)

    def after_forward(self, ep: Episode) -> None:
        if ep.phase == "prefill" and ep.kv:
            self._compress(ep)

    def _compress(self, ep: Episode) -> None:
        """After the prefill: select (and merge) each compressed layer's cached entries and cut its cache."""
        stage = self.stage
        if ep.cache is None:  # a forward without a cache (use_cache=False): nothing to compress
            ep.kv = {}
            return
        layers = sorted(ep.kv)
        states = {}
        for layer in layers:
            rec = ep.kv[layer]
            keys = self.adapter.cached_keys(ep.cache, layer)
            if keys is None:
                raise PipelineRuntimeError(f"{stage.key}: layer {layer} has no KV cache after the prefill "
                                           "(generate(..., use_cache=True) keeps one)")
            if keys.shape[2] != rec.index.shape[1]:
                raise PipelineRuntimeError(f"{stage.key}: layer {layer} caches {keys.shape[2]} entries but "
                                           f"{rec.index.shape[1]} tokens entered it")
            values = self.adapter.cached_values(ep.cache, layer)
            state, visual_before = self.stage_state(layer, flatten_entries(keys, values), ep, rec.index, rec.live,
                                                    rec.sizes, rec.positions)
            state.scores, state.named_scores = rec.scores, dict(rec.named_scores)
            state.signals.source = CachedKeys(keys)
            states[layer] = (state, visual_before, keys, values)
        counts = self._adaptive_counts([states[layer][0] for layer in layers]) \
            if stage.cache.budget == "adaptive" else None
        for li, layer in enumerate(layers):
            rec = ep.kv[layer]
            state, visual_before, keys, values = states[layer]
            by_op = dict(rec.ms_by_op)
            with torch.no_grad(), Stopwatch(state.hidden) as clock:
                state = stage.select(state, None if counts is None else counts[:, li],
                                     clock=self.operator_clock(state.hidden, by_op))
            rel, new_live = keep_index(state.keep_mask, state.valid_mask)
            entries = None
            if stage.merges:
                k, v = unflatten_entries(gather_tokens(state.hidden, rel), keys.shape[1], keys.shape[3])
                entries = (k.to(keys.dtype), v.to(values.dtype))
            bias = gather_tokens(state.sizes.float(), rel).clamp_min(1e-6).log() if state.proportional_attention \
                else "gather"
            new_index = rec.index.gather(1, rel)
            ep.cut(self.adapter, layer, rel, new_index, new_live, bias=bias, entries=entries)
            if layer in ep.decode_history:  # the history over the entries the cache keeps
                probs, real = ep.decode_history[layer]
                ep.decode_history[layer] = (probs.gather(3, rel[:, None, None, :].expand(*probs.shape[:3], -1)),
                                            real)
            self.trace(ep, layer, state.valid_mask, visual_before, new_index, new_live, site="kv_cache",
                       operator_ms=rec.ms + clock.ms, merged_into=merges(state.merged_into, rec.index),
                       operator_ms_by_op=by_op)
        self.attached.pipeline.runs[self.index] += 1
        ep.kv = {}

    def _adaptive_counts(self, states: list[TokenState]) -> torch.Tensor:
        """(B, L) visual entries each compressed layer keeps per sample: the selector's budget times the number of
        layers, shared out by :func:`~tokenprune.core.kv_cache.adaptive_weights`."""
        sel = self.stage.selector
        b = states[0].batch_size
        out = torch.zeros(b, len(states), dtype=torch.long)
        for i in range(b):
            visual = [s.visual_mask[i] for s in states]
            scores = [sel.ranking(s)[i][v] for s, v in zip(states, visual)]
            caps = [int(v.sum()) for v in visual]
            total = sum(sel.expected_kept(c) for c in caps)
            out[i] = torch.tensor(allocate(adaptive_weights(scores), total, caps))
        return out

    # --- decoding-time re-pruning ----------------------------------------------------------------
    def decode_layer(self, layer: int, ep: Episode, hidden: torch.Tensor, kwargs: dict) -> None:
        if self.decode.scorer == "stage":
            if layer in ep.decode_history:  # every step extends the history; the chosen steps re-prune from it
                self._reprune(layer, ep, hidden, kwargs)
        elif (layer in self.layers or layer == self.decode.score_layer) and self.decode.at(ep.decode_step):
            self._reprune(layer, ep, hidden, kwargs)

    def _prompt_history(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, real)``: the attention of each sample's last ``history_rows`` prompt rows over the layer's tokens,
        per head (B, H, R, N), right-aligned; ``real`` (B, R) marks the rows a sample has."""
        r = self.history_rows
        rows = [state.signals.query_rows("all", b)[-r:] for b in range(state.batch_size)]
        with torch.no_grad():
            probs = [state.signals.attention_probs(b, q) for b, q in enumerate(rows)]  # (H, R_b, N)
        out = torch.zeros(state.batch_size, probs[0].shape[0], r, state.num_tokens, device=probs[0].device)
        real = torch.zeros(state.batch_size, r, dtype=torch.bool, device=probs[0].device)
        for b, p in enumerate(probs):
            out[b, :, r - p.shape[1]:] = p
            real[b, r - p.shape[1]:] = True
        return out, real

    def _step_attention(self, layer: int, ep: Episode, hidden: torch.Tensor, kwargs: dict, keys: torch.Tensor,
                        held: Held, index: torch.Tensor, valid: torch.Tensor) -> TokenState:
        """A state over every entry ``layer`` has cached — the held prompt entries ``index``, then the tokens decoded
        so far — whose attention signal is the current token's, exact (:class:`DecodeQuerySource`)."""
        b, _, t, _ = keys.shape
        k_p = index.shape[1]
        pe = kwargs.get("position_embeddings") if held.shift is None else \
            self.attached.stream.shifted_decode_positions(layer, ep, hidden, kwargs)[1]
        allowed = torch.cat([valid, torch.ones(b, t - k_p, dtype=torch.bool, device=keys.device)], dim=1)
        entries = torch.cat([index, torch.arange(ep.prefill_len, ep.prefill_len + t - k_p,
                                                 device=keys.device).expand(b, t - k_p)], dim=1)
        state = TokenState(hidden=keys.transpose(1, 2).flatten(2), visual_mask=torch.zeros_like(allowed),
                           valid_mask=allowed, positions=entries, source_index=entries,
                           sizes=torch.ones(b, t, device=keys.device), layer=layer)
        state.signals.source = DecodeQuerySource(self.adapter, layer, hidden, pe, keys)
        return state

    def _predicted(self, layer: int, ep: Episode, keys: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                   visual: torch.Tensor) -> torch.Tensor:
        """(B, K) the stage's scores of the held prompt entries ``index``, from the layer's attention history."""
        k_p = index.shape[1]
        probs, real = ep.decode_history[layer]
        state = TokenState(hidden=keys[:, :, :k_p].transpose(1, 2).flatten(2), visual_mask=visual, valid_mask=valid,
                           positions=index, source_index=index, sizes=torch.ones(index.shape, device=keys.device),
                           layer=layer)
        state.signals.source = AttentionHistory(probs, real)
        state, _, _ = self.run_operators(state, keys, self.stage.score)
        if state.scores is None:
            raise PipelineRuntimeError(f"{self.stage.key}: decode.scorer is stage, but the stage has no scorer")
        return state.scores.to(index.device)

    def _reprune(self, layer: int, ep: Episode, hidden: torch.Tensor, kwargs: dict) -> None:
        """Decoding-time re-pruning (MINT, DyCoke; AttentionPredictor with ``scorer: stage``): keep the held visual
        entries of ``layer``'s cache that the current token attends to most (at this layer, or at
        ``decode.score_layer``) or that the stage's scorers rank highest from the layer's attention history: evicted
        from the cache, or (``mask``) hidden until the next re-pruning step."""
        dec = self.stage.cache.decode
        keys = self.adapter.cached_keys(ep.cache, layer)
        if keys is None:
            return
        b, _, t, _ = keys.shape
        if dec.mode == "mask" and layer in self.layers:  # choose among every entry the layer holds, hidden or not
            held = ep.decode_base.setdefault(layer, ep.held_at(layer))
        else:
            held = ep.held_at(layer)
        index = held.index if held.index is not None else \
            torch.arange(ep.prefill_len, device=keys.device).expand(b, ep.prefill_len)
        k_p = index.shape[1]
        valid = ep.real(index, held.live)
        visual = ep.visual.gather(1, index) & valid
        choose = dec.at(ep.decode_step)
        if dec.scorer == "stage":
            ranked = self._predicted(layer, ep, keys, index, valid, visual) if choose else None
            step = self._step_attention(layer, ep, hidden, kwargs, keys, held, index, valid)
            with torch.no_grad():  # the step's exact attention over the held prompt entries joins the history
                rows = torch.stack([step.signals.attention_probs(i, step.signals.query_rows("last", i))[:, :, :k_p]
                                    for i in range(b)])  # (B, H, 1, K)
            probs, real = ep.decode_history[layer]
            ep.decode_history[layer] = (torch.cat([probs, rows.to(probs)], 2)[:, :, -self.history_rows:],
                                        torch.cat([real, real.new_ones(b, 1)], 1)[:, -self.history_rows:])
            if not choose:
                return
            truth = rows[:, :, 0].mean(1).to(index.device)  # (B, K) head-averaged: what the step attends to
        elif dec.score_layer is None or layer == dec.score_layer:
            state = self._step_attention(layer, ep, hidden, kwargs, keys, held, index, valid)
            with torch.no_grad():
                probs = state.signals.attention("last", "mean")  # (B, T): heads averaged
            full = torch.full((b, ep.prefill_len), float("-inf"), device=keys.device)
            full.scatter_(1, index, probs[:, :k_p].to(full.device).masked_fill(~valid, float("-inf")))
            if dec.score_layer is not None:
                ep.decode_scores = full
            ranked, truth = full.gather(1, index), None
        else:
            if ep.decode_scores is None:  # layers before score_layer keep what they hold
                return
            ranked, truth = ep.decode_scores.gather(1, index), None
        if layer not in self.layers:  # the score layer alone: it scores, and keeps what it holds
            return
        counts = torch.tensor([resolve_keep(dec.keep, int(v)) for v in visual.sum(1).tolist()], device=index.device)
        keep = keep_top_visual(ranked, visual, counts)
        extra = {} if truth is None else {"hit_rate": hit_rates(keep, truth, visual, counts)}
        if dec.mode == "mask":  # every entry stays in the cache; the others are hidden until the next choice
            live = keep & valid
            ep.held[layer] = Held(index, live, held.bias, held.shift)
            self.trace(ep, layer, valid, visual, index, live, site="decode", step=ep.decode_step, **extra)
            return
        rel, new_live = keep_index(keep, valid)
        rest = torch.arange(k_p, t, device=index.device).expand(b, t - k_p)
        bias = gather_tokens(held.bias, rel) if held.bias is not None else None  # the bias covers the prompt part
        ep.cut(self.adapter, layer, torch.cat([rel, rest], dim=1), index.gather(1, rel), new_live, bias=bias)
        if layer in ep.decode_history:  # the history follows the entries that stay
            probs, real = ep.decode_history[layer]
            ep.decode_history[layer] = (probs.gather(3, rel[:, None, None, :].expand(*probs.shape[:3], -1)), real)
        self.trace(ep, layer, valid, visual, ep.held[layer].index, new_live, site="decode", step=ep.decode_step,
                   **extra)


def hit_rates(chosen: torch.Tensor, truth: torch.Tensor, visual: torch.Tensor, counts: torch.Tensor) -> list[float]:
    """Per sample, the share of the ``counts`` visual entries ``truth`` (B, K) ranks highest that ``chosen`` (B, K)
    holds (1.0 when it chooses none)."""
    both = chosen & keep_top_visual(truth, visual, counts) & visual
    return [float(h) / n if n else 1.0 for h, n in zip(both.sum(1).tolist(), counts.tolist())]
