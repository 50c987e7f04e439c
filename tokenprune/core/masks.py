"""Gathers of the per-token tensors a decoder layer receives (positions, rotary cos/sin, masks).

Model-agnostic tensor helpers: which tensors to gather is the attach machinery's business, how a
family lays them out is its adapter's.
"""

from __future__ import annotations

import torch


def expand_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a leading batch dimension of 1 to ``batch``."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] != 1:
        raise ValueError(f"cannot broadcast batch {t.shape[0]} to {batch}")
    return t.expand(batch, *t.shape[1:])


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather along the token axis ``dim`` of ``x`` (batch first) with ``index`` (B, K)."""
    x = expand_batch(x, index.shape[0])
    shape = list(x.shape)
    shape[dim] = index.shape[1]
    view = [index.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = index.shape[1]
    idx = index.view(view).expand(shape)
    return x.gather(dim, idx)


def gather_mask(mask: torch.Tensor | None, query_index: torch.Tensor | None, key_index: torch.Tensor) -> torch.Tensor | None:
    """Gather an attention mask's query rows and key columns.

    ``mask`` is None (causal, SDPA's fast path), a 2-D padding mask (B, T) as FlashAttention takes
    it, or a 4-D mask (B|1, 1|H, Q, T) (bool for SDPA, additive float for eager). ``query_index``
    (B, Q') is None when the query axis stays (decoding); ``key_index`` is (B, T').
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        return gather_tokens(mask, key_index, dim=1)
    if mask.dim() != 4:
        raise ValueError(f"unsupported attention mask of shape {tuple(mask.shape)}")
    mask = expand_batch(mask, key_index.shape[0])
    if query_index is not None:
        mask = gather_tokens(mask, query_index, dim=2)
    return gather_tokens(mask, key_index, dim=3)


def decode_key_index(cached_index: torch.Tensor, prefill_len: int, total_len: int) -> torch.Tensor:
    """Key columns, in the full-sequence frame, of a layer whose prefill cache holds ``cached_index``.

    Tokens fed after the prefill (decoding) are cached by every layer: ``cat(cached, prefill_len..total_len)``.
    """
    b = cached_index.shape[0]
    tail = torch.arange(prefill_len, total_len, device=cached_index.device).expand(b, -1)
    return torch.cat([cached_index, tail], dim=1)


def full_causal_mask(padding: torch.Tensor, query_len: int, fmt: str, dtype: torch.dtype,
                     window: int | None = None) -> torch.Tensor:
    """4-D mask (B, 1, Q, T) of the last ``query_len`` tokens of a sequence with 2-D ``padding`` mask (B, T);
    with ``window``, a query at index q sees keys q-window+1..q only.

    ``fmt`` is ``bool`` (True = attend, SDPA) or ``additive`` (0 / dtype min, eager).
    """
    b, t = padding.shape
    q_pos = torch.arange(t - query_len, t, device=padding.device)[None, :, None]
    k_pos = torch.arange(t, device=padding.device)[None, None, :]
    allowed = padding.bool()[:, None, :] & (k_pos <= q_pos)
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[:, None]
    if fmt == "bool":
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=padding.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def ragged_keep_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices (B, K) of the True entries of ``keep`` (B, N) per row, K the largest count, and which are live.

    A row with fewer than K kept entries is filled on the left with copies of its first kept index,
    so every row stays sorted and its last entries are the real last tokens (what ``generate``
    reads). The second result is (B, K) bool, False on those filler slots, or None when every row
    keeps K entries.
    """
    b, n = keep.shape
    counts = keep.sum(dim=1)
    k = int(counts.max())
    if bool((counts == 0).any()):
        raise ValueError("a sample would keep no token at all")
    # Kept positions first, in order (a stable sort on "dropped"), then shifted right by each row's shortfall.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]
    shortfall = (k - counts)[:, None]
    slot = torch.arange(k, device=keep.device)[None, :]
    src = (slot - shortfall).clamp_min(0)
    index = order.gather(1, src)
    if bool((shortfall == 0).all()):
        return index, None
    return index, slot >= shortfall


def mask_key_columns(mask: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Mask out the first K key columns of ``mask`` where ``live`` (B, K) is False.

    ``mask`` is 2-D (B, T) padding, or 4-D (B|1, 1|H, Q, T) bool (True = attend) or additive.
    """
    b, k = live.shape
    dead = torch.nn.functional.pad(~live, (0, mask.shape[-1] - k))
    mask = expand_batch(mask, b)
    if mask.dim() == 2:
        return mask.masked_fill(dead, 0)
    dead = dead[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~dead
    return mask.masked_fill(dead, torch.finfo(mask.dtype).min)
