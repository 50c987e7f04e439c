"""Mergers: fold what a stage drops into what it keeps, instead of throwing it away."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tokenprune.core.budget import check_keep, resolve_keep
from tokenprune.core.operator import FeatureKind, FeatureUser, Merger, ParamError
from tokenprune.core.registry import register_operator
from tokenprune.core.state import TokenState


@register_operator("drop")
class Drop(Merger):
    """Drop the tokens the selector did not keep, unchanged (what a stage does without a merger)."""

    def forward(self, state: TokenState) -> TokenState:
        return state


@register_operator("weighted_soft_merge")
class WeightedSoftMerge(Merger):
    """ASAP's weighted soft merging: each pruned token is spread over its most similar kept tokens.

    Our reading of ASAP's abstract (docs/methods/asap.md). For each pruned visual token j, its
    ``neighbors`` most similar kept visual tokens (cosine similarity of the hidden states entering
    the site; 0 = all kept visual tokens) get weights ``w_ji = softmax_i(cos(h_j, h_i) / temperature)``.
    With masses ``m = max(score, 0)`` (all 1 if a sample's scores are all 0), kept token i becomes
    the score-weighted average

        h_i ← (m_i h_i + Σ_j m_j w_ji h_j) / (m_i + Σ_j m_j w_ji)

    and its size grows by ``Σ_j w_ji size_j``, so sizes still add up to the original token count.
    Text tokens are never merged into. ``proportional_attention`` adds ``log(size)`` to the
    attention logits of each key in the layers after the site (ToMe's correction for a token that
    stands for several).
    """

    @dataclass
    class Params:
        temperature: float = 0.1  # softmax temperature over cosine similarities
        neighbors: int = 4  # kept tokens each pruned token is spread over (0: all kept visual tokens)
        proportional_attention: bool = False

        def __post_init__(self) -> None:
            if not self.temperature > 0:
                raise ParamError("temperature", "must be > 0")
            if self.neighbors < 0:
                raise ParamError("neighbors", "must be >= 0 (0 = all kept visual tokens)")

    def forward(self, state: TokenState) -> TokenState:
        if state.keep_mask is None:
            raise RuntimeError("weighted_soft_merge needs a selector before it")
        hidden = state.hidden.clone()
        sizes = state.sizes.clone().float()
        scores = state.scores if state.scores is not None else torch.ones(state.visual_mask.shape)
        for b in range(state.batch_size):
            vis = state.visual_mask[b] & state.valid_mask[b]
            kept, pruned = kept_and_pruned(state, b)
            if kept.numel() == 0 or pruned.numel() == 0:
                continue
            mass = scores[b].float().clamp_min(0).to(hidden.device)
            if float(mass[vis].sum()) <= 0:
                mass = torch.ones_like(mass)
            hk, hp = hidden[b, kept].float(), hidden[b, pruned].float()
            sim = F.normalize(hp, dim=-1) @ F.normalize(hk, dim=-1).T  # (P, K)
            n = self.params.neighbors
            if 0 < n < kept.numel():  # each pruned token reaches n kept tokens: (P, n) weights, scattered sums
                near, idx = sim.topk(n, dim=1)  # most similar first
                w = torch.softmax(near / self.params.temperature, dim=1)  # (P, n)
                state.merge_record(b)[pruned] = kept[idx[:, 0]]  # the token that takes most of it
                contrib = mass[pruned][:, None] * w  # (P, n)
                flat = idx.reshape(-1)
                num = _add_spread(mass[kept][:, None] * hk, idx, contrib, hp)
                den = mass[kept].clone().index_add_(0, flat, contrib.reshape(-1))
                grown = (w * sizes[b, pruned].to(w.device)[:, None]).reshape(-1)
                size_k = sizes[b, kept].clone().index_add_(0, flat.to(sizes.device), grown.to(sizes.dtype))
            else:
                w = torch.softmax(sim / self.params.temperature, dim=1)  # (P, K)
                state.merge_record(b)[pruned] = kept[w.argmax(dim=1)]  # the token that takes most of it
                contrib = mass[pruned][:, None] * w  # (P, K)
                num = mass[kept][:, None] * hk + contrib.T @ hp
                den = mass[kept] + contrib.sum(0)
                size_k = sizes[b, kept] + w.T.to(sizes.dtype) @ sizes[b, pruned]
            merged = torch.where(den[:, None] > 0, num / den.clamp_min(1e-30)[:, None], hk)
            hidden[b, kept] = merged.to(hidden.dtype)
            sizes[b, kept] = size_k
        state.hidden, state.sizes = hidden, sizes
        state.proportional_attention = state.proportional_attention or self.params.proportional_attention
        return state


def kept_and_pruned(state: TokenState, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real visual tokens of ``sample`` the selector kept, and those it dropped (indices, in order)."""
    vis = state.visual_mask[sample] & state.valid_mask[sample]
    return (torch.nonzero(vis & state.keep_mask[sample]).squeeze(1),
            torch.nonzero(vis & ~state.keep_mask[sample]).squeeze(1))


def _add_spread(out: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                sparse: bool | None = None) -> torch.Tensor:
    """``out[idx[j, r]] += weight[j, r] * rows[j]`` for every j and r: ``out`` (K, D) plus Wᵀ ``rows`` with the
    sparse (P, K) weights W holding ``weight`` (P, n) at columns ``idx`` (P, n).

    One sparse-dense product (P·n·D multiply-adds, no (P, n, D) intermediate) where torch has it; on other
    devices (or with ``sparse=False``) one index_add per neighbour rank."""
    p, n = idx.shape
    if out.device.type in ("cpu", "cuda") if sparse is None else sparse:
        source = torch.arange(p, device=idx.device).repeat_interleave(n)
        w = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), source]), weight.reshape(-1).to(rows.dtype),
                                    (out.shape[0], p), check_invariants=False)  # indices in range by construction
        return torch.addmm(out, w, rows)
    for r in range(n):
        out.index_add_(0, idx[:, r], rows * weight[:, r:r + 1])
    return out


@register_operator("nearest_position_merge")
class NearestPositionMerge(Merger):
    """Elastic Cache's merge: each dropped visual token folds into the kept visual token nearest to it in the
    input sequence (the earlier one on a tie), and a kept token becomes the size-weighted mean of itself and the
    tokens folded into it (:func:`merge_into`; with every size 1, as in a ``kv_cache`` stage of its own, the plain
    mean the authors' code takes).

    Liu et al., "Efficient Inference of Vision Instruction-Following Models with Elastic Cache", ECCV 2024, as
    the authors' public code merges each layer's cache (its anchors are the entries with the highest
    attention received; the distance is in sequence positions, not in features). Sizes add up, so
    ``proportional_attention`` can weigh a merged entry by how many it stands for; no feature similarity is
    computed (a search among the kept positions per dropped token).
    """

    @dataclass
    class Params:
        proportional_attention: bool = False

    def forward(self, state: TokenState) -> TokenState:
        if state.keep_mask is None:
            raise RuntimeError("nearest_position_merge needs a selector before it")
        hidden, sizes = state.hidden.clone(), state.sizes.clone().float()
        for b in range(state.batch_size):
            kept, pruned = kept_and_pruned(state, b)
            if kept.numel() == 0 or pruned.numel() == 0:
                continue
            assign = nearest_by_position(state.source_index[b, kept], state.source_index[b, pruned])
            merge_into(hidden[b], sizes[b], kept, pruned, assign, state.merge_record(b))
        state.hidden, state.sizes = hidden, sizes
        state.proportional_attention = state.proportional_attention or self.params.proportional_attention
        return state


def nearest_by_position(kept: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """For each position in ``pruned``, the index (into ``kept``) of the nearest position in ``kept``; on a tie the
    earlier one."""
    order = torch.argsort(kept)
    ordered = kept[order]
    right = torch.searchsorted(ordered, pruned).clamp(max=ordered.numel() - 1)
    left = (right - 1).clamp(min=0)
    go_right = (ordered[right] - pruned).abs() < (pruned - ordered[left]).abs()
    return order[torch.where(go_right, right, left)]


@register_operator("bipartite")
class Bipartite(Merger):
    """ToMe's bipartite soft matching: merge the most similar visual token pairs (chooses its own tokens).

    Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023). The visual tokens of a sample
    are split alternately into sets A (1st, 3rd, ...) and B (2nd, 4th, ...); each A token is
    matched to its most similar B token (cosine similarity of ``features``), and the ``r`` A tokens
    with the most similar matches are merged into them, ``r`` = visual tokens − ``keep``. A merge
    is a size-weighted mean, and sizes add up. One matching merges at most all of A, so ``keep``
    must leave at least half of the visual tokens (use more stages to go lower).
    ``proportional_attention`` adds ``log(size)`` to each key's attention logits in the layers after
    the site, as ToMe does. The stage takes no scorer or selector.
    """

    selects = True

    @dataclass
    class Params:
        keep: float | int = 0.5  # visual tokens left after merging: a fraction or a count
        features: Literal["keys", "hidden"] = "keys"  # keys of the previous layer (ToMe) or hidden states
        proportional_attention: bool = True

        def __post_init__(self) -> None:
            check_keep(self.keep)

    @property
    def min_layer(self) -> int:  # type: ignore[override]
        return 1 if self.params.features == "keys" else 0

    def expected_kept(self, num_visual: int) -> int:
        return max(resolve_keep(self.params.keep, num_visual), num_visual // 2)

    def forward(self, state: TokenState) -> TokenState:
        feats = F.normalize(state.signals.features(self.params.features), dim=-1)
        hidden = state.hidden.clone()
        sizes = state.sizes.clone().float()
        keep = torch.ones(state.visual_mask.shape, dtype=torch.bool, device=state.visual_mask.device)
        for b in range(state.batch_size):
            vis = torch.nonzero(state.visual_mask[b] & state.valid_mask[b]).squeeze(1)
            v = vis.numel()
            r = v - resolve_keep(self.params.keep, v)
            a, bset = vis[0::2], vis[1::2]
            if r > a.numel():
                raise ValueError(f"bipartite: keep={self.params.keep!r} removes {r} of {v} visual tokens, but one "
                                 f"matching can merge at most {a.numel()}; keep at least half, or merge over more stages")
            if r == 0:
                continue
            sim = feats[b, a] @ feats[b, bset].T  # (|A|, |B|)
            best, match = sim.max(dim=1)
            order = torch.sort(best, descending=True, stable=True).indices
            src = order[:r]
            a_src = a[src]
            merge_into(hidden[b], sizes[b], bset, a_src, match[src], state.merge_record(b))
            keep[b, a_src] = False
        state.hidden, state.sizes, state.keep_mask = hidden, sizes, keep
        state.proportional_attention = state.proportional_attention or self.params.proportional_attention
        return state


def merge_into(hidden: torch.Tensor, sizes: torch.Tensor, targets: torch.Tensor, sources: torch.Tensor,
               assign: torch.Tensor, record: torch.Tensor | None = None) -> None:
    """Fold tokens ``sources`` into ``targets[assign]`` of one sample, in place: size-weighted means, sizes add.

    ``hidden`` (N, D), ``sizes`` (N,); ``targets`` (T,), ``sources`` (S,) token indices; ``assign`` (S,) in [0, T).
    ``record`` (N,) long (``state.merge_record(b)``) gets each source's target, for the trace and the plots.
    """
    if sources.numel() == 0:
        return
    if record is not None:
        record[sources] = targets[assign].to(record.device)
    w_src = sizes[sources]
    num = (hidden[targets].float() * sizes[targets][:, None]).index_add(
        0, assign, hidden[sources].float() * w_src[:, None])
    den = sizes[targets].index_add(0, assign, w_src)
    hidden[targets] = (num / den[:, None]).to(hidden.dtype)
    sizes[targets] = den


@register_operator("nearest_mean")
class NearestMean(FeatureUser, Merger):
    """Each dropped visual token is averaged into its most similar kept visual token.

    The merge of VScan (Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large
    Vision-Language Models", 2025) and HoliTom (Shao et al., "HoliTom: Holistic Token Merging for
    Fast Video Large Language Models", 2025): similarity is the cosine of ``features``
    (``hidden``, the previous layer's ``keys``, or the vision tower's ``vision_keys``); a kept
    token becomes the size-weighted mean of itself and the tokens assigned to it, and sizes add
    up. ``proportional_attention`` adds ``log(size)`` to its keys in the layers after the site.
    """

    @dataclass
    class Params:
        features: FeatureKind = "hidden"  # similarity features
        vision_layer: int = -2  # for features: vision_keys
        proportional_attention: bool = False

    def forward(self, state: TokenState) -> TokenState:
        if state.keep_mask is None:
            raise RuntimeError("nearest_mean needs a selector before it")
        feats = F.normalize(state.signals.features(self.params.features, self.params.vision_layer), dim=-1)
        hidden, sizes = state.hidden.clone(), state.sizes.clone().float()
        for b in range(state.batch_size):
            kept, pruned = kept_and_pruned(state, b)
            if kept.numel() == 0:
                continue
            assign = (feats[b, pruned] @ feats[b, kept].T).argmax(dim=1)
            merge_into(hidden[b], sizes[b], kept, pruned, assign, state.merge_record(b))
        state.hidden, state.sizes = hidden, sizes
        state.proportional_attention = state.proportional_attention or self.params.proportional_attention
        return state


@register_operator("contextual")
class Contextual(FeatureUser, Merger):
    """VisionZip's contextual tokens: the visual tokens the selector left are merged into a few new ones.

    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR
    2025. After the selector has kept the *dominant* tokens, ``contextual`` *targets* are taken
    from the remaining visual tokens at a uniform stride (every ``len(remaining) // contextual``-th,
    from the first); every other remaining token joins the target whose ``features`` (VisionZip:
    the vision tower's keys at the feature layer) are most similar by cosine; each target becomes
    the size-weighted mean of its group and is kept. So a stage keeps dominant + ``contextual``
    visual tokens. ``contextual`` is a count or a fraction of each sample's visual tokens.
    """

    @dataclass
    class Params:
        contextual: float | int = 10  # merged tokens added per sample: a count or a fraction of its visual tokens
        features: FeatureKind = "vision_keys"
        vision_layer: int = -2  # for features: vision_keys
        proportional_attention: bool = False

        def __post_init__(self) -> None:
            check_keep(self.contextual, "contextual")

    def added_tokens(self, num_visual: int, kept: int) -> int:
        return min(resolve_keep(self.params.contextual, num_visual), num_visual - kept)

    def forward(self, state: TokenState) -> TokenState:
        if state.keep_mask is None:
            raise RuntimeError("contextual needs a selector before it (the dominant tokens)")
        feats = F.normalize(state.signals.features(self.params.features, self.params.vision_layer), dim=-1)
        hidden, sizes, keep = state.hidden.clone(), state.sizes.clone().float(), state.keep_mask.clone()
        for b in range(state.batch_size):
            vis = state.visual_mask[b] & state.valid_mask[b]
            rest = torch.nonzero(vis & ~keep[b]).squeeze(1)
            n = min(resolve_keep(self.params.contextual, int(vis.sum())), rest.numel())
            if n == 0:
                continue
            step = rest.numel() // n
            is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
            is_target[torch.arange(n, device=rest.device) * step] = True
            targets, sources = rest[is_target], rest[~is_target]
            assign = (feats[b, sources] @ feats[b, targets].T).argmax(dim=1)
            merge_into(hidden[b], sizes[b], targets, sources, assign, state.merge_record(b))
            keep[b, targets] = True
        state.hidden, state.sizes, state.keep_mask = hidden, sizes, keep
        state.proportional_attention = state.proportional_attention or self.params.proportional_attention
        return state


@register_operator("knn_merge")
class KnnMerge(FeatureUser, Merger):
    """PruMerge's update: each kept token absorbs its nearest neighbours, weighted by their scores.

    Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models",
    2024. For each kept visual token i, its ``neighbors`` most similar other visual tokens
    N(i) (cosine of ``features``; PruMerge: the vision keys) are averaged in with the stage's scores
    as weights (PruMerge: the CLS attention), ``m = max(score, 0)``:

        h_i ← (m_i h_i + Σ_{j∈N(i)} m_j h_j) / (m_i + Σ_{j∈N(i)} m_j)

    Neighbourhoods overlap, so sizes are left as they are (no proportional attention).
    """

    @dataclass
    class Params:
        neighbors: int = 32  # nearest visual tokens absorbed by each kept one
        features: FeatureKind = "vision_keys"
        vision_layer: int = -2  # for features: vision_keys

        def __post_init__(self) -> None:
            if self.neighbors < 1:
                raise ParamError("neighbors", "must be >= 1")

    def forward(self, state: TokenState) -> TokenState:
        if state.keep_mask is None or state.scores is None:
            raise RuntimeError("knn_merge needs a scorer and a selector before it")
        feats = F.normalize(state.signals.features(self.params.features, self.params.vision_layer), dim=-1)
        hidden = state.hidden.clone()
        for b in range(state.batch_size):
            vis = torch.nonzero(state.visual_mask[b] & state.valid_mask[b]).squeeze(1)
            kept = torch.nonzero(state.keep_mask[b][vis]).squeeze(1)  # positions within vis
            if kept.numel() == 0 or vis.numel() < 2:
                continue
            mass = state.scores[b, vis].float().clamp_min(0).to(hidden.device)
            sim = feats[b, vis[kept]] @ feats[b, vis].T  # (K, V)
            sim[torch.arange(kept.numel()), kept] = float("-inf")  # not itself
            k = min(self.params.neighbors, vis.numel() - 1)
            nn_idx = sim.topk(k, dim=1).indices  # (K, k)
            h = state.hidden[b, vis].float()
            w_self, w_nn = mass[kept], mass[nn_idx]
            num = w_self[:, None] * h[kept] + (w_nn[..., None] * h[nn_idx]).sum(1)
            den = w_self + w_nn.sum(1)
            merged = torch.where(den[:, None] > 0, num / den.clamp_min(1e-30)[:, None], h[kept])
            hidden[b, vis[kept]] = merged.to(hidden.dtype)
        state.hidden = hidden
        return state


@register_operator("cluster_merge")
class ClusterMerge(FeatureUser, Merger):
    """Recycle the dropped visual tokens: cluster them and keep one merged token per cluster.

    SparseVLM's token recycling (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient
    Vision-Language Model Inference", 2024) clusters the pruned tokens with DPC-KNN (Du et al.,
    "Study on density peaks clustering based on k-nearest neighbors and principal component
    analysis", 2016): local density ρ_i = exp(−mean squared distance to its ``knn`` nearest
    neighbours), δ_i = distance to the nearest denser token (the densest gets the largest
    distance), and the ``clusters`` tokens with the largest ρ·δ are centres; every other token
    joins its nearest centre. ``method: kmeans`` uses scikit-learn's KMeans instead (k-means++,
    ``seed``), and each cluster's centre token is the member nearest its centroid. Distances are
    Euclidean on ``features``. Each centre token becomes the size-weighted mean of its cluster and
    is kept; sizes add up. ``clusters`` is a count or a fraction of the sample's dropped visual tokens.
    """

    @dataclass
    class Params:
        clusters: float | int = 0.3  # merged tokens per sample: a count or a fraction of the dropped visual tokens
        method: Literal["dpc_knn", "kmeans"] = "dpc_knn"
        knn: int = 5  # neighbours for DPC-KNN's density
        features: FeatureKind = "hidden"
        vision_layer: int = -2  # for features: vision_keys
        seed: int = 0  # kmeans
        proportional_attention: bool = False

        def __post_init__(self) -> None:
            check_keep(self.clusters, "clusters")
            if self.knn < 1:
                raise ParamError("knn", "must be >= 1")

    def added_tokens(self, num_visual: int, kept: int) -> int:
        dropped = num_visual - kept
        return min(resolve_keep(self.params.clusters, dropped), dropped)

    def forward(self, state: TokenState) -> TokenState:
        if state.keep_mask is None:
            raise RuntimeError("cluster_merge needs a selector before it")
        feats = state.signals.features(self.params.features, self.params.vision_layer)
        hidden, sizes, keep = state.hidden.clone(), state.sizes.clone().float(), state.keep_mask.clone()
        for b in range(state.batch_size):
            pruned = torch.nonzero(state.visual_mask[b] & state.valid_mask[b] & ~keep[b]).squeeze(1)
            c = min(resolve_keep(self.params.clusters, pruned.numel()), pruned.numel())
            if c == 0:
                continue
            x = feats[b, pruned]
            centre, assign = (dpc_knn(x, c, self.params.knn) if self.params.method == "dpc_knn"
                              else kmeans_centres(x, c, self.params.seed))
            members = torch.ones(pruned.numel(), dtype=torch.bool, device=pruned.device)
            members[centre] = False
            merge_into(hidden[b], sizes[b], pruned[centre], pruned[members], assign[members],
                       state.merge_record(b))
            keep[b, pruned[centre]] = True
        state.hidden, state.sizes, state.keep_mask = hidden, sizes, keep
        state.proportional_attention = state.proportional_attention or self.params.proportional_attention
        return state


def denser_than(density: torch.Tensor) -> torch.Tensor:
    """(P, P) bool, (i, j): point j is denser than point i — of equal densities the earlier point counts as denser,
    so exactly one point has no denser one (DPC-kNN's ties, without the public codes' random noise)."""
    idx = torch.arange(density.shape[0], device=density.device)
    return (density[None, :] > density[:, None]) | \
        ((density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))


def dpc_knn(x: torch.Tensor, clusters: int, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN on points ``x`` (P, F): (centre indices (C,), cluster of every point (P,) in [0, C)).

    Ties go to the earlier point. A centre is assigned to its own cluster.
    """
    p = x.shape[0]
    d = torch.cdist(x.float(), x.float())  # (P, P)
    k = min(knn, p - 1)
    if k > 0:
        near = d.topk(k + 1, dim=1, largest=False).values[:, 1:]  # without itself
        density = torch.exp(-(near ** 2).mean(1))
    else:
        density = torch.ones(p, device=x.device)
    denser = denser_than(density)
    delta = torch.where(denser, d, torch.full_like(d, float("inf"))).amin(1)
    delta = torch.where(torch.isinf(delta), d.amax(1), delta)
    score = density * delta
    centre = torch.sort(score, descending=True, stable=True).indices[:clusters]
    assign = d[:, centre].argmin(dim=1)
    assign[centre] = torch.arange(centre.numel(), device=x.device)
    return centre, assign


def kmeans_centres(x: torch.Tensor, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn KMeans on ``x`` (P, F): (centre indices: the member nearest each centroid, cluster of each point)."""
    from sklearn.cluster import KMeans

    arr = x.detach().float().cpu().numpy()
    km = KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit(arr)
    labels = torch.as_tensor(km.labels_, dtype=torch.long, device=x.device)
    centroids = torch.as_tensor(km.cluster_centers_, dtype=torch.float32, device=x.device)
    d = torch.cdist(x.float(), centroids)  # (P, C)
    d = torch.where(labels[:, None] == torch.arange(clusters, device=x.device)[None, :], d,
                    torch.full_like(d, float("inf")))
    filled = torch.isfinite(d).any(dim=0)  # KMeans can leave a cluster empty when points repeat
    remap = torch.cumsum(filled.long(), 0) - 1
    centre = d[:, filled].argmin(dim=0)
    assign = remap[labels]
    assign[centre] = torch.arange(centre.numel(), device=x.device)
    return centre, assign


def grid_blocks(rows: int, cols: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``rows`` x ``cols`` raster grid cut into ``k`` x ``k`` blocks (those at the right and bottom edges hold what
    is left): ``(block, slot, first)`` — each cell's block in raster order of blocks, its place inside the block
    (``(r % k) * k + c % k``) and each block's top-left cell."""
    cell = torch.arange(rows * cols, device=device)
    r, c = cell // cols, cell % cols
    block = (r // k) * (-(-cols // k)) + c // k
    first = torch.full((int(block.max()) + 1,), rows * cols, dtype=torch.long, device=device)
    first = first.scatter_reduce(0, block, cell, "amin")
    return block, (r % k) * k + c % k, first


def whole_tiles(state: TokenState, b: int, vis: torch.Tensor, name: str):
    """``(rows, cols, idx)`` of each tile of sample ``b`` holding visual tokens (``vis``): its grid and its tokens'
    indices in raster order; a tile an earlier stage thinned out is an error (``name``: the operator, for it)."""
    for t, (rows, cols) in enumerate(state.tile_grids[b]):
        idx = torch.nonzero(vis & (state.tiles[b] == t)).squeeze(1)
        if idx.numel() == 0:
            continue
        if idx.numel() != rows * cols:
            raise ValueError(f"{name}: sample {b}'s tile {t} holds {idx.numel()} of its {rows}x{cols} tokens (an "
                             "earlier stage removed some); it needs whole grids")
        yield rows, cols, idx


@register_operator("grid_pool")
class GridPool(Merger):
    """Average pooling of the visual grid: each ``size`` x ``size`` block of a tile's tokens becomes one token,
    the block's mean (its top-left token carries it, with the block's size) — the plain downsampling baseline
    that VTC-Bench (Liao et al., ACL 2026) and UniPruneBench found hardest to beat. Blocks at a grid's right and
    bottom edges hold what is left (a 3x5 grid pooled by 2 gives 2x3 tokens). Every tile is pooled on its own
    grid (LLaVA-NeXT's base tile and crops, InternVL's tiles, each video frame; a single-image family's image);
    visual tokens in no tile (LLaVA-NeXT's newlines) stay. With ``positions: renumber`` the pooled tokens sit on a
    grid ``size`` times smaller, as a pooled image's would. The stage takes no scorer or selector.

    ``threshold: t > 0`` pools only the blocks whose tokens are alike — the mean cosine similarity of ``features``
    over the block's pairs of distinct tokens at least t — and leaves every other token as it is: MustDrop's local
    spatial merging (Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language
    Model", 2024: 3x3 windows, t = 0.8, on the vision tower's layer-0 output). Its kept count then depends on the
    image.
    """

    selects = True
    needs_tiles = True

    @dataclass
    class Params:
        size: int = 2  # side of a pooled block, in tokens
        threshold: float = 0.0  # 0: pool every block; t > 0: only blocks whose mean pairwise cosine is >= t
        features: FeatureKind = "hidden"  # what the similarity compares (threshold > 0)
        vision_layer: int = 1  # for features: vision_keys

        def __post_init__(self) -> None:
            if self.size < 1:
                raise ParamError("size", f"must be >= 1, got {self.size}")
            if not -1.0 <= self.threshold <= 1.0:
                raise ParamError("threshold", f"a cosine similarity in [-1, 1] (0: pool every block), got "
                                              f"{self.threshold}")

    @property
    def needs_vision(self) -> bool:  # type: ignore[override]
        return self.params.threshold > 0 and self.params.features == "vision_keys"

    @property
    def min_layer(self) -> int:  # type: ignore[override]
        return 1 if self.params.threshold > 0 and self.params.features == "keys" else 0

    def _fixed_count(self) -> None:
        if self.params.threshold > 0:
            raise NotImplementedError("grid_pool with a threshold pools the blocks that are alike: its count depends "
                                      "on the image")

    def expected_kept_in_grid(self, rows: int, cols: int) -> int:
        self._fixed_count()
        k = self.params.size
        return -(-rows // k) * -(-cols // k)

    def expected_kept(self, num_visual: int) -> int:
        self._fixed_count()
        side = int(round(num_visual ** 0.5))
        if side * side != num_visual:
            raise NotImplementedError(f"grid_pool needs the grid shape for {num_visual} visual tokens (not a square)")
        return self.expected_kept_in_grid(side, side)

    def forward(self, state: TokenState) -> TokenState:
        if state.tiles is None or state.tile_grids is None:
            raise RuntimeError("grid_pool needs the tokens' tiles (the runtime sets state.tiles)")
        k = self.params.size
        hidden, sizes = state.hidden.clone(), state.sizes.clone().float()
        keep = ~state.visual_mask.clone()
        feats = None
        if self.params.threshold > 0:
            feats = F.normalize(state.signals.features(self.params.features, self.params.vision_layer).float(), dim=-1)
        for b in range(state.batch_size):
            vis = state.visual_mask[b] & state.valid_mask[b]
            keep[b] |= vis & (state.tiles[b] < 0)
            for rows, cols, idx in whole_tiles(state, b, vis, "grid_pool"):
                block, _, first = grid_blocks(rows, cols, k, idx.device)
                others = first[block] != torch.arange(rows * cols, device=idx.device)
                if feats is not None:  # only the blocks whose tokens are alike; the others' tokens all stay
                    alike = self._alike_blocks(feats[b, idx.to(feats.device)].to(idx.device), block, first.numel())
                    keep[b, idx[~alike[block]]] = True
                    others &= alike[block]
                    first = first[alike]
                    block = torch.cumsum(alike.long(), 0)[block] - 1  # the pooled blocks renumbered
                targets = idx[first]  # each pooled block's top-left token
                merge_into(hidden[b], sizes[b], targets, idx[others], block[others], state.merge_record(b))
                keep[b, targets] = True
        state.hidden, state.sizes, state.keep_mask = hidden, sizes, keep
        return state

    def _alike_blocks(self, feats: torch.Tensor, block: torch.Tensor, blocks: int) -> torch.Tensor:
        """(blocks,) bool: whether each block's mean cosine similarity over its pairs of distinct tokens reaches
        the threshold (``feats`` unit rows of the tile's tokens in raster order; a one-token block never)."""
        alike = torch.zeros(blocks, dtype=torch.bool, device=block.device)
        for j in range(blocks):
            members = feats[block == j]
            m = members.shape[0]
            if m < 2:
                continue
            sim = members @ members.T
            alike[j] = float((sim.sum() - sim.diagonal().sum()) / (m * (m - 1))) >= self.params.threshold
        return alike


def even_shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers as evenly as possible, the first ones one larger."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def walk_clips(state: TokenState, name: str):
    """``(keep, walk)`` for an operator that works clip by clip (``name``, for the errors): ``keep`` (B, N) starts as
    every non-visual token, and ``walk`` yields ``(sample, clip)`` (:func:`clips`), marking on its way each sample's
    visual tokens in no tile (LLaVA-NeXT's newlines) kept."""
    if state.frames is None or state.tiles is None or state.tile_grids is None:
        raise RuntimeError(f"{name} needs the tokens' frames (the runtime sets state.frames)")
    keep = ~state.visual_mask.clone()

    def walk():
        for b in range(state.batch_size):
            vis = state.visual_mask[b] & state.valid_mask[b]
            keep[b] |= vis & (state.tiles[b] < 0)
            for clip in clips(state, b, vis, name):
                yield b, clip

    return keep, walk()


def clips(state: TokenState, b: int, vis: torch.Tensor, name: str) -> list[list[torch.Tensor]]:
    """Sample ``b``'s clips as lists of frames, each frame the indices of its tokens in raster order: consecutive
    tiles, a new clip at every frame 0 (an image is a clip of one frame); frames must be whole (``name``: the
    operator, for the error)."""
    out: list[list[torch.Tensor]] = []
    for _, _, idx in whole_tiles(state, b, vis, name):
        if int(state.frames[b, idx[0]]) == 0 or not out:
            out.append([])
        out[-1].append(idx)
    return out


@register_operator("fastvid")
class FastVID(Merger):
    """FastVID's dynamic density pruning (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large
    Language Models", 2025), as its public code runs it on Qwen2.5-VL, before the LLM:

    - **DySeg**: a clip is cut after each frame whose mean visual token (the frames' global features) has a cosine
      similarity with the next frame's below ``tau``, and after the ``segments - 1`` least similar transitions in
      any case;
    - **STPrune**, per segment of L frames: ``int(retention x cells)`` tokens per frame, so L times that for the
      segment, a ``context`` share of it (at least one) *contextual* and the rest *salient*. Within a segment, runs
      of frames whose next frame is at least ``ignore`` similar count as one frame, represented by their last
      frame; the salient budget is shared evenly over those representatives, each keeping its tokens with the most
      vision-tower attention (``layer``, the attention each token receives from its frame's queries);
      every ``anchor_every``-th representative, counted from the segment's end, is an anchor frame and gets an
      even share of the contextual budget (at most half its cells), chosen among its tokens not already salient as
      the density peaks (DPC-kNN: density ``exp(-mean squared distance to the knn nearest, itself included)`` of
      distances scaled by ``1/sqrt(dim)``, times the distance to the nearest denser token);
    - **density-based token merging**: for each anchor frame, every token of the segment neither salient nor one of
      that anchor's contextual tokens goes to its most similar (cosine) contextual token of the anchor, which
      becomes ``w x itself + (1 - w) x the mean of those assigned``, ``w = max(beta, 1 / (count + 1))``.

    Salient and contextual tokens are kept, the others dropped; positions stay those of the kept tokens. An image
    is a clip of one frame. Deviations: the salience is tokenprune's received attention of the vision block
    (``cls_attention`` with ``queries: all``: each query's attention averaged over the frame's queries) where the
    public code takes the attention of the frame's mean query; density ties go to the earlier token (the code adds
    noise of 1e-6). The kept count depends on the clip (and on an image's tiles), so FLOPs need measured counts.
    """

    selects = True
    needs_frames = True
    needs_vision = True

    @dataclass
    class Params:
        retention: float = 0.27  # share of each frame's tokens kept (the public Qwen2.5-VL script's 0.27)
        segments: int = 8  # DySeg's c: at least this many segments (cut at the c - 1 least similar transitions)
        tau: float = 0.84  # DySeg: also cut where consecutive frames are less similar than this
        ignore: float = 0.95  # frames at least this similar to the next count as one
        context: float = 0.4  # STPrune's d: the share of a segment's budget that is contextual (density peaks)
        anchor_every: int = 4  # DTM's p: every p-th representative frame is an anchor
        beta: float = 0.6  # DTM's lower bound on a contextual token's own weight in its merge
        knn: int = 4  # DPC-kNN's neighbours (itself included)
        layer: int | float = -1  # vision-tower layer whose attention ranks the salient tokens

        def __post_init__(self) -> None:
            for name in ("retention", "tau", "ignore", "context", "beta"):
                if not 0.0 <= getattr(self, name) <= 1.0:
                    raise ParamError(name, f"must lie in [0, 1], got {getattr(self, name)}")
            for name in ("segments", "anchor_every", "knn"):
                if getattr(self, name) < 1:
                    raise ParamError(name, f"must be >= 1, got {getattr(self, name)}")

    def expected_kept(self, num_visual: int) -> int:
        raise NotImplementedError("fastvid keeps a share of each frame and segment: the count depends on the clip")

    def forward(self, state: TokenState) -> TokenState:
        keep, walk = walk_clips(state, "fastvid")
        salience = state.signals.vision_cls_attention(layer=self.params.layer, queries="all").float()
        hidden = state.hidden.clone()
        for b, clip in walk:
            for seg in self.segments_of(state.hidden[b], clip):
                kept, merged = self.prune_segment(state.hidden[b], salience[b], seg)
                keep[b, kept] = True
                for idx, value in merged:  # (no merge record: a dropped token joins one token per anchor)
                    hidden[b, idx] = value.to(hidden.dtype)
        state.hidden, state.keep_mask = hidden, keep
        return state

    def segments_of(self, hidden: torch.Tensor, clip: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """DySeg: the clip's frames cut into segments."""
        if len(clip) == 1:
            return [clip]
        sims = frame_similarities(hidden, clip)
        low = sims.topk(min(self.params.segments - 1, sims.numel()), largest=False).indices
        cuts = sorted(set(low.tolist()) | set(torch.nonzero(sims < self.params.tau).flatten().tolist()))
        bounds = [0] + [c + 1 for c in cuts] + [len(clip)]
        return [clip[s:e] for s, e in zip(bounds[:-1], bounds[1:]) if e > s]

    def budgets(self, hidden: torch.Tensor, seg: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """(salient, contextual) token counts of each frame of a segment."""
        p = self.params
        cells = seg[0].numel()
        retain = int(cells * p.retention) * len(seg)
        ctx = max(int(retain * p.context), 1)
        sal = retain - ctx
        if len(seg) == 1:
            return [sal], [ctx]
        sims = frame_similarities(hidden, seg)
        ends = torch.nonzero(sims < p.ignore).flatten().tolist() + [len(seg) - 1]  # each run's last frame
        reps = len(ends)
        sal_rep = even_shares(sal, reps)
        anchors = (reps + p.anchor_every - 1) // p.anchor_every
        ctx_anchor = even_shares(ctx, anchors)
        ctx_rep = [min(ctx_anchor[i // p.anchor_every], cells // 2) if i % p.anchor_every == 0 else 0
                   for i in range(reps)][::-1]  # anchors counted from the segment's end
        salient, context = [0] * len(seg), [0] * len(seg)
        for r, f in enumerate(ends):
            context[f] = ctx_rep[r]
            salient[f] = min(sal_rep[r], cells - ctx_rep[r])
        return salient, context

    def prune_segment(self, hidden: torch.Tensor, salience: torch.Tensor, seg: list[torch.Tensor]
                      ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(kept token indices, [(contextual tokens of an anchor, their merged values)]) of one segment."""
        salient_n, context_n = self.budgets(hidden, seg)
        salient, anchors = [], []
        for idx, s, c in zip(seg, salient_n, context_n):
            top = salience[idx].topk(s).indices if s else idx.new_zeros(0)
            salient.append(idx[top])
            if c:
                rest = idx[~torch.isin(torch.arange(idx.numel(), device=idx.device), top)]
                peaks = density_peak_scores(hidden[rest].float(), self.params.knn)
                anchors.append(rest[torch.sort(peaks, descending=True, stable=True).indices[:c]])
        salient_t = torch.cat(salient)
        every = torch.cat(seg)
        unit = F.normalize(hidden[every].float(), dim=-1)
        merged = []
        for centres in anchors:
            sources = ~torch.isin(every, torch.cat([salient_t, centres]))
            cen = (every[None, :] == centres[:, None]).int().argmax(1)  # each centre's place in the segment
            assign = (unit[sources] @ unit[cen].T).argmax(1)
            count = torch.zeros(centres.numel(), device=hidden.device).index_add(
                0, assign, torch.ones(assign.numel(), device=hidden.device))
            mean = torch.zeros(centres.numel(), hidden.shape[-1], device=hidden.device).index_add(
                0, assign, hidden[every[sources]].float()) / count.clamp(min=1)[:, None]
            w = (1.0 / (count + 1)).clamp(min=self.params.beta)[:, None]
            merged.append((centres, w * hidden[centres].float() + (1 - w) * mean))
        return torch.cat([salient_t] + anchors), merged


def frame_similarities(hidden: torch.Tensor, frames: list[torch.Tensor]) -> torch.Tensor:
    """(F - 1,) cosine similarity of each frame's mean token with the next frame's."""
    means = F.normalize(torch.stack([hidden[idx].float().mean(0) for idx in frames]), dim=-1)
    return (means[:-1] * means[1:]).sum(-1)


def density_peak_scores(x: torch.Tensor, knn: int) -> torch.Tensor:
    """DPC-kNN's centre score of each point of ``x`` (P, D) as FastVID computes it: distances scaled by
    ``1/sqrt(D)``; density ``exp(-mean squared distance to the knn nearest, itself included)``; times the distance
    to the nearest denser point (the largest distance when none is). Equal densities: the earlier point is denser."""
    d = torch.cdist(x[None], x[None])[0] / x.shape[-1] ** 0.5
    near = d.topk(min(knn, x.shape[0]), dim=1, largest=False).values
    density = torch.exp(-(near ** 2).mean(1))
    delta = torch.where(denser_than(density), d, d.max()).amin(1)
    return delta * density


def dpc_clusters(x: torch.Tensor, clusters: int, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering as PruneVid and FastVID compute it (:func:`density_peak_scores`): the ``clusters`` points of
    ``x`` (P, D) with the highest centre scores (ties: the earlier), and each point's cluster — its nearest centre,
    a centre its own — as (centres (C,), assign (P,) in [0, C))."""
    centres = torch.sort(density_peak_scores(x, knn), descending=True, stable=True).indices[:clusters]
    assign = torch.cdist(x[None], x[centres][None])[0].argmin(1)
    assign[centres] = torch.arange(centres.numel(), device=x.device)
    return centres, assign


def contiguous_segments(labels: list[int]) -> list[int]:
    """PruneVid's refinement of a clustering of frames into time segments: each cluster keeps its longest run(s) of
    consecutive frames (a cluster whose runs are all single frames keeps none); every other run joins the longer of
    the runs on its left and right (as relabelled so far, left to right; a tie goes left; none: cluster 0). Returns
    the lengths of the resulting runs of equal labels, in order."""
    out = list(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.setdefault(labels[start], []).append((start, i))
            start = i
    for spans in runs.values():
        longest = max(e - s for s, e in spans)
        for s, e in spans:
            if longest == 1 or e - s < longest:
                out[s:e] = [-1] * (e - s)

    def run_length(i: int, step: int) -> int:
        j = i
        while 0 <= j + step < len(out) and out[j + step] == out[i]:
            j += step
        return abs(j - i) + 1

    i = 0
    while i < len(out):
        if out[i] != -1:
            i += 1
            continue
        j = i
        while j < len(out) and out[j] == -1:
            j += 1
        left = (out[i - 1], run_length(i - 1, -1)) if i > 0 else (None, 0)
        right = (out[j], run_length(j, 1)) if j < len(out) else (None, 0)
        label = right[0] if right[1] > left[1] else (left[0] if left[0] is not None else right[0])
        out[i:j] = [0 if label is None else label] * (j - i)
        i = j
    lengths, start = [], 0
    for i in range(1, len(out) + 1):
        if i == len(out) or out[i] != out[start]:
            lengths.append(i - start)
            start = i
    return lengths


@register_operator("prunevid_merge")
class PruneVidMerge(Merger):
    """PruneVid's spatial-temporal token merging (Huang et al., "PruneVid: Visual Token Pruning for Efficient Video
    Large Language Models", ACL 2025 Findings), as its public code does it, before the LLM:

    - a clip's frames (their mean tokens) are clustered with DPC-kNN into ``int(frames x segments)`` clusters
      (``knn_frames`` neighbours), made contiguous (:func:`contiguous_segments`): the time segments;
    - in a segment of W frames, a cell whose tokens are alike over time — the mean cosine similarity over the
      segment's ordered pairs of distinct frames above ``tau`` — is *static*: its W tokens become one, their mean;
      a segment with more than ``min_tokens`` static cells clusters those means with DPC-kNN (``knn``) into
      ``int(static cells x cluster)`` tokens, each its cluster's mean;
    - each frame's other (*dynamic*) tokens, when more than ``min_tokens``, are clustered the same way within the
      frame into ``int(dynamic tokens x cluster)`` cluster means.

    A merged token is carried by a kept token — a static cluster's by its centre cell's token in the segment's first
    frame, a dynamic cluster's by its centre — and gets its cluster's size (all means are of the original tokens,
    so size-weighted). Images and one-frame segments have no static cells. The kept count depends on the clip.
    Deviation: the code puts a segment's static tokens before its dynamic ones; here every kept token keeps its
    place (and its positions). PruneVid's second part, the in-LLM selection at layer 10 by text-to-visual attention
    (max over text rows and heads) with the earlier layers' caches cut to match, is the preset's second stage
    (``attention`` with ``heads: max, rows: max`` → ``topk`` → ``kv_compact``).
    """

    selects = True
    needs_frames = True

    @dataclass
    class Params:
        segments: float = 0.25  # time segments per frame (temporal_segment_ratio)
        tau: float = 0.8  # a cell is static above this mean similarity over the segment's frames
        cluster: float = 0.5  # share of a group's tokens kept as cluster means (cluster_ratio)
        knn: int = 7  # DPC-kNN neighbours for the spatial clusters (itself included)
        knn_frames: int = 7  # DPC-kNN neighbours for the time segments
        min_tokens: int = 14  # a group of at most this many tokens is not clustered

        def __post_init__(self) -> None:
            for name in ("segments", "cluster"):
                if not 0.0 < getattr(self, name) <= 1.0:
                    raise ParamError(name, f"must lie in (0, 1], got {getattr(self, name)}")
            if not -1.0 <= self.tau <= 1.0:
                raise ParamError("tau", f"a cosine similarity in [-1, 1], got {self.tau}")
            for name in ("knn", "knn_frames"):
                if getattr(self, name) < 1:
                    raise ParamError(name, f"must be >= 1, got {getattr(self, name)}")
            if self.min_tokens < 0:
                raise ParamError("min_tokens", f"must be >= 0, got {self.min_tokens}")

    def expected_kept(self, num_visual: int) -> int:
        raise NotImplementedError("prunevid_merge keeps what each clip's static cells and clusters leave")

    def forward(self, state: TokenState) -> TokenState:
        keep, walk = walk_clips(state, "prunevid_merge")
        hidden, sizes = state.hidden.clone(), state.sizes.clone().float()
        for b, clip in walk:
            for targets, sources, assign in self.groups(state.hidden[b], clip):
                keep[b, targets] = True
                merge_into(hidden[b], sizes[b], targets, sources, assign, state.merge_record(b))
        state.hidden, state.sizes, state.keep_mask = hidden, sizes, keep
        return state

    def time_segments(self, hidden: torch.Tensor, clip: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The clip's frames cut into PruneVid's time segments."""
        p = self.params
        if len(clip) == 1:
            return [clip]
        means = torch.stack([hidden[idx].float().mean(0) for idx in clip])
        _, labels = dpc_clusters(means, max(1, int(len(clip) * p.segments)), min(p.knn_frames, len(clip)))
        out, start = [], 0
        for n in contiguous_segments(labels.tolist()):
            out.append(clip[start:start + n])
            start += n
        return out

    def clustered(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(centres, assign) of a group's features: DPC-kNN clusters when the group is larger than ``min_tokens``,
        else every token its own."""
        n = x.shape[0]
        if n <= self.params.min_tokens:
            return torch.arange(n, device=x.device), torch.arange(n, device=x.device)
        return dpc_clusters(x, int(n * self.params.cluster), min(self.params.knn, n))

    def groups(self, hidden: torch.Tensor, clip: list[torch.Tensor]):
        """``(targets, sources, assign)`` for :func:`merge_into`, one per static group and per frame's dynamic
        tokens: the carriers, the tokens merged into them, and which carrier each goes to."""
        for seg in self.time_segments(hidden, clip):
            cells = torch.stack(seg)  # (W, n) token indices, frame by frame
            w = cells.shape[0]
            static = torch.zeros(cells.shape[1], dtype=torch.bool, device=cells.device)
            if w > 1:
                unit = F.normalize(hidden[cells].float(), dim=-1)  # (W, n, D)
                sims = torch.einsum("wnd,tnd->n", unit, unit)  # every ordered pair, each frame with itself too
                static = (sims - w) / (w * (w - 1)) > self.params.tau
            if static.any():
                st = static.nonzero().flatten()
                centres, assign = self.clustered(hidden[cells[:, st]].float().mean(0))
                targets = cells[0, st[centres]]
                members = cells[:, st].flatten()  # frame by frame: the cells' tokens of every frame
                yield targets, *_merged_members(members, targets, assign.repeat(w))
            for f in range(w):
                dyn = cells[f, ~static]
                if dyn.numel() == 0:
                    continue
                centres, assign = self.clustered(hidden[dyn].float())
                targets = dyn[centres]
                yield targets, *_merged_members(dyn, targets, assign)


def _merged_members(members: torch.Tensor, targets: torch.Tensor, assign: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sources, assign)``: the members that are not carriers, and each one's carrier (index into ``targets``)."""
    merged = ~torch.isin(members, targets)
    return members[merged], assign[merged]


def static_windows(static: torch.Tensor, max_window: int) -> tuple[list[tuple[int, int]], int]:
    """HoliTom's segmentation of a clip into windows of frames (first and last frame), by dynamic programming: a
    window of frames s..e saves (e - s) tokens for every cell alike across all of it (``static`` (F - 1, n): cell
    alike from frame f to f + 1), and the windows (at most ``max_window`` frames) maximise the tokens saved, a
    longer window only where it saves strictly more. Returns the windows and the tokens saved."""
    frames = static.shape[0] + 1
    saved = [[0] * frames for _ in range(frames)]
    for s in range(frames - 1):
        alike = torch.ones(static.shape[1], dtype=torch.bool, device=static.device)
        for e in range(s + 1, frames):
            alike = alike & static[e - 1]
            saved[s][e] = (e - s) * int(alike.sum())
    best, start = [0] * frames, [0] * frames
    for i in range(frames):
        best[i], start[i] = (best[i - 1] if i else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (best[j] if j >= 0 else 0) + saved[j + 1][i]
            if value > best[i]:
                best[i], start[i] = value, j + 1
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], best[-1]


@register_operator("holitom_temporal")
class HoliTomTemporal(Merger):
    """HoliTom's merging before the LLM (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language
    Models", 2025), as its public code does it:

    - *temporal*: a clip's frames are cut into windows (:func:`static_windows`) that maximise the tokens of cells
      alike (cosine of consecutive frames above ``tau``) across a whole window; in a window a cell alike across it is
      *static* and becomes one token, its mean over the window's frames;
    - *spatial*: the budget ``retain`` of the clip's tokens, divided by the share left after the temporal step, gives
      each group its keep ratio r (at most 1). A window's static tokens become ``round(r x count)`` DPC-kNN cluster
      centres (``knn`` neighbours, at most the centre count), each ``beta x itself + (1 - beta) x the mean of those
      assigned to it`` (the code's default; a static group whose count rounds to 0 is dropped); each frame's other
      (*dynamic*) tokens keep ``ceil(r x count)``: the most attended by the vision tower (``layer``), and with
      ``context`` > 0 that share of them as density peaks of the rest, merged the same way.

    A static token is carried by its cell's token in the window's first frame; kept tokens keep their places and
    positions (the code reorders a window's static tokens before its dynamic ones). An image is a clip of one frame.
    Density ties go to the earlier token (the code adds noise). The kept count depends on the clip. HoliTom's third
    part, the merge inside the LLM, is the ``holitom`` preset's stage; ``holitom_video`` runs all three.
    """

    selects = True
    needs_frames = True
    needs_vision = True

    @dataclass
    class Params:
        retain: float = 0.15  # share of the clip's tokens kept (RETAIN_RATIO)
        tau: float = 0.8  # consecutive frames' cells above this similarity are alike (T)
        beta: float = 0.6  # a cluster centre's own weight in its merge (BETA)
        context: float = 0.0  # share of a frame's dynamic budget taken as density peaks (D)
        knn: int = 7  # DPC-kNN neighbours (K)
        max_window: int = 1024  # longest window, in frames
        layer: int | float = -1  # vision-tower layer whose attention ranks the dynamic tokens

        def __post_init__(self) -> None:
            for name in ("retain", "beta", "context"):
                if not 0.0 <= getattr(self, name) <= 1.0:
                    raise ParamError(name, f"must lie in [0, 1], got {getattr(self, name)}")
            if not -1.0 <= self.tau <= 1.0:
                raise ParamError("tau", f"a cosine similarity in [-1, 1], got {self.tau}")
            for name in ("knn", "max_window"):
                if getattr(self, name) < 1:
                    raise ParamError(name, f"must be >= 1, got {getattr(self, name)}")

    def expected_kept(self, num_visual: int) -> int:
        raise NotImplementedError("holitom_temporal keeps what each clip's windows and clusters leave")

    def forward(self, state: TokenState) -> TokenState:
        keep, walk = walk_clips(state, "holitom_temporal")
        salience = state.signals.vision_cls_attention(layer=self.params.layer, queries="all").float()
        hidden, sizes = state.hidden.clone(), state.sizes.clone().float()
        for b, clip in walk:
            record = state.merge_record(b)
            for carriers, values, groups in self.merge_clip(state.hidden[b], salience[b], clip):
                keep[b, carriers] = True
                hidden[b, carriers] = values.to(hidden.dtype)
                for carrier, members in zip(carriers.tolist(), groups):
                    record[members] = carrier
                    sizes[b, carrier] += sizes[b, members].sum()
        state.hidden, state.sizes, state.keep_mask = hidden, sizes, keep
        return state

    def merge_clip(self, hidden: torch.Tensor, salience: torch.Tensor, clip: list[torch.Tensor]):
        """``(carriers, values, members)`` per kept group of a clip: the tokens kept, their new values, and for each
        the tokens merged into it (and dropped)."""
        p = self.params
        cells = torch.stack(clip)  # (F, n)
        unit = F.normalize(hidden[cells].float(), dim=-1)
        alike = (unit[:-1] * unit[1:]).sum(-1) > p.tau  # (F - 1, n)
        windows, saved = static_windows(alike, p.max_window)
        total = cells.numel()
        r = min(p.retain * total / (total - saved), 1.0) if total > saved else 1.0
        for s, e in windows:
            static = alike[s:e].all(0) if e > s else torch.zeros(cells.shape[1], dtype=torch.bool,
                                                                 device=cells.device)
            if static.any():
                st = static.nonzero().flatten()
                means = hidden[cells[s:e + 1, st]].float().mean(0)  # (n_static, D)
                count = round(st.numel() * r)
                if count:
                    centres, assign = dpc_clusters(means, count, min(p.knn, count))
                    values = self._merged(means, centres, assign)
                    members = [cells[s:e + 1, st[assign == c]].flatten() for c in range(centres.numel())]
                    members = [m[m != cells[s, st[c]]] for c, m in zip(centres.tolist(), members)]
                    yield cells[s, st[centres]], values, members
            for f in range(s, e + 1):
                dyn = cells[f, ~static]
                if dyn.numel():
                    yield self._dynamic(hidden, salience, dyn, math.ceil(dyn.numel() * r))

    def _merged(self, x: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        """Each centre ``beta x itself + (1 - beta) x the mean of the other points assigned to it`` (itself when
        none is)."""
        out = x[centres].clone()
        for c in range(centres.numel()):
            others = (assign == c) & (torch.arange(x.shape[0], device=x.device) != centres[c])
            if others.any():
                out[c] = self.params.beta * x[centres[c]] + (1 - self.params.beta) * x[others].mean(0)
        return out

    def _dynamic(self, hidden: torch.Tensor, salience: torch.Tensor, tokens: torch.Tensor, keep: int):
        """A frame's dynamic tokens: the most salient, and with ``context`` the density peaks of the rest, merged."""
        dominant = round(keep * (1 - self.params.context))
        top = salience[tokens].topk(dominant).indices if dominant else tokens.new_zeros(0)
        carriers, values, members = [tokens[top]], [hidden[tokens[top]].float()], [tokens.new_zeros(0)] * top.numel()
        contextual = keep - dominant
        if contextual:
            rest = tokens[~torch.isin(torch.arange(tokens.numel(), device=tokens.device), top)]
            centres, assign = dpc_clusters(hidden[rest].float(), contextual, min(self.params.knn, contextual))
            carriers.append(rest[centres])
            values.append(self._merged(hidden[rest].float(), centres, assign))
            members += [rest[(assign == c) & (rest != rest[centres[c]])] for c in range(centres.numel())]
        return torch.cat(carriers), torch.cat(values), members
