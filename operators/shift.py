"""Attention-shift corrections: change how the stage's attention-based scores are computed.

Text queries pay more attention to the visual tokens that sit closest to them, whatever those
tokens show: under RoPE's long-range decay and the causal mask, naive attention scores prefer the
bottom rows of the image (FEATHER, Endo et al., ICCV 2025, shows FastV keeping mostly the bottom).
A shift operator fixes the measurement, not the selection: it registers on the stage's state and
every ``attention`` scorer after it computes its scores through it.
"""

from __future__ import annotations

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
       position distance — fitted by ``iterations`` rounds of backfitting (round 1 is "the mean
       logit at each distance"). Then ``t`` is subtracted from every logit before the softmax.
       Because visual queries see keys on both sides, a trend in distance cannot masquerade as
       content, which it can for causal text queries alone. ``query_stride: s`` fits on every s-th
       visual query (a cheaper estimate at thousands of visual tokens; every distance is still seen).

    Only the scores change; the model's own attention is untouched.
    """

    @dataclass
    class Params:
        iterations: int = 8  # backfitting rounds of the trend fit (1: mean logit at each distance)
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
        trend = ctx.signals.cached(("soft_mask_trend", b, ctx.rotary, self.params.iterations, self.params.query_stride),
                                   lambda: self.fit_trend(ctx))
        rows = ctx.rows.to(dev)
        row_visual = vis[rows]
        ctx.allowed = (ctx.allowed.to(dev) | (row_visual[:, None] & vis[None, :])) & vis[None, :]
        pos = st.positions[b].to(dev)
        dist = (pos[rows][:, None] - pos[None, :]).abs().clamp_max(trend.shape[-1] - 1)
        ctx.logits = ctx.logits - trend[:, dist]

    def fit_trend(self, ctx: AttentionContext) -> torch.Tensor:
        """(H, D+1) positional trend t(d) of one sample, fitted on instruction + (every ``query_stride``-th)
        visual queries × visual keys."""
        signals, b = ctx.signals, ctx.sample
        st = signals.state
        vis_idx = signals.query_rows("visual", b)
        est_rows = torch.cat([signals.query_rows("instruction", b), vis_idx[::self.params.query_stride]])
        logits = signals.source.logits(b, est_rows, rotary=ctx.rotary).float()[:, :, vis_idx.to(ctx.logits.device)]
        return fit_positional_trend(logits, st.positions[b][est_rows], st.positions[b][vis_idx], self.params.iterations)


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


def fit_positional_trend(logits: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, iterations: int) -> torch.Tensor:
    """Backfit ``logits`` (H, Q, K) ≈ a[q] + c[k] + t(|q_pos − k_pos|); return t as (H, D+1).

    Each round sets t(d) to the mean residual over the pairs at distance d, then the per-query
    and per-key terms to their mean residuals (Gauss–Seidel on the least-squares fit). Only t is
    returned; distances never seen get 0. ``t`` is centred (mean 0 over the pairs).

    The rounds never touch the (H, Q, K) block again: it is read once for its row means, column means
    and per-distance sums. What a round needs are sums over the pairs, e.g. ``Σ_{pairs at d} a_q`` and
    ``Σ_k t(|p_q − p_k|)``; with the queries' and keys' values (or counts) laid out on the integer
    position axis these are cross-correlations and convolutions along it, computed with FFTs in
    float64, so a round costs O(H · P log P) for P positions instead of the O(H · K · D) of the
    (K × distance) count matrices an explicit sum needs. The result is the same as the direct rounds
    (up to rounding; ``tests/test_inllm_operators.py`` checks both against each other).
    """
    h, q, k = logits.shape
    dev, dtype = logits.device, logits.dtype
    f64 = torch.float64 if dev.type != "mps" else torch.float32  # MPS has no float64
    q_pos, k_pos = q_pos.to(dev).long(), k_pos.to(dev).long()
    origin = torch.minimum(q_pos.min(), k_pos.min())
    q_pos, k_pos = q_pos - origin, k_pos - origin
    dist = (q_pos[:, None] - k_pos[None, :]).abs()  # (Q, K)
    flat = dist.reshape(-1)
    size = int(flat.max()) + 1
    pairs = torch.bincount(flat, minlength=size).to(f64)  # (D,)
    count = pairs.clamp_min(1)
    row_mean, col_mean = logits.mean(-1).to(f64), logits.mean(1).to(f64)  # (H, Q), (H, K); no float64 copy
    by_distance = torch.zeros(h, size, device=dev, dtype=logits.dtype).index_add_(1, flat, logits.reshape(h, -1))
    by_distance = by_distance.to(f64)

    span = int(torch.maximum(q_pos.max(), k_pos.max())) + 1
    n_fft = _smooth_length(2 * span - 1)  # circular length without wrap-around for shifts in (-span, span)
    fft, ifft = torch.fft.rfft, torch.fft.irfft

    def on_axis(values: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # (H, n) at positions -> (H, span)
        return torch.zeros(values.shape[0], span, device=dev, dtype=f64).index_add_(1, pos, values)

    ones = torch.ones(1, dtype=f64, device=dev)
    f_q = fft(on_axis(ones.expand(1, q), q_pos), n_fft)  # query count per position
    f_k = fft(on_axis(ones.expand(1, k), k_pos), n_fft)  # key count per position

    def pair_sums(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Σ over the pairs at each distance d of a_q + c_k: (H, D). The correlation of the queries' a with the
        key counts plus that of the keys' c with the query counts, in one inverse transform."""
        spectrum = fft(on_axis(a, q_pos), n_fft).conj() * f_k + fft(on_axis(c, k_pos), n_fft).conj() * f_q
        corr = ifft(spectrum, n_fft)  # corr[s] = Σ_x V[x] N[x + s]; shift -d sits at n_fft - d
        out = corr[:, :size].clone()
        out[:, 1:] += corr[:, n_fft - size + 1:].flip(-1)
        return out

    def trend_spectrum(t: torch.Tensor) -> torch.Tensor:
        """The transform of t(|s|) on the circular axis (s and -s both)."""
        sym = torch.zeros(h, n_fft, device=dev, dtype=f64)
        sym[:, :size] = t
        sym[:, n_fft - size + 1:] = t[:, 1:].flip(-1)
        return fft(sym, n_fft)

    a = row_mean
    c = torch.zeros(h, k, device=dev, dtype=f64)
    t = torch.zeros(h, size, device=dev, dtype=f64)
    for _ in range(iterations):
        t = (by_distance - pair_sums(a, c)) / count
        f_t = trend_spectrum(t)  # Σ_other t(|p - p_other|) at every position p = conv(other's counts, t)
        a = row_mean - ifft(f_t * f_k, n_fft)[:, q_pos] / k - c.mean(-1, keepdim=True)
        c = col_mean - ifft(f_t * f_q, n_fft)[:, k_pos] / q - a.mean(-1, keepdim=True)
    return (t - (t @ pairs / (q * k))[:, None]).to(dtype)
