"""Attention-shift corrections: change how the stage's attention-based scores are computed.

Text queries pay more attention to the visual tokens that sit closest to them, whatever those
tokens show: under RoPE's long-range decay and the causal mask, naive attention scores prefer the
bottom rows of the image (FEATHER, Endo et al., ICCV 2025, shows FastV keeping mostly the bottom).
A shift operator fixes the measurement, not the selection: it registers on the stage's state and
every ``attention`` scorer after it computes its scores through it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tokenprune.operator import ParamError, Shift
from tokenprune.registry import register_operator
from tokenprune.state import AttentionContext, masked_softmax


@register_operator("none")
class NoShift(Shift):
    """No correction: plain attention (with RoPE, causal). The baseline of a shift ablation."""


@register_operator("rope_free")
class RopeFree(Shift):
    """Score with queries and keys taken before the rotary embedding (FEATHER's "w/o RoPE" criterion).

    Endo et al., "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model
    Acceleration" (ICCV 2025): removing RoPE from the attention criterion removes its long-range
    decay, so scores no longer favour the visual tokens nearest the text. Only the scores change;
    the model itself still runs with RoPE.
    """

    rotary = False


@register_operator("rope_gravity")
class RopeGravity(Shift):
    """Divide attention by the attention a content-free input would receive at the same positions.

    After SparseVLM v2's positional-gravity correction (Zhang et al., SparseVLM, 2024/2025; our
    reading): the attention a query pays a key mixes what the key shows with where it sits. The
    positional part is measured by running the same q/k projections (and rotary angles) on a
    content-free input — every token replaced by the sample's mean hidden state — and the observed
    probabilities are divided by it, row by row, then renormalised over the allowed keys.

    The denominators are probabilities, so never negative; tiny ones are clamped to
    ``floor / (number of keys the row may attend to)`` (``floor`` = 0.01 means "never divide by less
    than a hundredth of uniform attention"), so a key the content-free input ignores cannot explode.
    """

    @dataclass
    class Params:
        floor: float = 0.01  # smallest denominator, as a fraction of uniform attention over the allowed keys

        def __post_init__(self) -> None:
            if not self.floor > 0:
                raise ParamError("floor", "must be > 0 (it guards the division against tiny denominators)")

    def adjust_probs(self, ctx: AttentionContext) -> None:
        source = ctx.signals.source
        free = source.logits(ctx.sample, ctx.rows, rotary=ctx.rotary, content_free=True).float()
        p0 = masked_softmax(free, ctx.allowed)
        n_allowed = ctx.allowed.sum(-1, keepdim=True).clamp_min(1).to(p0.dtype)  # (Q, 1)
        corrected = ctx.probs / torch.maximum(p0, self.params.floor / n_allowed)
        corrected = corrected * ctx.allowed
        ctx.probs = corrected / corrected.sum(-1, keepdim=True).clamp_min(torch.finfo(corrected.dtype).tiny)


@register_operator("bidirectional_soft_mask")
class BidirectionalSoftMask(Shift):
    """ASAP's attention-shift correction: bidirectional visual queries and a soft positional mask.

    ASAP (attention-shift aware pruning; the abstract is in the project's seeds, the method section
    is not public — this is our reading, documented in docs/methods/asap.md):

    1. *Bidirectional.* Visual tokens are scored by queries from the instruction **and** from the
       visual tokens themselves; a visual query sees every visual key (not only earlier ones), so
       the top of the image is not starved by the causal mask. Keys are the visual tokens.
    2. *Soft, dynamic mask.* An additive bias, estimated from the current input, removes the
       positional trend of the logits. The logits of the estimation block (instruction and visual
       queries × visual keys, per sample and head) are modelled as ``a[q] + c[k] + t(|p_q − p_k|)``
       — a per-query offset (which softmax ignores), a per-key content term and a trend in the
       position distance — a least-squares fit solved by ``iterations`` steps of preconditioned
       conjugate gradients (:func:`fit_positional_trend`). Then ``t`` is subtracted from every logit
       before the softmax.
       Because visual queries see keys on both sides, a trend in distance cannot masquerade as
       content, which it can for causal text queries alone. ``query_stride: s`` fits on every s-th
       visual query (a cheaper estimate at thousands of visual tokens; every distance is still seen).

    Only the scores change; the model's own attention is untouched.
    """

    @dataclass
    class Params:
        iterations: int = 6  # conjugate-gradient steps of the trend fit (more: closer to the exact least squares)
        query_stride: int = 1  # the fit uses every s-th visual query row (all instruction rows, all visual keys)

        def __post_init__(self) -> None:
            if self.iterations < 1:
                raise ParamError("iterations", "must be >= 1")
            if not isinstance(self.query_stride, int) or self.query_stride < 1:
                raise ParamError("query_stride", f"must be an integer >= 1, got {self.query_stride!r}")

    def adjust_logits(self, ctx: AttentionContext) -> None:
        st = ctx.signals.state
        b = ctx.sample
        dev = ctx.logits.device
        vis = (st.visual_mask[b] & st.valid_mask[b]).to(dev)
        if not bool(vis.any()):
            return
        trend = ctx.signals.cached(("soft_mask_trend", b, ctx.rotary, self.cache_key()), lambda: self.fit_trend(ctx))
        rows = ctx.rows.to(dev)
        row_visual = vis[rows]
        ctx.allowed = (ctx.allowed.to(dev) | (row_visual[:, None] & vis[None, :])) & vis[None, :]
        bias = trend_at_pairs(trend, st.positions[b].to(dev), rows)  # a fresh tensor: the result is written into it
        ctx.logits = torch.sub(ctx.logits, bias, out=bias)
        ctx.owned = True

    def fit_trend(self, ctx: AttentionContext) -> torch.Tensor:
        """(H, D+1) positional trend t(d) of one sample, fitted on instruction + (every ``query_stride``-th)
        visual queries × visual keys."""
        signals, b = ctx.signals, ctx.sample
        st = signals.state
        vis_idx = signals.query_rows("visual", b)
        instruction, visual = signals.query_rows("instruction", b), vis_idx[::self.params.query_stride]
        est_rows = torch.cat([instruction, visual])
        # in chunks of rows, each kept (within the stage's budget) for the scorers, which ask for the same chunks
        chunks = signals.row_chunks(b, instruction, rotary=ctx.rotary) + signals.row_chunks(b, visual, rotary=ctx.rotary)
        logits = (signals.logits(b, rows, rotary=ctx.rotary) for rows in chunks if rows.numel())  # (H, Q_i, N)
        return fit_positional_trend(logits, st.positions[b][est_rows], st.positions[b][vis_idx], self.params.iterations,
                                    keys=vis_idx)


def trend_at_pairs(trend: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(H, Q, N) ``trend[h, |positions[row] − positions[key]|]`` for query ``rows`` (Q,) and every key of a
    sample (N tokens at ``positions``); distances beyond the table take its last value.

    When the positions are consecutive (p_k = p_0 + k: no padding, 1-D RoPE) every row is a contiguous
    window of the symmetric table ``t(|s|)``, so the result is a copy of Q windows per head; otherwise an
    element-wise gather."""
    h, size = trend.shape
    n = positions.numel()
    last = size - 1
    if n > 0 and bool((positions == positions[0] + torch.arange(n, device=positions.device)).all()):
        reach = n - 1  # |p_q - p_k| < n for keys and rows among the tokens
        s = torch.arange(-reach, reach + 1, device=trend.device).abs().clamp_max(last)
        table = trend.index_select(1, s)  # (H, 2n - 1): t(|s|) for s = -reach .. reach
        # row q, key k: s = k - q, at table index (k - q) + reach, so row q is the window starting at reach - q
        return table.unfold(1, n, 1)[:, reach - rows]
    dist = (positions[rows][:, None] - positions[None, :]).abs().clamp_max(last)
    return trend.index_select(1, dist.reshape(-1)).view(h, rows.numel(), n)


def _smooth_length(n: int) -> int:
    """The smallest length >= n whose only prime factors are 2, 3 and 5 (fast for the FFT; 6000 for 5899, where
    the next power of two would be 8192)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def fit_positional_trend(logits: torch.Tensor | Iterable[torch.Tensor], q_pos: torch.Tensor, k_pos: torch.Tensor,
                         iterations: int, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares fit of ``logits`` (H, Q, K) ≈ a[q] + c[k] + t(|q_pos − k_pos|); return t as (H, D+1).

    With ``keys`` (K,), ``logits`` is (H, Q, N) and the fit reads its columns ``keys`` only (at positions
    ``k_pos``), without copying them out. ``logits`` may also be an iterable of (H, Q_i, ·) blocks whose rows,
    in order, are the Q rows: the fit then never holds more than one block (thousands of query rows at a
    7B model's 32 heads are a gigabyte).

    Every (query, key) pair is one observation, so a and c are a complete two-way layout and drop out
    exactly by double centring (subtracting row and column means, adding the grand mean). What is
    left are the normal equations for t, ``G t = b`` with ``G = Zᵀ P Z`` (Z: the pair-to-distance
    indicator, P: the double centring) and ``b = Zᵀ P L``. They are solved per head by ``iterations``
    steps of conjugate gradients preconditioned by the pair count at each distance (Hestenes &
    Stiefel 1952; with this Jacobi preconditioner step 1 is a multiple of the mean double-centred logit at
    each distance).
    CG needs far fewer steps than backfitting (alternating t / a, c updates) for the same accuracy:
    on logits captured from the reference model and from the bench's LLaVA-NeXT-like model, 4 steps
    are within 0.4% (max |error| / max |t|) of the converged trend and 6 (the default) within 0.05%,
    where 8 backfitting rounds were within 0.7–1.6% on the two slower cases (docs/methods/asap.md). Distances never seen get 0; ``t`` is centred (mean 0 over
    the pairs), since a constant in t is indistinguishable from one in a or c.

    The (H, Q, K) block is read once, for its row means, column means and per-distance sums. Applying G
    needs sums over the pairs — ``Σ_k t(|p_q − p_k|)`` for every query (and key), then ``Σ_{pairs at
    d}`` of such per-query (per-key) values — which are convolutions and correlations with the query
    and key counts along the integer position axis. They are computed with FFTs in float64, so a step
    costs four batched FFTs of length ~2P for P positions, O(H · P log P), whatever Q and K are.
    ``tests/test_inllm_operators.py`` checks the steps against CG on the dense matrices and the
    converged fit against ``torch.linalg.lstsq`` on the explicit design matrix.
    """
    blocks = iter([logits] if isinstance(logits, torch.Tensor) else logits)
    first = next(blocks)
    h, n, dev, dtype = first.shape[0], first.shape[-1], first.device, first.dtype
    f64 = torch.float64 if dev.type != "mps" else torch.float32  # MPS has no float64
    q_pos, k_pos = q_pos.to(dev).long(), k_pos.to(dev).long()
    q, k = q_pos.numel(), k_pos.numel()
    origin = torch.minimum(q_pos.min(), k_pos.min())
    q_pos, k_pos = q_pos - origin, k_pos - origin
    size = int(torch.maximum(q_pos.max() - k_pos.min(), k_pos.max() - q_pos.min())) + 1  # largest distance + 1
    if keys is None:
        column_pos, other, weight = k_pos.int(), None, None
    else:  # columns outside ``keys`` go to a last, discarded distance bin
        keys = keys.to(dev)
        weight = torch.zeros(n, device=dev, dtype=dtype).index_fill_(0, keys, 1.0 / k)
        column_pos = torch.zeros(n, device=dev, dtype=torch.int32).index_copy_(0, keys, k_pos.int())
        other = torch.ones(n, device=dev, dtype=torch.bool).index_fill_(0, keys, False)
    row_means, col_sum, done = [], torch.zeros(h, n, device=dev, dtype=dtype), 0
    pairs = torch.zeros(size + 1, device=dev, dtype=torch.long)
    by_distance = torch.zeros(h, size + 1, device=dev, dtype=dtype)
    for block in itertools.chain([first], blocks):  # the row means, column sums and per-distance sums
        rows = block.shape[1]
        row_means.append(block.mean(-1) if weight is None else block @ weight)  # (H, rows)
        col_sum += block.sum(1)
        dist = (q_pos[done:done + rows].int()[:, None] - column_pos[None, :]).abs_()  # (rows, columns); int32: faster
        if other is not None:
            dist.masked_fill_(other[None, :], size)
        dist = dist.reshape(-1).long()
        pairs += torch.bincount(dist, minlength=size + 1)
        by_distance.index_add_(1, dist, block.reshape(h, -1))
        done += rows
    if done != q:
        raise ValueError(f"the logit blocks hold {done} query rows; q_pos has {q}")
    row_mean = torch.cat(row_means, 1)
    col_mean = (col_sum if keys is None else col_sum[:, keys]) / q
    pairs, by_distance = pairs[:size].to(f64), by_distance[:, :size]

    span = int(torch.maximum(q_pos.max(), k_pos.max())) + 1
    n_fft = _smooth_length(2 * span - 1)  # circular length without wrap-around for shifts in (-span, span)
    fft, ifft = torch.fft.rfft, torch.fft.irfft

    def on_axis(values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # (H, n) at positions -> (H, span)
        return torch.zeros(values.shape[0], span, device=dev, dtype=f64).index_add_(1, pos, values.to(f64))

    ones = torch.ones(1, dtype=f64, device=dev)
    n_q, n_k = on_axis(ones.expand(1, q), q_pos), on_axis(ones.expand(1, k), k_pos)  # (1, span) counts
    counts = fft(torch.stack([n_k, n_q]), n_fft)  # (2, 1, F)

    # d's mirror shift -d sits at n_fft - d; d = 0 has no mirror (its column is taken once, then subtracted)
    mirror = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.arange(n_fft - 1, n_fft - size, -1, device=dev)])

    def fold(corr: torch.Tensor) -> torch.Tensor:
        """(H, n_fft) sums at each signed shift -> (H, D) sums at each distance |shift|."""
        out = corr[:, :size] + corr.index_select(1, mirror)
        out[:, 0] -= corr[:, 0]
        return out

    counts_conj = counts.conj().resolve_conj()  # correlation: the reversed sum, which the fold does not mind

    def pair_sums(per_query: torch.Tensor, per_key: torch.Tensor) -> torch.Tensor:
        """Σ over the pairs at each distance d of u_q + v_k, for u and v given as their sums at each position
        (H, span): u correlated with the key counts plus v with the query counts, one inverse transform."""
        return fold(ifft((fft(torch.stack([per_query, per_key]), n_fft) * counts_conj).sum(0), n_fft))

    # Per CG step, G is applied once: few, whole-array operations (a step's cost is mostly their number).
    twice_counts = 2 * counts
    to_means = torch.stack([n_q / k, n_k / q])  # (2, 1, span): sums over keys (queries) at a query (key) -> means
    pairs_per_block = pairs / (q * k)

    def normal_matrix_times(t: torch.Tensor) -> torch.Tensor:
        """G t = Zᵀ P Z t: the pairs' t, double centred, summed back per distance."""
        # the transform of t(|s|) on the circular axis is real: 2 Re(rfft(t)) - t(0); the 2 is in twice_counts
        f_t = torch.sub(fft(t, n_fft).real, t[:, :1], alpha=0.5)
        near = ifft(f_t * twice_counts, n_fft)  # (2, H, n_fft): Σ_keys t(|x - p_k|), Σ_queries t(|x - p_q|)
        parts = near[..., :span] * to_means  # row (column) means of Z t, on the axis at the queries (keys)
        sums = ifft((fft(parts, n_fft) * counts_conj).sum(0), n_fft)
        return torch.addcmul(fold(sums).neg_(), pairs, t + t @ pairs_per_block[:, None])

    grand = row_mean.mean(-1, keepdim=True).to(f64)
    rhs = by_distance.to(f64) - pair_sums(on_axis(row_mean, q_pos), on_axis(col_mean, k_pos)) + pairs * grand
    inverse_count = torch.where(pairs > 0, 1 / pairs.clamp_min(1), 0.0)  # unseen distances stay at 0
    # G is singular: a constant added to t over the seen distances is a constant on every pair, which the double
    # centring removes. The residual is kept orthogonal to that direction (rounding feeds it otherwise, and CG run
    # past convergence then drifts along it and loses the rest: 20 steps on a 13 x 10 float32 block gave 20x t).
    seen = (pairs > 0).to(f64)
    seen_unit = seen / seen.sum().clamp_min(1).sqrt()

    def off_null(r: torch.Tensor) -> torch.Tensor:
        return r.sub_((r @ seen_unit)[:, None] * seen_unit)

    t = torch.zeros(h, size, device=dev, dtype=f64)
    resid = off_null(rhs.clone())  # updated in place
    direction = precond = resid * inverse_count
    rz = torch.linalg.vecdot(resid, precond)[:, None]  # (H, 1)
    zero = torch.zeros_like(rz)
    for i in range(iterations):
        g_dir = normal_matrix_times(direction)
        curvature = torch.linalg.vecdot(direction, g_dir)[:, None]
        step = torch.where(curvature > 0, rz / curvature, zero)  # 0 once a head has converged exactly
        t.addcmul_(step, direction)
        if i == iterations - 1:
            break
        off_null(resid.addcmul_(step, g_dir, value=-1))
        precond = resid * inverse_count
        rz_next = torch.linalg.vecdot(resid, precond)[:, None]
        direction = torch.addcmul(precond, torch.where(rz > 0, rz_next / rz, zero), direction)
        rz = rz_next
    return ((t - (t @ pairs / (q * k))[:, None]) * (pairs > 0)).to(dtype)
