"""Selectors: which visual tokens survive, given the accumulated scores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenprune.core.attention import QUERY_SETS, query_rows
from tokenprune.core.budget import check_keep, keep_top_visual, rank_within_visual, resolve_keep
from tokenprune.core.errors import ConfigError
from tokenprune.core.operator import FeatureKind, FeatureUser, ParamError, Selector
from tokenprune.core.registry import build_operator, get_operator_class, register_operator
from tokenprune.core.state import TokenState


@register_operator("topk")
class TopK(Selector):
    """Keep the ``keep`` highest-scoring visual tokens of each sample; text tokens always stay.

    ``keep`` is a fraction of each sample's visual tokens in (0, 1] or an integer count >= 1.
    Ties go to the earlier token. ``scores: NAME`` ranks by a named score set (scorers with
    ``into: NAME``) instead of the stage's summed scores.
    """

    @dataclass
    class Params:
        keep: float | int = 0.5
        scores: str = ""  # "" = the stage's scores; else a named score set

        def __post_init__(self) -> None:
            check_keep(self.keep)

    takes_counts = True

    def expected_kept(self, num_visual: int) -> int:
        return resolve_keep(self.params.keep, num_visual)

    def ranking(self, state: TokenState) -> torch.Tensor:
        return state.score_set(self.params.scores)

    def select(self, state: TokenState) -> torch.Tensor:
        budgets = torch.tensor([self.expected_kept(int(v)) for v in state.num_visual().tolist()])
        return keep_top_visual(self.ranking(state), state.visual_mask, budgets)

    def select_counts(self, state: TokenState, counts: torch.Tensor) -> TokenState:
        state.keep_mask = keep_top_visual(self.ranking(state), state.visual_mask, counts)
        return state


@register_operator("cumulative_mass")
class CumulativeMass(Selector):
    """Keep the fewest visual tokens whose share of the score mass reaches ``threshold`` (adaptive budget).

    ZipVL (He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token
    Sparsification", 2024) sets the number of important tokens per input from the distribution of
    attention scores instead of a fixed ratio. Per sample: normalise the visual tokens' scores to
    sum 1, sort them, and keep the shortest prefix whose mass is >= ``threshold``; then clip to
    [``min_keep``, ``max_keep``]. Scores must be non-negative (attention is); a sample whose
    visual scores are all zero keeps all its visual tokens. The budget differs per sample, so a
    batch keeps equal counts only by chance (see docs/methods.md).
    """

    @dataclass
    class Params:
        threshold: float = 0.9  # score mass to reach, in (0, 1]
        min_keep: int = 1  # never fewer visual tokens than this
        max_keep: float | int | None = None  # never more (a fraction or a count); null: no cap

        def __post_init__(self) -> None:
            if not 0.0 < self.threshold <= 1.0:
                raise ParamError("threshold", "must lie in (0, 1]")
            if self.min_keep < 0:
                raise ParamError("min_keep", "must be >= 0")
            if self.max_keep is not None:
                check_keep(self.max_keep, "max_keep")

    def select(self, state: TokenState) -> torch.Tensor:
        visual = state.visual_mask & state.valid_mask
        scores = state.scores.masked_fill(~visual, 0.0)
        if bool((scores < 0).any()):
            raise ValueError(f"cumulative_mass needs non-negative scores; got a minimum of {float(scores.min()):.4g} "
                             "(combine scorers with non-negative weights)")
        rank = rank_within_visual(state.scores, visual)
        keep = ~state.visual_mask
        for b in range(state.batch_size):
            v = int(visual[b].sum())
            total = float(scores[b].sum())
            if total <= 0:
                k = v
            else:
                sorted_mass = torch.sort(scores[b][visual[b]] / total, descending=True, stable=True).values
                reached = torch.cumsum(sorted_mass, 0) >= self.params.threshold - 1e-6
                k = int(torch.nonzero(reached)[0]) + 1 if bool(reached.any()) else v
            k = max(k, min(self.params.min_keep, v))
            if self.params.max_keep is not None:
                k = min(k, resolve_keep(self.params.max_keep, v))
            keep[b] |= visual[b] & (rank[b] < k)
        return keep


@register_operator("uniform_grid")
class UniformGrid(Selector):
    """Keep every ``stride``-th row and column of the 2-D patch grid (no scores needed).

    Uniform spatial sampling, as FEATHER's early stage uses to keep the whole image covered (Endo
    et al., ICCV 2025). Visual tokens are taken in raster order on the grid the model's adapter
    reports (a square when it reports none); tokens at rows and columns ``offset, offset+stride,
    ...`` stay. On a 24×24 grid, stride 2 keeps 144 tokens, stride 3 keeps 64.
    """

    needs_scores = False
    needs_grid = True

    @dataclass
    class Params:
        stride: int = 2  # keep one row and one column out of every `stride`
        offset: int = 0  # first kept row/column, in [0, stride)

        def __post_init__(self) -> None:
            if self.stride < 1:
                raise ParamError("stride", "must be >= 1")
            if not 0 <= self.offset < self.stride:
                raise ParamError("offset", f"must lie in [0, stride) = [0, {self.stride})")

    def _count(self, rows: int, cols: int) -> int:
        s, o = self.params.stride, self.params.offset
        return len(range(o, rows, s)) * len(range(o, cols, s))

    def expected_kept(self, num_visual: int) -> int:
        side = int(round(num_visual ** 0.5))
        if side * side != num_visual:
            raise NotImplementedError(f"uniform_grid needs the grid shape for {num_visual} visual tokens (not a square)")
        return self._count(side, side)

    def expected_kept_in_grid(self, rows: int, cols: int) -> int:
        """Cells kept of a rows x cols grid (a tile of a ``budget: per_tile`` stage)."""
        return self._count(rows, cols)

    def grid_mask(self, rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
        """(rows*cols,) bool: the kept grid cells in raster order."""
        s, o = self.params.stride, self.params.offset
        r = torch.arange(rows, device=device)
        c = torch.arange(cols, device=device)
        on_rows = ((r - o) % s == 0) & (r >= o)
        on_cols = ((c - o) % s == 0) & (c >= o)
        return (on_rows[:, None] & on_cols[None, :]).reshape(-1)

    def select(self, state: TokenState) -> torch.Tensor:
        keep = ~state.visual_mask
        for b in range(state.batch_size):
            rows, cols = state.visual_grid(b)
            idx = torch.nonzero(state.visual_mask[b]).squeeze(1)
            keep[b, idx[self.grid_mask(rows, cols, idx.device)]] = True
        return keep


@register_operator("union")
class Union(Selector):
    """Keep a token if any of several selectors keeps it (FEATHER: attention top-k ∪ uniform grid).

    ``of`` lists the selectors as operators (``[{op: topk, keep: 0.2}, {op: uniform_grid,
    stride: 3}]``); each sees the stage's scores. The kept count is at most the sum of theirs.
    """

    @dataclass
    class Params:
        of: list[Any] = field(default_factory=list)  # the selectors, each {op: NAME, ...params}

    def __init__(self, params: Any = None, key: str | None = None):
        super().__init__(params, key)
        self.selectors = nn.ModuleList(
            build_operator(spec["op"], **{k: v for k, v in spec.items() if k != "op"}) for spec in self.params.of)

    @classmethod
    def parse_params(cls, raw, key=None):
        params = super().parse_params(raw, key)
        where = f"{key}.of" if key else "of"
        if len(params.of) < 2:
            raise ConfigError(where, f"union needs at least two selectors, got {len(params.of)}")
        for i, spec in enumerate(params.of):
            if not isinstance(spec, dict) or "op" not in spec:
                raise ConfigError(f"{where}.{i}", f"a selector is a mapping with an 'op' key, got {spec!r}")
            child = get_operator_class(spec["op"], key=f"{where}.{i}.op")
            if child.kind != "selector":
                raise ConfigError(f"{where}.{i}.op", f"{spec['op']!r} is a {child.kind}; union takes selectors")
            child.parse_params({k: v for k, v in spec.items() if k != "op"}, key=f"{where}.{i}")
        return params

    @property
    def needs_scores(self) -> bool:  # type: ignore[override]
        return any(getattr(s, "needs_scores", True) for s in self.selectors)

    @property
    def needs_grid(self) -> bool:  # type: ignore[override]
        return any(s.needs_grid for s in self.selectors)

    @property
    def needs_vision(self) -> bool:  # type: ignore[override]
        return any(s.needs_vision for s in self.selectors)

    @property
    def min_layer(self) -> int:  # type: ignore[override]
        return max((s.min_layer for s in self.selectors), default=0)

    def expected_kept(self, num_visual: int) -> int:
        raise NotImplementedError("union's budget depends on the overlap of its selectors")

    def select(self, state: TokenState) -> torch.Tensor:
        keep = torch.zeros(state.visual_mask.shape, dtype=torch.bool, device=state.visual_mask.device)
        for sel in self.selectors:
            keep |= sel.select(state)
        return keep


@register_operator("per_head_union")
class PerHeadUnion(Selector):
    """Each attention head keeps its own top ``keep`` visual tokens; the stage keeps their union.

    Trimmed Llama (Lee et al., "Efficient LLaMA-3.2-Vision by Trimming Cross-attended Visual
    Features", CVPR 2025 ELVM workshop, arXiv:2504.00557): in the first cross-attention layer,
    every head ranks the image features by the attention the text queries give them (averaged over
    the query set), keeps its top-k, and the union over heads is what every later layer sees. The
    union's size adapts to how much the heads agree (the paper reports 40-50% of the features kept
    on its benchmarks), so samples of a batch keep different counts. ``keep`` is per head: a
    fraction of each sample's visual tokens or a count. Reads the attention signal itself, so the
    stage needs no scorer; on a decoder-layer site it uses self-attention from ``queries`` as well.
    """

    needs_scores = False

    @dataclass
    class Params:
        keep: float | int = 0.1  # per head: fraction of the visual tokens, or a count
        queries: str = "text"  # query set whose attention ranks the tokens (see the attention scorer)

        def __post_init__(self) -> None:
            check_keep(self.keep)
            if self.queries not in QUERY_SETS:
                raise ParamError("queries", f"got {self.queries!r}; allowed: {', '.join(QUERY_SETS)}")

    min_layer = 1

    def expected_kept(self, num_visual: int) -> int:
        raise NotImplementedError("per_head_union's budget depends on how much the heads agree")

    def select(self, state: TokenState) -> torch.Tensor:
        heads = state.signals.attention_heads(self.params.queries)  # (B, H, N)
        visual = state.visual_mask
        keep = ~visual
        for b in range(state.batch_size):
            v = int(visual[b].sum())
            k = resolve_keep(self.params.keep, v)
            if k == 0:
                continue
            idx = torch.nonzero(visual[b]).squeeze(1)
            scores = heads[b][:, idx]  # (H, V)
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # ties to the earlier
            keep[b, idx[order.flatten().unique()]] = True
        return keep


@register_operator("iqr_outliers")
class IqrOutliers(Selector):
    """Keep the visual tokens whose score is a high outlier: above Q3 + ``factor`` × IQR (adaptive budget).

    PruMerge's adaptive selection (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for
    Efficient Large Multimodal Models", 2024), on the CLS attention: Q1 and Q3 are the quartiles
    of a sample's visual scores (linear interpolation, as ``torch.quantile``), and only the
    tokens above the upper fence stay, at least ``min_keep``.
    """

    @dataclass
    class Params:
        factor: float = 1.5  # fence = Q3 + factor * (Q3 - Q1)
        min_keep: int = 1  # never fewer visual tokens (the highest-scoring ones)

        def __post_init__(self) -> None:
            if self.factor < 0:
                raise ParamError("factor", "must be >= 0")
            if self.min_keep < 0:
                raise ParamError("min_keep", "must be >= 0")

    def expected_kept(self, num_visual: int) -> int:
        raise NotImplementedError("iqr_outliers keeps as many tokens as the score distribution has outliers")

    def select(self, state: TokenState) -> torch.Tensor:
        visual = state.visual_mask & state.valid_mask
        keep = ~state.visual_mask
        rank = rank_within_visual(state.scores, visual)
        for b in range(state.batch_size):
            v = int(visual[b].sum())
            if v == 0:
                continue
            s = state.scores[b][visual[b]].float()
            q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], device=s.device))
            fence = q3 + self.params.factor * (q3 - q1)
            keep[b] |= visual[b] & ((state.scores[b].float() > fence) | (rank[b] < min(self.params.min_keep, v)))
        return keep


@register_operator("max_min_diversity")
class MaxMinDiversity(FeatureUser, Selector):
    """Keep the most diverse visual tokens: greedy max–min cosine distance (no scores needed).

    DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
    Models", CVPR 2025) casts pruning as the max–min diversity problem on the visual features and
    solves it greedily: with cosine distance d = 1 − cos, the first token is the one farthest from
    its nearest other token, and each next one maximises its distance to the nearest token already
    chosen, until ``keep`` are chosen. Ties go to the earlier token. ``features``: ``hidden`` (the
    tokens entering the site; DivPrune's choice at layer 0), ``keys`` or ``vision_keys``.
    """

    needs_scores = False

    @dataclass
    class Params:
        keep: float | int = 0.1
        features: FeatureKind = "hidden"
        vision_layer: int = -2  # for features: vision_keys

        def __post_init__(self) -> None:
            check_keep(self.keep)

    def expected_kept(self, num_visual: int) -> int:
        return resolve_keep(self.params.keep, num_visual)

    def select(self, state: TokenState) -> torch.Tensor:
        feats = F.normalize(state.signals.features(self.params.features, self.params.vision_layer), dim=-1)
        visual = state.visual_mask & state.valid_mask
        keep = ~state.visual_mask
        for b in range(state.batch_size):
            idx = torch.nonzero(visual[b]).squeeze(1)
            k = self.expected_kept(idx.numel())
            if k == 0:
                continue
            f = feats[b, idx]
            chosen = max_min_greedy(torch.mm(f, f.T).neg_().add_(1.0), k, owned=True)  # cosine distances
            keep[b, idx[chosen]] = True
        return keep


def max_min_greedy(dist: torch.Tensor, k: int, owned: bool = False) -> torch.Tensor:
    """Indices of ``k`` points chosen greedily for max–min diversity from a (P, P) distance matrix (``owned``: the
    caller hands the matrix over, so its diagonal may be overwritten in place)."""
    p = dist.shape[0]
    if p == 1:
        return torch.zeros(1, dtype=torch.long, device=dist.device)
    off = dist if owned else dist.clone()
    off.diagonal().fill_(float("inf"))  # a point's own distance is not its nearest neighbour's
    chosen = [int(off.amin(1).argmax())]  # argmax returns the first of ties
    # distance of every point to its nearest chosen one (the chosen ones are set aside below, so the diagonal's
    # inf in place of 0 changes nothing)
    nearest = off[chosen[0]].clone()
    for _ in range(k - 1):
        nearest[chosen] = float("-inf")
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        nearest = torch.minimum(nearest, off[nxt])
    return torch.tensor(sorted(chosen), dtype=torch.long, device=dist.device)


@register_operator("temporal_windows")
class TemporalWindows(FeatureUser, Selector):
    """DyCoke's token temporal merging (Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large
    Language Models", CVPR 2025), as its public code does it: a clip's frames go in windows of four; the first
    frame of a window stays whole, and each other frame keeps only its ``keep`` share of cells (``int(keep x
    cells)``) least similar (cosine of ``features``) to the same cell of a reference frame — frame 2 of the window
    against frame 1, frame 3 against frame 1, frame 4 against frame 3. What is dropped is taken as represented by
    the reference frame's token (the code drops; nothing is averaged). Images and a clip's first frame stay whole.

    Deviations from the public code: the last window's third frame is compared too (the code's loop bound skips
    it), and a clip with an odd number of frames keeps its last one under the same rule (the code drops it whole).
    A cell whose reference an earlier stage removed counts as least similar. The kept count depends on the frames,
    so FLOPs need measured counts.
    """

    needs_scores = False
    needs_frames = True

    @dataclass
    class Params:
        keep: float = 0.7  # share of a compared frame's cells kept (DyCoke: 1 - its merging ratio k, 0.3 by default)
        features: FeatureKind = "hidden"  # what the similarity compares

        def __post_init__(self) -> None:
            if not 0.0 <= self.keep <= 1.0:
                raise ParamError("keep", f"must lie in [0, 1], got {self.keep}")

    #: a frame's reference, by its position in the window of four (0: none, kept whole)
    REFERENCE = {1: 1, 2: 2, 3: 1}

    def select(self, state: TokenState) -> torch.Tensor:
        if state.frames is None or state.cells is None or state.tiles is None or state.tile_grids is None:
            raise RuntimeError("temporal_windows needs the tokens' frames (the runtime sets state.frames)")
        feats = F.normalize(state.signals.features(self.params.features).float(), dim=-1).to(state.visual_mask.device)
        keep = ~state.visual_mask.clone()
        for b in range(state.batch_size):
            vis = torch.nonzero(state.visual_mask[b] & state.valid_mask[b]).squeeze(1)
            refs = {back: state.same_cell(b, back) for back in set(self.REFERENCE.values())}
            for tile in state.tiles[b, vis].unique().tolist():
                mine = vis[state.tiles[b, vis] == tile]
                frame = int(state.frames[b, mine[0]]) if mine.numel() else -1
                back = self.REFERENCE.get(frame % 4, 0) if frame > 0 else 0
                if back == 0:
                    keep[b, mine] = True
                    continue
                rows, cols = state.tile_grids[b][tile]
                count = int(self.params.keep * rows * cols)
                ref = refs[back][mine]  # the reference frame's token at each cell, -1: gone
                sim = torch.full((mine.numel(),), float("-inf"), device=keep.device)
                sim[ref >= 0] = (feats[b, mine[ref >= 0]] * feats[b, ref[ref >= 0]]).sum(-1)
                order = torch.sort(sim, stable=True).indices  # least similar first
                keep[b, mine[order[:count]]] = True
        return keep


@register_operator("dpp")
class ConditionalDPP(FeatureUser, Selector):
    """CDPruner's selection (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
    Pruning in MLLMs", NeurIPS 2025): the ``keep`` visual tokens of a determinantal point process's greedy MAP
    (Chen et al., "Fast Greedy MAP Inference for Determinantal Point Process to Improve Recommendation Diversity",
    NeurIPS 2018) over the conditional kernel ``L = diag(r) S diag(r)``: ``S`` the cosine similarities of the visual
    tokens' ``features``, ``r`` each token's relevance to the instruction. Greedy MAP adds, one at a time, the token
    whose conditional variance given those chosen is largest (a Cholesky row per pick), so a near-duplicate of a
    chosen token is not chosen while a distinct one is left.

    Relevance, as the public code computes it: the mean over the instruction tokens (the text after the image) of
    the cosine between a visual token and an instruction token, negated (``relevance: dissimilar``, the code's
    choice; ``similar`` keeps the sign), then min-max normalised over the sample's visual tokens to (0, 1]. The code
    compares CLIP's image and text embeddings (its text encoder reads the instruction); tokenprune has no text
    encoder beside the LLM, so here the two sides are the hidden states entering the site (before the LLM: the
    projected visual tokens and the instruction's word embeddings). ``condition: none`` is the plain DPP on ``S``.
    """

    needs_scores = False

    @dataclass
    class Params:
        keep: float | int = 0.111  # visual tokens kept: a fraction or a count (the paper's 64 of 576)
        features: FeatureKind = "hidden"  # what the similarity kernel compares
        condition: str = "instruction"  # "instruction": CDPruner's relevance; "none": a plain DPP
        relevance: str = "dissimilar"  # the public code's negated cosine, or "similar"

        def __post_init__(self) -> None:
            check_keep(self.keep)
            if self.condition not in ("instruction", "none"):
                raise ParamError("condition", f"got {self.condition!r}; allowed: instruction, none")
            if self.relevance not in ("dissimilar", "similar"):
                raise ParamError("relevance", f"got {self.relevance!r}; allowed: dissimilar, similar")

    def expected_kept(self, num_visual: int) -> int:
        return resolve_keep(self.params.keep, num_visual)

    def relevance(self, state: TokenState, b: int, vis: torch.Tensor) -> torch.Tensor:
        """(V,) relevance of sample ``b``'s visual tokens ``vis`` to its instruction, in (0, 1]."""
        if self.params.condition == "none":
            return torch.ones(vis.numel(), device=vis.device)
        text = query_rows("instruction", state.visual_mask[b], state.valid_mask[b])
        if text.numel() == 0:
            return torch.ones(vis.numel(), device=vis.device)
        h = F.normalize(state.hidden[b].float(), dim=-1)
        rel = (h[vis] @ h[text].T).mean(1)
        if self.params.relevance == "dissimilar":
            rel = -rel
        span = rel.max() - rel.min()
        return (rel - rel.min() + 1e-6) / span if float(span) > 0 else torch.ones_like(rel)

    def select(self, state: TokenState) -> torch.Tensor:
        feats = F.normalize(state.signals.features(self.params.features).float(), dim=-1).to(state.visual_mask.device)
        keep = ~state.visual_mask.clone()
        for b in range(state.batch_size):
            vis = torch.nonzero(state.visual_mask[b] & state.valid_mask[b]).squeeze(1)
            k = min(resolve_keep(self.params.keep, vis.numel()), vis.numel())
            if k == 0:
                continue
            r = self.relevance(state, b, vis)
            kernel = r[:, None] * (feats[b, vis] @ feats[b, vis].T) * r[None, :]
            keep[b, vis[greedy_map(kernel, k)]] = True
        return keep


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) indices a DPP with kernel ``kernel`` (V, V) picks by greedy MAP inference (Chen et al. 2018): each step the
    item with the largest remaining conditional variance ``d_i²`` (ties: the first), whose new Cholesky row ``e``
    updates the others' ``d² -= e²``; an item whose variance is exhausted (a duplicate) is taken only when nothing
    else is left. Once the kernel's rank is reached (more picks than its feature width: every variance left is
    rounding noise) the picks go on without Cholesky rows, each item still at most once — dividing by that noise
    would turn the variances into NaN and pick items twice."""
    v = kernel.shape[0]
    rows = torch.zeros(k, v, dtype=kernel.dtype, device=kernel.device)
    d2 = torch.diagonal(kernel).clone()
    floor = 1e-9 * float(d2.abs().max()) if v else 0.0
    picked = torch.empty(k, dtype=torch.long, device=kernel.device)
    for i in range(k):
        j = int(torch.argmax(d2))
        picked[i] = j
        if float(d2[j]) > floor:
            e = (kernel[j] - rows[:i, j] @ rows[:i]) / torch.sqrt(d2[j])
            rows[i] = e
            d2 = d2 - e * e
        d2[picked[:i + 1]] = float("-inf")
    return picked


@register_operator("important_diverse")
class ImportantDiverse(FeatureUser, Selector):
    """VisPruner's selection (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
    Pruning in VLMs", ICCV 2025), as its public code does it: of the ``keep`` tokens, the ``important`` share are the
    highest-scoring (the stage's scorer: the vision tower's [CLS] attention in the ``vispruner`` preset); the rest are
    diverse ones, left by removing duplicates from the other tokens in rounds: the remaining tokens, in score order,
    split alternately into A and B; each A token's largest cosine similarity (of ``features``) to a B token; the ``step``
    A tokens with the largest drop out; the kept A tokens (most similar first) then the B tokens are the next round's
    order — until as many remain as the budget leaves.

    Deviations: the code compares the vision tower's output features (before the projector); ``features: hidden``
    compares the tokens entering the site (before the LLM: after the projector), ``vision_keys`` the tower's keys. A
    round drops at most all of A (the code's indexing fails when ``step`` exceeds it, which its budgets never reach).
    """

    @dataclass
    class Params:
        keep: float | int = 0.111  # visual tokens kept: a fraction or a count
        important: float = 0.5  # share of them chosen by score (the code's important_ratio)
        step: int = 8  # A tokens dropped per round
        features: FeatureKind = "hidden"  # what the duplicate test compares

        def __post_init__(self) -> None:
            check_keep(self.keep)
            if not 0.0 <= self.important <= 1.0:
                raise ParamError("important", f"must lie in [0, 1], got {self.important}")
            if self.step < 1:
                raise ParamError("step", f"must be >= 1, got {self.step}")

    def expected_kept(self, num_visual: int) -> int:
        return resolve_keep(self.params.keep, num_visual)

    def select(self, state: TokenState) -> torch.Tensor:
        scores = state.score_set()
        feats = F.normalize(state.signals.features(self.params.features).float(), dim=-1).to(state.visual_mask.device)
        keep = ~state.visual_mask.clone()
        for b in range(state.batch_size):
            vis = torch.nonzero(state.visual_mask[b] & state.valid_mask[b]).squeeze(1)
            total = min(resolve_keep(self.params.keep, vis.numel()), vis.numel())
            order = vis[torch.argsort(scores[b, vis].float().to(vis.device), descending=True, stable=True)]
            n_imp = int(total * self.params.important)
            diverse = total - n_imp
            rest = order[n_imp:]
            while diverse > 0 and rest.numel() > diverse:
                a, bset = rest[0::2], rest[1::2]
                r = min(self.params.step, rest.numel() - diverse, a.numel())
                sim = (feats[b, a] @ feats[b, bset].T).max(dim=1).values if bset.numel() else \
                    torch.zeros(a.numel(), device=a.device)
                stay = a[torch.argsort(sim, descending=True, stable=True)[r:]]
                rest = torch.cat([stay, bset])
            keep[b, order[:n_imp]] = True
            if diverse > 0:
                keep[b, rest] = True
        return keep


@register_operator("anchor_buffer")
class AnchorBuffer(Selector):
    """HiPrune's selection (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
    Vision-Language Models", 2025): of the ``keep`` tokens, ``round(keep x alpha / 5)`` *anchors* score highest on
    the ``anchors`` score set (the attention patches receive in a middle, object-centric vision layer); their
    *buffers* are the grid cells next to them (above, below, left, right); the rest of the budget goes to the
    *registers*, the highest on the stage's scores (the attention received in a deep layer) among the tokens not
    chosen yet. With every anchor's four buffers distinct, anchors and buffers fill ``alpha`` of the budget.

    Deviations: the public code takes the neighbours at raster index ±1 and ±width, so a row's first patch has the
    previous row's last as its left neighbour; here buffers are grid neighbours only (none across the image's edge).
    When anchors and buffers alone exceed the budget (a tiny budget with a large ``alpha``), the anchors in rank
    order, then buffers in their anchors' rank order, fill it (the code would fail there).
    """

    needs_grid = True

    @dataclass
    class Params:
        keep: float | int = 0.111  # visual tokens kept: a fraction or a count
        alpha: float = 0.1  # share of the budget for anchors and their buffers (anchors = keep * alpha / 5)
        anchors: str = "anchors"  # the score set that ranks the anchors (a scorer's ``into``)

        def __post_init__(self) -> None:
            check_keep(self.keep)
            if not 0.0 <= self.alpha <= 1.0:
                raise ParamError("alpha", f"must lie in [0, 1], got {self.alpha}")
            if not self.anchors:
                raise ParamError("anchors", "names the score set of the anchor layer (a scorer's into:)")

    def expected_kept(self, num_visual: int) -> int:
        return resolve_keep(self.params.keep, num_visual)

    def select(self, state: TokenState) -> torch.Tensor:
        deep = state.score_set()
        shallow = state.score_set(self.params.anchors)
        keep = ~state.visual_mask.clone()
        for b in range(state.batch_size):
            vis = torch.nonzero(state.visual_mask[b]).squeeze(1)
            if vis.numel() == 0:
                continue
            rows, cols = state.visual_grid(b)
            total = resolve_keep(self.params.keep, vis.numel())
            n_anchor = min(total, math.floor(total * self.params.alpha / 5 + 0.5))
            ranked = torch.argsort(shallow[b, vis].float(), descending=True, stable=True)[:n_anchor].tolist()
            chosen = list(ranked)
            for cell in ranked:
                r, c = divmod(cell, cols)
                chosen += [y * cols + x for y, x in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
                           if 0 <= y < rows and 0 <= x < cols]
            chosen = list(dict.fromkeys(chosen))[:total]  # anchors first, then buffers, each once
            taken = torch.zeros(vis.numel(), dtype=torch.bool, device=vis.device)
            taken[torch.tensor(chosen, dtype=torch.long, device=vis.device)] = True
            rest = torch.nonzero(~taken).squeeze(1)
            order = rest[torch.argsort(deep[b, vis[rest]].float(), descending=True, stable=True)]
            taken[order[: total - len(chosen)]] = True
            keep[b, vis[taken]] = True
        return keep


@register_operator("dual_attention")
class DualAttention(Selector):
    """MustDrop's text-guided dual-attention filter (Liu et al., "Multi-Stage Vision Token Dropping: Towards
    Efficient Multimodal Large Language Model", 2024), as its public code does it: the attention the instruction's
    tokens (the text after the image) pay the visual tokens at the layer before the site, heads averaged; a visual
    token is dropped when both its *global* attention (summed over the instruction's tokens) is under ``global_share``
    of the sum over all visual tokens and its *individual* attention (the largest from any one instruction token) is
    under ``individual``. The adaptive budget follows the thresholds (the code's 64-token setting on LLaVA-1.5:
    0.011 and 0.01).

    MustDrop's *key set* — the visual tokens the vision tower's CLS token attends to most — is never dropped: the
    ``key`` share of the stage's visual tokens highest on the ``key_scores`` set (a ``cls_attention`` scorer writing
    ``into: key``; ``key: 0`` for none). Deviation: the code fixes the key set once (8% of the tokens leaving the
    tower) and protects it at every stage; here each stage protects the top ``key`` share of the tokens it sees, a
    subset of the first stage's once tokens are gone.
    """

    needs_scores = False
    min_layer = 1

    @dataclass
    class Params:
        global_share: float = 0.011  # a token is dropped if its summed attention < this share of the total ...
        individual: float = 0.01  # ... and its largest single attention < this
        key: float = 0.08  # share of the stage's visual tokens protected by the key_scores set
        key_scores: str = "key"  # the score set ranking the key tokens (a scorer's ``into``)

        def __post_init__(self) -> None:
            if not 0.0 <= self.global_share <= 1.0:
                raise ParamError("global_share", f"must lie in [0, 1], got {self.global_share}")
            if not 0.0 <= self.individual <= 1.0:
                raise ParamError("individual", f"must lie in [0, 1], got {self.individual}")
            if not 0.0 <= self.key <= 1.0:
                raise ParamError("key", f"must lie in [0, 1], got {self.key}")

    def select(self, state: TokenState) -> torch.Tensor:
        keep = ~state.visual_mask.clone()
        key_scores = state.score_set(self.params.key_scores) if self.params.key > 0 else None
        for b in range(state.batch_size):
            vis = torch.nonzero(state.visual_mask[b]).squeeze(1)
            if vis.numel() == 0:
                continue
            rows = state.signals.query_rows("instruction", b)
            if rows.numel() == 0:  # no instruction to guide the filter: nothing is dropped
                keep[b, vis] = True
                continue
            att = state.signals.attention_probs(b, rows).mean(dim=0)[:, vis.to(rows.device)].float()  # (Q, V)
            total = att.sum(dim=0)
            drop = (total < total.sum() * self.params.global_share) & (att.max(dim=0).values < self.params.individual)
            stay = ~drop.to(vis.device)
            if key_scores is not None:
                n_key = math.ceil(self.params.key * vis.numel() - 1e-9)
                top = torch.argsort(key_scores[b, vis].float(), descending=True, stable=True)[:n_key]
                stay[top.to(vis.device)] = True
            keep[b, vis[stay]] = True
        return keep
