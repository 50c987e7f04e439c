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

from tokenprune.core.operator import ParamError, Shift
from tokenprune.core.registry import register_operator
from tokenprune.core.state import AttentionContext, masked_softmax


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

    def logit_bias(self, ctx: AttentionContext) -> torch.Tensor | None:
        st = ctx.signals.state
        b = ctx.sample
        vis = st.visual_mask[b] & st.valid_mask[b]
        if not bool(vis.any()):
            return None
        trend = ctx.signals.cached(("soft_mask_trend", b, ctx.rotary, self.cache_key()), lambda: self.fit_trend(ctx))
        rows = ctx.rows.to(vis.device)
        ctx.allowed = (ctx.allowed | (vis[rows][:, None] & vis[None, :])) & vis[None, :]
        # -t at every pair: a fresh tensor, into which the caller writes the mask and the logits
        return trend_at_pairs(trend.neg(), st.positions[b].to(trend.device), rows.to(trend.device))

    def fit_trend(self, ctx: AttentionContext) -> torch.Tensor:
        """(H, D+1) positional trend t(d) of one sample, fitted on instruction + (every ``query_stride``-th)
        visual queries × visual keys: from the queries and keys when the source gives them (no logit block is
        formed), else from the logits in chunks of rows."""
        signals, b = ctx.signals, ctx.sample
        st = signals.state
        vis_idx = signals.query_rows("visual", b)
        instruction, visual = signals.query_rows("instruction", b), vis_idx[::self.params.query_stride]
        est_rows = torch.cat([instruction, visual])
        q_pos, k_pos = st.positions[b][est_rows], st.positions[b][vis_idx]
        q_and_k = signals.queries_and_keys(b, est_rows, rotary=ctx.rotary)
        if q_and_k is not None:
            queries, keys = q_and_k
            both = torch.cat([q_pos, k_pos])
            if qk_fit_is_cheaper(queries.shape[1], vis_idx.numel(), queries.shape[0], keys.shape[0], queries.shape[2],
                                 int(both.max() - both.min()) + 1):
                return fit_positional_trend_qk(queries, keys[:, vis_idx.to(keys.device)], q_pos, k_pos,
                                               self.params.iterations)
        # in chunks of rows, each kept (within the stage's budget) for the scorers, which ask for the same chunks
        chunks = signals.row_chunks(b, instruction, rotary=ctx.rotary) + signals.row_chunks(b, visual, rotary=ctx.rotary)
        logits = (signals.logits(b, rows, rotary=ctx.rotary) for rows in chunks if rows.numel())  # (H, Q_i, N)
        return fit_positional_trend(logits, q_pos, k_pos, self.params.iterations, keys=vis_idx)


def qk_fit_is_cheaper(rows: int, keys: int, heads: int, key_heads: int, head_dim: int, span: int) -> bool:
    """Whether :func:`fit_positional_trend_qk` costs less than forming and summing the logit block of ``rows`` x
    ``keys`` (per head) for :func:`fit_positional_trend`, at positions spanning ``span``.

    Costs measured on a 2-core CPU (2026-12-01, commit 011bb85): the block costs ~(hd/70 + 4) ns a logit a head (the product at
    ~140 GFLOP/s, then the per-distance sums), the q/k fit ~7 ns a channel and FFT point (float64 transforms of
    every query and key channel). Every visual query at LLaVA-NeXT-7B width (2940 rows, 32 heads of 128): the
    q/k fit, ~0.35 s against ~1.6 s; every 32nd (107 rows): the block, ~0.06 s against ~0.35 s."""
    block = heads * rows * keys * (head_dim / 70 + 4)
    transforms = (heads + key_heads) * head_dim * _smooth_length(2 * span - 1) * 7
    return transforms < block


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


class _PositionAxis:
    """The integer position axis of a trend fit: query and key positions, shifted to start at 0, their counts
    on the axis and their transforms, and the FFT helpers the fit's sums share.

    A circular axis of ``n_fft`` >= 2·span − 1 holds every signed shift in (−span, span) without wrap-around;
    ``fold`` turns sums at signed shifts into sums at distances |shift|."""

    def __init__(self, q_pos: torch.Tensor, k_pos: torch.Tensor, device: torch.device):
        self.dev = device
        self.f64 = torch.float64 if device.type != "mps" else torch.float32  # MPS has no float64
        q_pos, k_pos = q_pos.to(device).long(), k_pos.to(device).long()
        self.q, self.k = q_pos.numel(), k_pos.numel()
        origin = torch.minimum(q_pos.min(), k_pos.min())
        self.q_pos, self.k_pos = q_pos - origin, k_pos - origin
        # largest distance + 1
        self.size = int(torch.maximum(self.q_pos.max() - self.k_pos.min(), self.k_pos.max() - self.q_pos.min())) + 1
        self.span = int(torch.maximum(self.q_pos.max(), self.k_pos.max())) + 1
        self.n_fft = _smooth_length(2 * self.span - 1)
        ones = torch.ones(1, dtype=self.f64, device=device)
        self.n_q, self.n_k = self.on_axis(ones.expand(1, self.q), self.q_pos), self.on_axis(ones.expand(1, self.k), self.k_pos)
        self.counts = self.fft(torch.stack([self.n_k, self.n_q]))  # (2, 1, F)
        # correlation: the reversed sum, which the fold does not mind
        self.counts_conj = self.counts.conj().resolve_conj()
        # d's mirror shift -d sits at n_fft - d; d = 0 has no mirror (its column is taken once, then subtracted)
        self.mirror = torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                                 torch.arange(self.n_fft - 1, self.n_fft - self.size, -1, device=device)])
        # pairs at each distance: the query counts correlated with the key counts (integers; rounding is exact)
        self.pairs = self.fold(self.ifft(self.counts[1] * self.counts_conj[0]))[0].round()  # (D,)

    def fft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x, self.n_fft)

    def ifft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft(x, self.n_fft)

    def on_axis(self, values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(..., n) values at positions ``pos`` (n,) summed onto the axis: (..., span), float64."""
        out = torch.zeros(*values.shape[:-1], self.span, device=self.dev, dtype=self.f64)
        return out.index_add_(out.dim() - 1, pos, values.to(self.f64))

    def fold(self, corr: torch.Tensor) -> torch.Tensor:
        """(..., n_fft) sums at each signed shift -> (..., D) sums at each distance |shift|."""
        out = corr[..., :self.size] + corr.index_select(-1, self.mirror)
        out[..., 0] -= corr[..., 0]
        return out


def fit_positional_trend(logits: torch.Tensor | Iterable[torch.Tensor], q_pos: torch.Tensor, k_pos: torch.Tensor,
                         iterations: int, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares fit of ``logits`` (H, Q, K) ≈ a[q] + c[k] + t(|q_pos − k_pos|); return t as (H, D+1).

    With ``keys`` (K,), ``logits`` is (H, Q, N) and the fit reads its columns ``keys`` only (at positions
    ``k_pos``), without copying them out. ``logits`` may also be an iterable of (H, Q_i, ·) blocks whose rows,
    in order, are the Q rows: the fit then never holds more than one block (thousands of query rows at a
    7B model's 32 heads are a gigabyte). When the logits are q·k products, :func:`fit_positional_trend_qk`
    fits the same t from the queries and keys without forming the block.

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
    where 8 backfitting rounds were within 0.7–1.6% on the two slower cases (docs/methods/asap.md). Distances
    never seen get 0; ``t`` is centred (mean 0 over the pairs), since a constant in t is indistinguishable
    from one in a or c.

    The (H, Q, K) block is read once, for its row means, column means and per-distance sums: b needs nothing
    else. Applying G needs sums over the pairs — ``Σ_k t(|p_q − p_k|)`` for every query (and key), then
    ``Σ_{pairs at d}`` of such per-query (per-key) values — which are convolutions and correlations with the
    query and key counts along the integer position axis. They are computed with FFTs in float64, so a step
    costs four batched FFTs of length ~2P for P positions, O(H · P log P), whatever Q and K are.
    ``tests/test_inllm_operators.py`` checks the steps against CG on the dense matrices and the
    converged fit against ``torch.linalg.lstsq`` on the explicit design matrix.
    """
    blocks = iter([logits] if isinstance(logits, torch.Tensor) else logits)
    first = next(blocks)
    h, n, dev, dtype = first.shape[0], first.shape[-1], first.device, first.dtype
    axis = _PositionAxis(q_pos, k_pos, dev)
    q_pos, size, q, k = axis.q_pos, axis.size, axis.q, axis.k
    if keys is None:
        column_pos, other, weight = axis.k_pos.int(), None, None
    else:  # columns outside ``keys`` go to a last, discarded distance bin
        keys = keys.to(dev)
        weight = torch.zeros(n, device=dev, dtype=dtype).index_fill_(0, keys, 1.0 / k)
        column_pos = torch.zeros(n, device=dev, dtype=torch.int32).index_copy_(0, keys, axis.k_pos.int())
        other = torch.ones(n, device=dev, dtype=torch.bool).index_fill_(0, keys, False)
    row_means, col_sum, done = [], torch.zeros(h, n, device=dev, dtype=dtype), 0
    by_distance = torch.zeros(h, size + 1, device=dev, dtype=dtype)
    for block in itertools.chain([first], blocks):  # the row means, column sums and per-distance sums
        rows = block.shape[1]
        row_means.append(block.mean(-1) if weight is None else block @ weight)  # (H, rows)
        col_sum += block.sum(1)
        dist = (q_pos[done:done + rows].int()[:, None] - column_pos[None, :]).abs_()  # (rows, columns); int32: faster
        if other is not None:
            dist.masked_fill_(other[None, :], size)
        by_distance.index_add_(1, dist.reshape(-1).long(), block.reshape(h, -1))
        done += rows
    if done != q:
        raise ValueError(f"the logit blocks hold {done} query rows; q_pos has {q}")
    col_mean = (col_sum if keys is None else col_sum[:, keys]) / q
    return _solve_positional_trend(axis, torch.cat(row_means, 1), col_mean, by_distance[:, :size], iterations, dtype)


#: Bytes of float64/complex128 position-axis blocks :func:`fit_positional_trend_qk` makes at once.
QK_FIT_CHUNK_BYTES = 64 * 2**20


def fit_positional_trend_qk(queries: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                            iterations: int) -> torch.Tensor:
    """:func:`fit_positional_trend` of the logits ``queries @ keysᵀ`` without forming them: the same t (H, D+1).

    ``queries`` (H, Q, hd) are scaled (the logit is their dot product with a key), ``keys`` (H_kv, K, hd), H a
    multiple of H_kv (grouped-query attention: consecutive query heads share a key head).

    The fit reads the logit block only through three linear statistics, and each is cheap for a bilinear
    block: the row means are ``q · mean(k)``, the column means ``mean(q) · k``, and the sum over the pairs at
    distance d, ``Σ_{|p_q − p_k| = d} q · k``, is the cross-correlation of the queries with the keys along the
    position axis, summed over the head dimension — one FFT per query and key channel, O(H · hd · P log P)
    for P positions instead of the O(H · Q · K · hd) of the block (at LLaVA-NeXT-7B width, 2928 visual
    queries: about 2 GFLOP of FFTs instead of 70 GFLOP of products, and no gigabyte of logits). Float64
    throughout, so the sums are more exact than the float32 block's. Tested against the block's fit.
    """
    h, _, hd = queries.shape
    h_kv = keys.shape[0]
    group = h // h_kv
    dev, dtype = queries.device, queries.dtype
    axis = _PositionAxis(q_pos, k_pos, dev)
    q64, k64 = queries.to(axis.f64), keys.to(axis.f64)
    key_mean = k64.mean(1).repeat_interleave(group, 0)  # (H, hd)
    query_mean = q64.mean(1).view(h_kv, group, hd)
    row_mean = torch.einsum("hqd,hd->hq", q64, key_mean)
    col_mean = torch.einsum("gjd,gkd->gjk", query_mean, k64).reshape(h, -1)
    by_distance = torch.empty(h, axis.size, device=dev, dtype=axis.f64)
    per_key_head = (group + 1) * hd * (axis.n_fft + 2) * 8 * 2  # bytes of one key head's axis blocks and transforms
    step = max(1, min(h_kv, QK_FIT_CHUNK_BYTES // per_key_head))
    for g0 in range(0, h_kv, step):
        g1 = min(h_kv, g0 + step)
        key_t = axis.fft(axis.on_axis(k64[g0:g1].transpose(1, 2), axis.k_pos))  # (g, hd, F)
        query_t = axis.fft(axis.on_axis(q64[g0 * group:g1 * group].transpose(1, 2), axis.q_pos))  # (g·group, hd, F)
        cross = (query_t.view(g1 - g0, group, hd, -1) * key_t.conj()[:, None]).sum(2)  # (g, group, F)
        by_distance[g0 * group:g1 * group] = axis.fold(axis.ifft(cross.reshape((g1 - g0) * group, -1)))
    return _solve_positional_trend(axis, row_mean, col_mean, by_distance, iterations, dtype)


def _solve_positional_trend(axis: _PositionAxis, row_mean: torch.Tensor, col_mean: torch.Tensor,
                            by_distance: torch.Tensor, iterations: int, dtype: torch.dtype) -> torch.Tensor:
    """t (H, D) from the block's row means (H, Q), column means (H, K) and per-distance sums (H, D): the normal
    equations ``G t = b`` solved by preconditioned CG (see :func:`fit_positional_trend`)."""
    h, dev, f64 = row_mean.shape[0], axis.dev, axis.f64
    q, k, span, size, pairs = axis.q, axis.k, axis.span, axis.size, axis.pairs
    counts_conj, fft, ifft, fold = axis.counts_conj, axis.fft, axis.ifft, axis.fold

    def pair_sums(per_query: torch.Tensor, per_key: torch.Tensor) -> torch.Tensor:
        """Σ over the pairs at each distance d of u_q + v_k, for u and v given as their sums at each position
        (H, span): u correlated with the key counts plus v with the query counts, one inverse transform."""
        return fold(ifft((fft(torch.stack([per_query, per_key])) * counts_conj).sum(0)))

    # Per CG step, G is applied once: few, whole-array operations (a step's cost is mostly their number).
    twice_counts = 2 * axis.counts
    to_means = torch.stack([axis.n_q / k, axis.n_k / q])  # (2, 1, span): sums over keys (queries) -> means
    pairs_per_block = pairs / (q * k)

    def normal_matrix_times(t: torch.Tensor) -> torch.Tensor:
        """G t = Zᵀ P Z t: the pairs' t, double centred, summed back per distance."""
        # the transform of t(|s|) on the circular axis is real: 2 Re(rfft(t)) - t(0); the 2 is in twice_counts
        f_t = torch.sub(fft(t).real, t[:, :1], alpha=0.5)
        near = ifft(f_t * twice_counts)  # (2, H, n_fft): Σ_keys t(|x - p_k|), Σ_queries t(|x - p_q|)
        parts = near[..., :span] * to_means  # row (column) means of Z t, on the axis at the queries (keys)
        sums = ifft((fft(parts) * counts_conj).sum(0))
        return torch.addcmul(fold(sums).neg_(), pairs, t + t @ pairs_per_block[:, None])

    grand = row_mean.mean(-1, keepdim=True).to(f64)
    rhs = (by_distance.to(f64) - pair_sums(axis.on_axis(row_mean, axis.q_pos), axis.on_axis(col_mean, axis.k_pos))
           + pairs * grand)
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
