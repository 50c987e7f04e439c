"""Mergers: fold what a stage drops into what it keeps, instead of throwing it away."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from tokenprune.budget import check_keep, resolve_keep
from tokenprune.operator import Merger, ParamError
from tokenprune.registry import register_operator
from tokenprune.state import TokenState


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
            kept = torch.nonzero(vis & state.keep_mask[b]).squeeze(1)
            pruned = torch.nonzero(vis & ~state.keep_mask[b]).squeeze(1)
            if kept.numel() == 0 or pruned.numel() == 0:
                continue
            mass = scores[b].float().clamp_min(0).to(hidden.device)
            if float(mass[vis].sum()) <= 0:
                mass = torch.ones_like(mass)
            hk, hp = hidden[b, kept].float(), hidden[b, pruned].float()
            sim = F.normalize(hp, dim=-1) @ F.normalize(hk, dim=-1).T  # (P, K)
            n = self.params.neighbors
            if 0 < n < kept.numel():
                top = sim.topk(n, dim=1).indices
                sim = torch.full_like(sim, float("-inf")).scatter(1, top, sim.gather(1, top))
            w = torch.softmax(sim / self.params.temperature, dim=1)  # (P, K)
            contrib = mass[pruned][:, None] * w  # (P, K)
            num = mass[kept][:, None] * hk + contrib.T @ hp
            den = mass[kept] + contrib.sum(0)
            merged = torch.where(den[:, None] > 0, num / den.clamp_min(1e-30)[:, None], hk)
            hidden[b, kept] = merged.to(hidden.dtype)
            sizes[b, kept] = sizes[b, kept] + w.T.to(sizes.dtype) @ sizes[b, pruned]
        state.hidden, state.sizes = hidden, sizes
        state.proportional_attention = state.proportional_attention or self.params.proportional_attention
        return state


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

    def features(self, state: TokenState) -> torch.Tensor:
        if self.params.features == "keys":
            k = state.signals.keys()  # (B, H, N, hd)
            return k.float().transpose(1, 2).flatten(2).to(state.hidden.device)
        return state.hidden.float()

    def forward(self, state: TokenState) -> TokenState:
        feats = F.normalize(self.features(state), dim=-1)
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
            w_src = sizes[b, a_src]
            num = (hidden[b, bset].float() * sizes[b, bset][:, None]).index_add(
                0, match[src], hidden[b, a_src].float() * w_src[:, None])
            den = sizes[b, bset].index_add(0, match[src], w_src)
            hidden[b, bset] = (num / den[:, None]).to(hidden.dtype)
            sizes[b, bset] = den
            keep[b, a_src] = False
        state.hidden, state.sizes, state.keep_mask = hidden, sizes, keep
        state.proportional_attention = state.proportional_attention or self.params.proportional_attention
        return state
