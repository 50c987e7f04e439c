"""The decoder stream: every decoder layer's keyword arguments kept consistent with the tokens it runs on.

The LLM builds the causal mask, the position ids and the rotary cos/sin once for the whole prompt. After a
stage has pruned the token stream, each later layer's pre-hook gathers them to the kept tokens (kept tokens
keep their positions unless a stage renumbers them). In a decoding step, a layer whose cache holds fewer
prompt entries than the prompt gets a mask whose key columns are ``cat(held, prefill_len..total_len)``, with
filler slots masked and any proportional-attention bias added. Site runtimes are called at each layer
(:class:`~tokenprune.runtime.site.SiteRuntime`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import ModelAdapter, layer_hidden
from tokenprune.core.errors import PipelineRuntimeError
from tokenprune.core.masks import (
    decode_key_index,
    expand_batch,
    full_causal_mask,
    gather_mask,
    gather_tokens,
    mask_key_columns,
)
from tokenprune.runtime.episode import Capture, Episode, FullFrame
from tokenprune.runtime.site import SiteRuntime


def cache_argument(kwargs: dict) -> Any:
    """The KV cache a forward was given: ``cache`` from transformers 5.24 on, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def add_key_bias(mask: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype, adapter: ModelAdapter) -> torch.Tensor:
    """An additive 4-D mask: ``mask`` (bool or additive) plus ``bias`` (B, K) on its first K key columns."""
    if mask.dim() != 4:
        raise PipelineRuntimeError("proportional attention needs SDPA or eager attention (a 4-D mask); "
                                   f"this model runs {adapter.attn_implementation}")
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    pad = mask.shape[-1] - bias.shape[1]
    full = torch.nn.functional.pad(bias.to(mask.dtype), (0, pad))
    return mask + full[:, None, None, :]


def keep_whole_windows(cache: Any) -> None:
    """Sliding-window cache layers that have not been filled yet replaced by whole ones.

    transformers' sliding cache keeps a layer's last W-1 entries by count, and its masks count positions from
    there; once a stage has removed entries, neither maps onto the original sequence any more. A whole layer
    keeps every entry the pipeline kept, and the masks (the LLM's own for layers nothing was removed from,
    :meth:`DecoderStream.window_decode_mask` for the others) apply the window in original sequence indices.
    The cost: a sliding layer's cache is not cut back to W-1 entries."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(layers):
        if getattr(layer, "is_sliding", False) and not getattr(layer, "is_initialized", True) \
                and type(layer).__name__ == "DynamicSlidingWindowLayer":
            layers[i] = DynamicLayer()


class DecoderStream:
    """The LLM's and its decoder layers' pre-hooks; calls each site runtime at each layer."""

    def __init__(self, attached: Any, sites: list[SiteRuntime], capture_layers: set[int]):
        self.attached = attached
        self.adapter: ModelAdapter = attached.adapter
        self.sites = sites
        self.capture_layers = capture_layers  # layers whose input a stage right after them reads
        self.recurrent = set(self.adapter.recurrent_layers)  # linear-attention layers: 2-D padding masks only

    def install(self) -> list[Any]:
        handles = [self.adapter.language_model.register_forward_pre_hook(self._llm_pre_hook, with_kwargs=True)]
        for i, layer in enumerate(self.adapter.layers):
            handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        return handles

    # --- the LLM -----------------------------------------------------------------------------
    def _llm_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        ep = self.attached.episode
        if ep is not None and self.adapter.rope_axes > 1:
            ep.rope = self.adapter.rope_positions(kwargs.get("position_ids"))
            if ep.phase == "prefill":
                ep.rope_prefill = ep.rope
        if ep is None or ep.phase != "decode" or not ep.short_first_cache:
            return None
        # The first layer's cache holds only kept tokens, so the LLM would size its mask and positions from a
        # short cache: hand it the full-frame mask and positions instead; each layer then gathers.
        embeds = kwargs.get("inputs_embeds")
        q = embeds.shape[1]
        total = ep.seen + q
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):  # one mask per layer type (Gemma 3), built by the model from the step's 2-D mask
            mask = ep.step_mask
            if mask is None:
                mask = torch.ones(embeds.shape[0], total, dtype=torch.long, device=embeds.device)
            if mask.shape[1] != total:
                raise PipelineRuntimeError(f"attention_mask has {mask.shape[1]} columns; expected {total} (all tokens so far)")
            window = getattr(self.adapter.language_model.config, "sliding_window", None)
            kwargs["attention_mask"] = {
                kind: full_causal_mask(mask, q, self.adapter.mask_format, embeds.dtype,
                                       window if kind == "sliding_attention" else None) for kind in kwargs["attention_mask"]}
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = (ep.seen + torch.arange(q, device=embeds.device))[None]
            return args, kwargs
        if mask is None:
            mask = torch.ones(embeds.shape[0], total, dtype=torch.long, device=embeds.device)
        if mask.dim() == 2:
            if mask.shape[1] != total:
                raise PipelineRuntimeError(f"attention_mask has {mask.shape[1]} columns; expected {total} (all tokens so far)")
            if self.adapter.mask_format == "2d":
                # FlashAttention takes a 2-D padding mask over a layer's keys; the LLM would cut the full frame's
                # to the first layer's short cache, so it gets none and each layer gathers its own (_decode_layer)
                ep.frame_mask_2d = None if bool(mask.all()) else mask.bool()
                kwargs["attention_mask"] = None
            else:
                kwargs["attention_mask"] = full_causal_mask(mask, q, self.adapter.mask_format, embeds.dtype)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = (ep.seen + torch.arange(q, device=embeds.device))[None]
        return args, kwargs

    # --- each decoder layer ------------------------------------------------------------------
    def _layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            ep = self.attached.episode
            if ep is None:
                return None
            if ep.phase == "decode":
                hidden = layer_hidden(args, kwargs)
                for site in self.sites:
                    site.decode_layer(layer, ep, hidden, kwargs)
                return self._decode_layer(layer, ep, args, kwargs)
            return self._prefill_layer(layer, ep, args, kwargs)

        return hook

    def _prefill_layer(self, layer: int, ep: Episode, args: tuple, kwargs: dict):
        hidden = layer_hidden(args, kwargs)
        if ep.full is None:
            ep.kinds = self.adapter.mark_token_kinds(hidden, ep.visual)
            if ep.cache is None:  # the LLM made its own cache (use_cache without past_key_values)
                ep.cache = cache_argument(kwargs)
            keep_whole_windows(ep.cache)
            b, n = ep.visual.shape
            pos = kwargs.get("position_ids")
            given = pos is not None
            if pos is None:
                pos = torch.arange(n, device=hidden.device)[None]
            ep.full = FullFrame(expand_batch(pos, b), kwargs.get("position_embeddings"), kwargs.get("attention_mask"),
                                given)
        for site in self.sites:
            hidden = site.prefill_layer(layer, ep, hidden)
        if ep.flow.index is not None and layer in self.recurrent:
            kwargs["attention_mask"] = self.recurrent_mask(ep)
        elif ep.flow.index is not None:
            kwargs.update(self.frame_kwargs(ep, hidden, kwargs.get("attention_mask"), kwargs.get("position_embeddings"),
                                            layer))
        for site in self.sites:
            site.layer_ready(layer, ep, hidden, kwargs)
        ep.record(layer)
        if layer in self.capture_layers:
            ep.capture = Capture(layer, hidden, kwargs.get("position_embeddings"))
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def frame_kwargs(self, ep: Episode, hidden: torch.Tensor, layer_mask: Any = None, layer_pe: Any = None,
                     layer: int = 0) -> dict[str, Any]:
        """Full-frame layer kwargs gathered to the tokens now flowing (computed once per stage, mask and rotary).

        ``layer_mask`` and ``layer_pe`` are the full-frame mask and rotary ``(cos, sin)`` the LLM built for this
        layer: layers of one model may differ (a sliding-window layer next to a full one, each keeping its own
        window in original positions; Gemma 3's local and global rotary bases)."""
        flow = ep.flow
        if ep.frame is not None and ep.frame[0] is flow.index and ep.frame[2] is layer_mask and ep.frame[3] is layer_pe:
            return ep.frame[1]
        idx = flow.index
        pe = layer_pe if layer_pe is not None else ep.full.position_embeddings
        if flow.renumbered:
            out: dict[str, Any] = {"position_ids": flow.positions}
            if pe is not None:
                rope = flow.rope_positions if flow.rope_positions is not None else flow.positions
                out["position_embeddings"] = self.adapter.rotary_embeddings(hidden, rope, layer)
        else:
            out = {"position_ids": ep.full.position_ids.gather(1, idx)} if ep.full.positions_given else {}
            if pe is not None:
                out["position_embeddings"] = tuple(gather_tokens(t, idx) for t in pe)
        mask = layer_mask
        mask = gather_mask(mask, idx if mask is not None and mask.dim() == 4 else None, idx)
        if mask is None and flow.live is not None and self.adapter.mask_format == "2d":
            mask = ep.valid_now()  # FlashAttention: fillers leave with the padding when the batch is unpadded
        elif mask is None and (flow.key_bias is not None or flow.live is not None):
            mask = full_causal_mask(ep.valid_now(), idx.shape[1], "bool", hidden.dtype)
        elif flow.live is not None:
            mask = mask_key_columns(mask, flow.live)
        if flow.key_bias is not None:
            mask = add_key_bias(mask, flow.key_bias, hidden.dtype, self.adapter)
        out["attention_mask"] = mask
        ep.frame = (idx, out, layer_mask, layer_pe)
        return out

    @staticmethod
    def recurrent_mask(ep: Episode) -> torch.Tensor | None:
        """A linear-attention layer's mask over the tokens flowing now: the 2-D padding mask of the real ones (None
        when all are). Its input is zeroed on padding and fillers; these stand left of a sample's real tokens, so
        its state is still zero when the first real token arrives, as with the model's own left padding."""
        if ep.recurrent_mask is None or ep.recurrent_mask[0] is not ep.flow.index:
            valid = ep.valid_now()
            ep.recurrent_mask = (ep.flow.index, None if bool(valid.all()) else valid.long())
        return ep.recurrent_mask[1]

    # --- decoding ----------------------------------------------------------------------------
    def _decode_layer(self, layer: int, ep: Episode, args: tuple, kwargs: dict):
        if layer in self.recurrent:  # a recurrent state: nothing held to mask (the LLM gives it its step's mask)
            return args, kwargs
        held = ep.held_at(layer)
        if ep.frame_mask_2d is not None:  # FlashAttention after a trimmed first cache: the full frame's 2-D mask
            kwargs["attention_mask"] = ep.frame_mask_2d
        mask = kwargs.get("attention_mask")
        if held.index is None and held.bias is None and held.shift is None:
            return args, kwargs
        window = self.adapter.sliding_window(layer)
        if held.index is not None and window is not None:
            key = ("window", id(held.index))
            if key not in ep.decode_masks:
                ep.decode_masks[key] = self.window_decode_mask(layer, ep, window, layer_hidden(args, kwargs).dtype)
            kwargs["attention_mask"] = ep.decode_masks[key]
        elif held.index is not None and (mask is not None or held.bias is not None or held.live is not None):
            key = (id(held.index), id(held.live))  # layers may share what they hold and hide different entries
            if key not in ep.decode_masks:
                total = ep.seen + ep.query_len
                if mask is None:  # no padding: build the mask that carries the bias or the fillers
                    ones = torch.ones(held.index.shape[0], total, dtype=torch.bool, device=held.index.device)
                    if self.adapter.mask_format != "2d":  # SDPA: the 4-D causal one
                        ones = full_causal_mask(ones, ep.query_len, "bool", torch.float32)
                    mask = gather_mask(ones, None, decode_key_index(held.index, ep.prefill_len, total))
                else:
                    mask = gather_mask(mask, None, decode_key_index(held.index, ep.prefill_len, mask.shape[-1]))
                if held.live is not None:
                    mask = mask_key_columns(mask, held.live)
                if held.bias is not None:
                    mask = add_key_bias(mask, held.bias, layer_hidden(args, kwargs).dtype, self.adapter)
                ep.decode_masks[key] = mask
            kwargs["attention_mask"] = ep.decode_masks[key]
        if held.shift is not None:
            pos, pe = self.shifted_decode_positions(layer, ep, layer_hidden(args, kwargs), kwargs)
            kwargs["position_ids"] = pos
            kwargs["position_embeddings"] = pe
        return args, kwargs

    def window_decode_mask(self, layer: int, ep: Episode, window: int, dtype: torch.dtype) -> torch.Tensor:
        """The 4-D decoding mask of a sliding-window ``layer`` whose prompt entries were pruned.

        The window is the unpruned model's, in original sequence indices: a query at index q sees the held keys
        at q-W+1..q (the cache keeps them all, :func:`keep_whole_windows`). Columns: the cache's entries, then
        the step's own tokens."""
        held = ep.held_at(layer)
        total = ep.seen + ep.query_len
        keys = decode_key_index(held.index, ep.prefill_len, total)  # every entry fed to the layer, in order
        b, fed = keys.shape
        layer_cache = ep.cache.layers[layer] if ep.cache is not None and hasattr(ep.cache, "layers") else None
        cached = layer_cache.keys.shape[-2] if getattr(layer_cache, "keys", None) is not None else fed - ep.query_len
        width = min(cached + ep.query_len, fed)
        keys = keys[:, -width:]
        ones = torch.ones(b, fed - held.index.shape[1], dtype=torch.bool, device=keys.device)
        live = torch.cat([held.live, ones], 1)[:, -width:] if held.live is not None else None
        valid = torch.cat([ep.valid, torch.ones(b, total - ep.valid.shape[1], dtype=torch.bool, device=keys.device)], 1)
        real = valid.gather(1, keys) if live is None else valid.gather(1, keys) & live
        q = torch.arange(ep.seen, total, device=keys.device)[None, :, None]
        k = keys[:, None, :]
        allowed = (real[:, None, :] & (k <= q) & (k > q - window))[:, None]  # (B, 1, Q, width)
        if held.bias is not None:
            bias = torch.nn.functional.pad(held.bias, (0, fed - held.bias.shape[1]))[:, -width:]
            out = torch.zeros(allowed.shape, dtype=dtype, device=keys.device).masked_fill(~allowed, torch.finfo(dtype).min)
            return out + bias.to(dtype)[:, None, None, :]
        if self.adapter.mask_format == "bool":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=keys.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def shifted_decode_positions(self, layer: int, ep: Episode, hidden: torch.Tensor, kwargs: dict):
        """(position ids, rotary cos/sin) of the decoding tokens at ``layer``, after a renumbering stage moved its
        positions down by the layer's held shift (computed once per step and shift)."""
        shift = ep.held_at(layer).shift
        key = (id(shift), self.adapter.rotary_kind(layer))
        if key not in ep.decode_pe and self.adapter.rope_axes > 1:  # M-RoPE: the model's step positions, moved
            if ep.rope is None:
                raise PipelineRuntimeError(f"decoding after renumbered {self.adapter.family} positions needs the "
                                           "multi-axis positions the model passes its LLM; none were passed")
            rope = ep.rope - shift.to(ep.rope.dtype)[None, :, None]
            ep.decode_pe[key] = (kwargs.get("position_ids"), self.adapter.rotary_embeddings(hidden, rope, layer))
        if key not in ep.decode_pe:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = (ep.seen + torch.arange(ep.query_len, device=hidden.device))[None]
            pos = expand_batch(pos, shift.shape[0]) - shift[:, None]
            ep.decode_pe[key] = (pos, self.adapter.rotary_embeddings(hidden, pos, layer))
        return ep.decode_pe[key]
