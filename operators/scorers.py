"""Scorers: how much each token is worth keeping (higher is better)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tokenprune.core.operator import FeatureKind, FeatureUser, ParamError, Scorer, ScorerParams
from tokenprune.core.registry import register_operator
from tokenprune.core.state import TokenState


@register_operator("attention")
class AttentionScorer(Scorer):
    """Attention that a set of query rows pays each token at the layer before the site.

    FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) ranks visual tokens
    by the attention of the last token (``queries: last``); PyramidDrop (Xing et al., 2024) uses the
    last instruction token; SparseVLM (Zhang et al., 2024) the text "raters" relevant to the image
    (``raters``); ASAP adds the visual tokens themselves (``visual``, with the
    ``bidirectional_soft_mask`` shift). ``instruction`` is the text after the image, ``text`` every
    text token, ``all`` every token. Heads are reduced by ``heads``; query rows are averaged (``rows: max``:
    the largest over them, PruneVid's reduction with ``heads: max``). ``query_stride: s`` keeps every s-th row of the set: with ``queries: visual`` at thousands of visual
    tokens, the (H x Nv x N) block of logits dominates the operator's time, and a strided subset of the
    visual queries estimates the same column means at 1/s of the cost.

    The rows are recomputed from the previous layer's input with its own q/k projections and rotary
    embedding, only for the rows asked for, so the model keeps SDPA/FlashAttention and no
    ``output_attentions`` is needed. A shift operator earlier in the stage changes how they are
    computed. Needs ``layer >= 1``.
    """

    @dataclass
    class Params(ScorerParams):
        queries: Literal["last", "text", "instruction", "raters", "visual", "all"] = "last"  # which query rows
        heads: Literal["mean", "max", "sum"] = "mean"  # how heads are reduced
        query_stride: int = 1  # every s-th row of the query set (in sequence order): s x fewer rows to score
        rows: Literal["mean", "max"] = "mean"  # how query rows are reduced

        def __post_init__(self) -> None:
            if not isinstance(self.query_stride, int) or self.query_stride < 1:
                raise ParamError("query_stride", f"must be an integer >= 1, got {self.query_stride!r}")

    min_layer = 1

    def score(self, state: TokenState) -> torch.Tensor:
        return state.signals.attention(queries=self.params.queries, heads=self.params.heads,
                                       stride=self.params.query_stride, rows=self.params.rows)


@register_operator("elite_window")
class EliteWindow(Scorer):
    """Visual importance from an "elite" observation window of the last instruction tokens (AirCache).

    Our reading of AirCache (Huang et al., "AirCache: Activating Inter-modal Relevancy KV Cache
    Compression for Efficient Large Vision-Language Model Inference", ICCV 2025; abstract only): the
    observation window is the last ``window`` instruction tokens (the text after the image); each
    row's attention over the visual tokens (heads averaged) is one "perspective". A row's
    *consistency* is the mean cosine similarity of its visual-attention distribution with the other
    rows'; the ``elite`` share of rows (at least one) with the highest consistency form the elite
    window, and a visual token's score is its mean attention from the elite rows. Rows that look
    elsewhere than the rest (format tokens, punctuation) thus stop steering the choice.

    The attention is the site's: at a layer site the layer before it; at the ``kv_cache`` site each
    compressed layer's own.
    """

    @dataclass
    class Params(ScorerParams):
        window: int = 8  # last instruction tokens observed
        elite: float = 0.5  # share of the window kept as elite rows

        def __post_init__(self) -> None:
            if self.window < 1:
                raise ParamError("window", f"must be >= 1, got {self.window}")
            if not 0.0 < self.elite <= 1.0:
                raise ParamError("elite", f"must be in (0, 1], got {self.elite}")

    min_layer = 1

    def score(self, state: TokenState) -> torch.Tensor:
        out = torch.zeros(state.visual_mask.shape, dtype=torch.float32, device=state.visual_mask.device)
        for b in range(state.batch_size):
            rows = state.signals.query_rows("instruction", b)[-self.params.window:]
            vis = state.visual_mask[b]
            if rows.numel() == 0 or not bool(vis.any()):
                continue
            att = state.signals.attention_probs(b, rows).mean(dim=0)[:, vis.to(rows.device)]  # (Q, V)
            q = att.shape[0]
            if q > 1:
                dist = F.normalize(att / att.sum(dim=1, keepdim=True).clamp_min(1e-12), dim=1)
                sim = dist @ dist.T
                consistency = (sim.sum(dim=1) - sim.diagonal()) / (q - 1)
                n_elite = max(1, math.ceil(self.params.elite * q - 1e-9))
                elite = torch.sort(consistency, descending=True, stable=True).indices[:n_elite]
                att = att[elite]
            out[b, vis] = att.mean(dim=0).to(out.device)
        return out


@register_operator("cls_attention")
class ClsAttention(Scorer):
    """Attention the vision tower's CLS token pays each visual token's patch at vision layer ``layer``.

    The importance signal of VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary
    in Vision Language Models", CVPR 2025) and PruMerge (Shang et al., 2024): the [CLS] query's
    softmax over the patch keys, heads averaged (``mean``) or summed (``sum``). ``layer`` indexes
    the tower's encoder layers (negative from the end; -2 is the layer LLaVA takes its features
    from); a fraction f in (0, 1] names the layer at that share of the depth, the ``round(f x depth)``-th
    (0.375: the 9th of CLIP-L's 24, the 12th of a 32-layer tower), so one preset reads the same relative
    depth in every tower. Recomputed from that layer's input with its own projections, so the tower keeps SDPA.
    Works at any site (a visual token keeps its patch); needs a family whose adapter maps visual
    tokens to vision patches (LLaVA-1.5 today).

    With ``window: w > 0`` the score is local, for VScan's local scan (Zhang et al., "VScan:
    Rethinking Visual Token Reduction for Efficient Large Vision-Language Models", 2025, which
    reads fine local detail from a shallow layer's CLS attention): each token's CLS attention is
    divided by the largest in its w×w window of the sample's visual grid, so every window's best
    token scores 1 and a top-k favours one token per window before any second one.

    ``queries: all`` scores each patch by the attention it receives from every query of its image (the CLS
    token's included), averaged over them: the "global attention" HiPrune reads (Liu et al., "HiPrune:
    Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models", 2025). In a tower
    without a CLS token (SigLIP, Qwen's) both settings give this received attention.
    """

    needs_vision = True

    @property
    def needs_grid(self) -> bool:  # type: ignore[override]
        return self.params.window > 0  # a window max-pools the map on the patch grid

    @dataclass
    class Params(ScorerParams):
        layer: int | float = -2  # vision-tower encoder layer (negative: from the end; a fraction: of the depth)
        heads: Literal["mean", "sum"] = "mean"  # how heads are reduced
        window: int = 0  # 0: global; w > 0: normalise within w x w windows of the visual grid
        queries: Literal["cls", "all"] = "cls"  # all: the attention received from every query, averaged

        def __post_init__(self) -> None:
            if self.window < 0:
                raise ParamError("window", "must be >= 0 (0 = global)")
            if isinstance(self.layer, float) and not 0.0 < self.layer <= 1.0:
                raise ParamError("layer", f"a fraction of the tower's depth lies in (0, 1]; got {self.layer} (an "
                                          "integer names a layer)")

    def score(self, state: TokenState) -> torch.Tensor:
        att = state.signals.vision_cls_attention(layer=self.params.layer, heads=self.params.heads,
                                                 queries=self.params.queries)
        w = self.params.window
        if w == 0:
            return att
        out = torch.zeros_like(att)
        for b in range(state.batch_size):
            idx = torch.nonzero(state.visual_mask[b]).squeeze(1)
            if idx.numel() == 0:
                continue
            rows, cols = state.visual_grid(b)
            grid = att[b, idx].view(1, 1, rows, cols)
            peak = F.max_pool2d(grid, kernel_size=w, stride=w, ceil_mode=True)  # (1, 1, ceil(r/w), ceil(c/w))
            peak = peak.repeat_interleave(w, dim=2).repeat_interleave(w, dim=3)[..., :rows, :cols]
            out[b, idx] = (grid / peak.clamp_min(1e-30)).flatten()
        return out


@register_operator("guide_model")
class GuideModelScorer(Scorer):
    """Attention from a small guide VLM, aggregated over all its layers (SGL).

    Zhao et al., "A Stitch in Time Saves Nine: Small VLM is a Precise Guidance for Accelerating
    Large VLMs", CVPR 2025: a small VLM that tokenises the image the same way runs on the same
    inputs; the attention its ``queries`` (default: the last token) pay each token, heads reduced by
    ``heads`` and **summed over all of its layers**, ranks the large model's visual tokens. The
    guide is given at attach time: ``pipeline.attach(model, guide=small_model)``; it keeps SDPA
    (its rows are recomputed from its layers' inputs). Works at any site.
    """

    needs_guide = True

    @dataclass
    class Params(ScorerParams):
        queries: Literal["last", "text", "instruction", "raters", "visual", "all"] = "last"
        heads: Literal["mean", "max", "sum"] = "mean"

    def score(self, state: TokenState) -> torch.Tensor:
        return state.signals.guide_attention(queries=self.params.queries, heads=self.params.heads)


@register_operator("key_norm")
class KeyNorm(Scorer):
    """L2 norm of each token's key at the layer before the site, averaged over key heads.

    A FlashAttention-friendly saliency that needs no attention map (used by DART to choose its
    pivots, Wen et al. 2025, and as ViTCoP's criterion). Needs ``layer >= 1``.
    """

    min_layer = 1

    def score(self, state: TokenState) -> torch.Tensor:
        return state.signals.key_norms()


@register_operator("hidden_norm")
class HiddenNorm(Scorer):
    """L2 norm of each token's hidden state entering the site."""

    def score(self, state: TokenState) -> torch.Tensor:
        return state.hidden.float().norm(dim=-1)


@register_operator("duplication")
class Duplication(Scorer):
    """DART's duplication score: how unlike the pivot tokens a visual token is.

    Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
    Matters More" (2025): choose a few pivot tokens, then keep the tokens least similar to them.
    Here each sample's ``pivots`` visual tokens with the largest ``pivot_by`` value are the pivots;
    every visual token scores ``1 - max cosine similarity`` to the pivots (in [0, 2], on the hidden
    states entering the site) and the pivots score 3, so a top-k keeps them first.
    """

    @dataclass
    class Params(ScorerParams):
        pivots: int = 8  # pivot tokens per sample
        pivot_by: Literal["key_norm", "hidden_norm"] = "key_norm"  # how pivots are chosen

        def __post_init__(self) -> None:
            if self.pivots < 1:
                raise ParamError("pivots", "must be >= 1")

    @property
    def min_layer(self) -> int:  # type: ignore[override]
        return 1 if self.params.pivot_by == "key_norm" else 0

    def score(self, state: TokenState) -> torch.Tensor:
        if self.params.pivot_by == "key_norm":
            by = state.signals.key_norms()
        else:
            by = state.hidden.float().norm(dim=-1)
        feats = torch.nn.functional.normalize(state.hidden.float(), dim=-1)
        out = torch.zeros(state.visual_mask.shape, dtype=torch.float32, device=state.visual_mask.device)
        for b in range(state.batch_size):
            vis = torch.nonzero(state.visual_mask[b] & state.valid_mask[b]).squeeze(1)
            if vis.numel() == 0:
                continue
            k = min(self.params.pivots, vis.numel())
            piv = vis[torch.sort(by[b, vis], descending=True, stable=True).indices[:k]]
            sim = feats[b, vis] @ feats[b, piv].T  # (V, P)
            out[b, vis] = 1.0 - sim.amax(dim=1)
            out[b, piv] = 3.0
        return out


@register_operator("random")
class RandomScorer(Scorer):
    """Uniform random scores, seeded; the baseline every scorer must beat.

    Each sample draws its visual tokens' scores from its own generator seeded with ``seed``, so a
    sample gets the same scores alone or in any batch.
    """

    @dataclass
    class Params(ScorerParams):
        seed: int = 0

    def score(self, state: TokenState) -> torch.Tensor:
        scores = torch.zeros(state.visual_mask.shape, dtype=torch.float32)
        counts = state.num_visual().tolist()
        for b, n in enumerate(counts):
            gen = torch.Generator().manual_seed(self.params.seed)
            scores[b, state.visual_mask[b].cpu()] = torch.rand(int(n), generator=gen)
        return scores.to(state.visual_mask.device)


def unbalanced_sinkhorn(cost: torch.Tensor, source: torch.Tensor, target: torch.Tensor, epsilon: float,
                        rho: float | None, iterations: int) -> torch.Tensor:
    """Entropic optimal-transport plan (S, T) from ``source`` (S,) to ``target`` (T,) masses under ``cost``.

    The target marginal is met exactly; the source marginal is a soft constraint of strength
    ``rho`` (KL penalty; Chizat et al., "Scaling algorithms for unbalanced optimal transport
    problems", Math. Comp. 2018), so a source token sends more mass the cheaper it is to move:
    ``rho=None`` is the balanced problem (Sinkhorn–Knopp, Cuturi 2013: both marginals met), and
    ``rho -> 0`` spreads each target's mass over the sources by ``exp(-cost/epsilon)`` alone. The
    scaling updates run in the log domain: ``log u = f * (log a - LSE_j(log K + log v))`` with
    ``f = rho / (rho + epsilon)``, then ``log v = log b - LSE_i(log K + log u)``.

    Where ``exp(-cost / epsilon)`` stays inside float64's range (``|cost| / epsilon < 700``), the same updates
    run as matrix-vector products on ``K`` itself (``u = (a / K v)^f``, ``v = b / Kᵀ u``): one exp instead of one
    per entry and iteration. A scaling that leaves the range falls back to the log domain.
    """
    scaled = cost.double() / epsilon
    f = 1.0 if rho is None else rho / (rho + epsilon)
    if scaled.numel() and float(scaled.abs().max()) < 700:
        k = torch.exp(-scaled)
        a, b = source.double(), target.double()
        u, v = torch.ones_like(a), torch.ones_like(b)
        for _ in range(iterations):
            u = (a / (k @ v)).pow(f)
            v = b / (k.T @ u)
        plan = u[:, None] * k * v[None, :]
        if bool(torch.isfinite(plan).all()):
            return plan.to(cost.dtype)
    return _sinkhorn_log(scaled, source, target, f, iterations).to(cost.dtype)


def _sinkhorn_log(scaled: torch.Tensor, source: torch.Tensor, target: torch.Tensor, f: float,
                  iterations: int) -> torch.Tensor:
    """:func:`unbalanced_sinkhorn`'s updates in the log domain (``scaled`` = cost / epsilon, float64)."""
    log_k = -scaled
    log_a, log_b = source.double().log(), target.double().log()
    log_u = torch.zeros_like(log_a)
    log_v = torch.zeros_like(log_b)
    for _ in range(iterations):
        log_u = f * (log_a - torch.logsumexp(log_k + log_v[None, :], dim=1))
        log_v = log_b - torch.logsumexp(log_k + log_u[:, None], dim=0)
    return (log_u[:, None] + log_k + log_v[None, :]).exp()


@register_operator("temporal_change")
class TemporalChange(FeatureUser, Scorer):
    """How much a video token changed since the previous frame: ``1 - cos(x, x')``, with ``x'`` the token at the
    same cell of the previous frame of its clip — the dissimilarity of Efficient Video Sampling (Bagrov et al.,
    "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference", 2025), computed on the
    tokens entering the site (before the LLM: the merged video features EVS reads). A static patch scores near 0.

    A clip's first frame, and an image, scores 3 (above any dissimilarity, which lies in [0, 2]), so it is kept
    first, as EVS keeps the first frame whole; so does a token whose previous-frame cell an earlier stage removed
    (nothing left to compare with). With ``topk`` the budget is the sample's, shared across its frames by the
    scores (EVS's); ``budget: per_tile`` shares it per frame instead. The ``static_patches`` preset is EVS at the
    LLM's input. EVS keeps at least one frame's worth of tokens per clip; ``topk``'s ``keep`` is the whole budget.
    """

    needs_frames = True

    @dataclass
    class Params(ScorerParams):
        features: FeatureKind = "hidden"  # what is compared across frames

    def score(self, state: TokenState) -> torch.Tensor:
        if state.frames is None or state.cells is None or state.tiles is None:
            raise RuntimeError("temporal_change needs the tokens' frames (the runtime sets state.frames)")
        feats = F.normalize(state.signals.features(self.params.features).flatten(2).float(), dim=-1)
        feats = feats.to(state.visual_mask.device)
        out = torch.zeros(state.visual_mask.shape, dtype=torch.float32, device=state.visual_mask.device)
        for b in range(state.batch_size):
            vis = torch.nonzero(state.visual_mask[b] & state.valid_mask[b] & (state.tiles[b] >= 0)).squeeze(1)
            out[b, vis] = 3.0
            later = vis[state.frames[b, vis] > 0]
            if later.numel() == 0:
                continue
            prev = state.same_cell(b, 1)  # the same cell of the previous frame, where it is left
            later = later[prev[later] >= 0]
            out[b, later] = 1.0 - (feats[b, later] * feats[b, prev[later]]).sum(-1)
        return out


@register_operator("sinkhorn")
class SinkhornContribution(Scorer):
    """TopV's optimal-transport importance (Yang et al., "TopV: Compatible Token Pruning with
    Inference Time Optimization for Fast and Low-Memory Multimodal Vision Language Model", CVPR 2025).

    TopV transports *source* tokens (the visual tokens entering a layer) onto *target* tokens (the
    same layer's outputs) under a cost built from feature similarity, relative spatial distance and
    absolute distance from the image centre, solves it with Sinkhorn, and ranks each source token by
    its contribution in the plan. The paper's method section is not available to us, so this is our
    reading, stated in full (docs/methods.md):

    - source ``x_i``: the visual tokens entering the layer before the site; target ``y_j``: the same
      tokens entering the site, i.e. that layer's outputs (``features: layer_io``, needs
      ``layer >= 1``). ``features: hidden | keys | vision_keys`` transports those features onto
      themselves instead (any site);
    - cost ``C_ij = similarity * (1 - cos(x_i, y_j)) + spatial * |g_i - g_j| / diag
      + central * |g_i - c| / (diag / 2)``, with ``g`` a token's (row, col) on the sample's visual grid,
      ``c`` the grid centre and ``diag`` the grid diagonal, so each term lies in [0, 1] (the first in [0, 2]);
    - both masses uniform; the target marginal is exact and the source marginal soft
      (:func:`unbalanced_sinkhorn`, strength ``rho``; with a balanced plan every row would carry the
      same mass and rank nothing);
    - score of source ``i``: its row sum (the mass it contributes), times the number of visual
      tokens (so 1 is average). Higher is kept.

    TopV then keeps a uniform subset of the pruned tokens; the ``topv`` preset does that with
    ``union`` of ``topk`` and ``uniform_grid``.
    """

    needs_grid = True  # the spatial cost term reads each token's (row, col)

    @dataclass
    class Params(ScorerParams):
        features: Literal["layer_io", "hidden", "keys", "vision_keys"] = "layer_io"  # what is transported
        similarity: float = 1.0  # weight of (1 - cosine similarity)
        spatial: float = 1.0  # weight of the relative distance on the visual grid
        central: float = 1.0  # weight of the source token's distance from the grid centre
        epsilon: float = 0.05  # entropic regularisation
        rho: float = 0.1  # strength of the source-marginal constraint (KL)
        iterations: int = 50  # Sinkhorn scaling iterations

        def __post_init__(self) -> None:
            for name in ("similarity", "spatial", "central"):
                if getattr(self, name) < 0:
                    raise ParamError(name, f"must be >= 0, got {getattr(self, name)}")
            for name in ("epsilon", "rho"):
                if getattr(self, name) <= 0:
                    raise ParamError(name, f"must be > 0, got {getattr(self, name)}")
            if self.iterations < 1:
                raise ParamError("iterations", f"must be >= 1, got {self.iterations}")

    @property
    def min_layer(self) -> int:  # type: ignore[override]
        return 1 if self.params.features in ("layer_io", "keys") else 0

    @property
    def reads_attention_layer(self) -> bool:  # type: ignore[override]
        return self.params.features == "keys"  # layer_io reads that layer's input and output, not its attention

    @property
    def needs_vision(self) -> bool:  # type: ignore[override]
        return self.params.features == "vision_keys"

    def _pair(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        if self.params.features == "layer_io":
            return state.signals.layer_input().float().to(state.hidden.device), state.hidden.float()
        feats = state.signals.features(self.params.features)
        return feats, feats

    def score(self, state: TokenState) -> torch.Tensor:
        p = self.params
        src, tgt = self._pair(state)
        out = torch.zeros(state.visual_mask.shape, dtype=torch.float32, device=state.visual_mask.device)
        for b in range(state.batch_size):
            vis = torch.nonzero(state.visual_mask[b] & state.valid_mask[b]).squeeze(1)
            n = vis.numel()
            if n == 0:
                continue
            x = F.normalize(src[b, vis], dim=-1)
            y = F.normalize(tgt[b, vis], dim=-1)
            rows, cols = state.visual_grid(b)
            idx = torch.arange(rows * cols, device=x.device)
            g = torch.stack([idx // cols, idx % cols], dim=1).float()
            diag = max(((rows - 1) ** 2 + (cols - 1) ** 2) ** 0.5, 1.0)
            centre = torch.tensor([(rows - 1) / 2, (cols - 1) / 2], device=x.device)
            cost = p.similarity * (1 - x @ y.T) + p.spatial * torch.cdist(g, g) / diag
            cost = cost + p.central * ((g - centre).norm(dim=1) / (diag / 2))[:, None]
            mass = torch.full((n,), 1.0 / n, device=x.device)
            plan = unbalanced_sinkhorn(cost, mass, mass, p.epsilon, p.rho, p.iterations)
            out[b, vis] = plan.sum(dim=1).float() * n
        return out
