"""Learned operators: operators with trainable weights (:mod:`tokenprune.core.learned`), trained by
``tokenprune train-operator`` with the LVLM frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenprune.core.learned import LearnedOperator
from tokenprune.core.operator import Merger, ParamError, Scorer, ScorerParams
from tokenprune.core.registry import register_operator
from tokenprune.core.state import TokenState
from tokenprune.operators.mergers import grid_blocks, merge_into, whole_tiles


def _mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim, eps=1e-6))


class QueCCNetwork(nn.Module):
    """QueCC's compressor for one grid of visual tokens (Li et al., "Inference Optimal VLMs Need Fewer Visual Tokens
    and More Parameters", 2024, Sec. 4): the question's embedding, projected, is added to every visual token; a
    depthwise convolution with kernel = stride = ``size`` turns the query-conditioned tokens of each ``size`` x
    ``size`` block into one query; that query cross-attends (multi-head) to the block's tokens; the result, projected
    back to the LLM's width, is added to the block's mean.

    The mean residual is this implementation's: the paper fine-tunes the LLM with the compressor, while here the LVLM
    stays frozen, so the compressed token starts as the pooled one (``out`` is zero at initialisation, and the
    depthwise kernel a mean) — the frozen LLM reads it from the first step — and training learns what the question
    adds. Keys and values come from the visual tokens without the question, as the paper's come from the tower's
    features.
    """

    def __init__(self, hidden: int, dim: int, heads: int, size: int):
        super().__init__()
        self.size = size
        self.inp = nn.Linear(hidden, dim)
        self.text = nn.Sequential(nn.Linear(hidden, dim), nn.LayerNorm(dim, eps=1e-6))
        self.q_mlp, self.k_mlp, self.v_mlp = _mlp(dim), _mlp(dim), _mlp(dim)
        #: the depthwise convolution's kernel, one weight per channel and place in the block (a Conv2d with
        #: groups=dim, flattened), and its bias
        self.down = nn.Parameter(torch.full((dim, size * size), 1.0 / (size * size)))
        self.down_bias = nn.Parameter(torch.zeros(dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, hidden)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor, block: torch.Tensor, slot: torch.Tensor,
                blocks: int) -> torch.Tensor:
        """(blocks, hidden) what each block's compressed token adds to the block's mean. ``tokens`` (n, hidden) the
        grid's tokens in raster order, ``text`` (hidden,) the question's embedding; ``block``/``slot`` (n,) each
        token's block and place in it (:func:`~tokenprune.operators.mergers.grid_blocks`)."""
        x = self.inp(tokens)
        q = self.q_mlp(x + self.text(text)) * self.down[:, slot].T
        q = q.new_zeros(blocks, q.shape[1]).index_add(0, block, q) + self.down_bias  # the strided depthwise conv
        width = self.size * self.size
        keys = x.new_zeros(blocks, width, x.shape[1]).index_put((block, slot), self.k_mlp(x))
        values = x.new_zeros(blocks, width, x.shape[1]).index_put((block, slot), self.v_mlp(x))
        absent = torch.ones(blocks, width, dtype=torch.bool, device=x.device).index_put(
            (block, slot), torch.zeros((), dtype=torch.bool, device=x.device))  # edge blocks hold fewer tokens
        out, _ = self.attn(q[:, None], keys, values, key_padding_mask=absent, need_weights=False)
        return self.out(out[:, 0])


@register_operator("quecc")
class QueCC(LearnedOperator, Merger):
    """Query-conditioned convolutional cross-attention compression (QueCC; Li et al., "Inference Optimal VLMs Need
    Fewer Visual Tokens and More Parameters", 2024): each ``size`` x ``size`` block of a tile's visual tokens
    becomes one token, computed from the block and the question by a small trained network
    (:class:`QueCCNetwork`) — the paper's regime of very few tokens (1 to 16 for LLaVA's 24x24 grid: ``size`` 24 to
    6). The block's top-left token carries it, with the block's size, as ``grid_pool``'s does; every tile is
    compressed on its own grid; visual tokens in no tile stay. The question is the mean input embedding of the text
    after the last visual token (the prompt's instruction). A learned operator: ``weights`` names its trained file
    (``tokenprune train-operator``). The stage takes no scorer or selector; it runs before the LLM (``layer: 0``).
    """

    selects = True
    needs_tiles = True
    shape_params = ("size", "dim", "heads")
    objective = "answer"  # the LVLM's answer loss through the compressed tokens, as the paper trains it

    @dataclass
    class Params:
        size: int = 6  # side of a compressed block, in tokens (24x24 -> 16 tokens at 6)
        dim: int = 128  # width of the compressor's attention
        heads: int = 4
        weights: str = ""  # a shipped name (experiments/presets/weights/NAME.safetensors), a .safetensors path, or init
        sha256: str = ""  # the weights file's digest (filled in when the pipeline is built; given: checked)

        def __post_init__(self) -> None:
            for name in ("size", "dim", "heads"):
                if getattr(self, name) < 1:
                    raise ParamError(name, f"must be >= 1, got {getattr(self, name)}")
            if self.dim % self.heads:
                raise ParamError("dim", f"must be a multiple of heads={self.heads}, got {self.dim}")

    def __init__(self, params: Any = None, key: str | None = None):
        super().__init__(params, key)
        self.init_learned()

    def build_network(self, hidden_size: int) -> nn.Module:
        return QueCCNetwork(hidden_size, self.params.dim, self.params.heads, self.params.size)

    def expected_kept_in_grid(self, rows: int, cols: int) -> int:
        k = self.params.size
        return -(-rows // k) * -(-cols // k)

    def expected_kept(self, num_visual: int) -> int:
        side = int(round(num_visual ** 0.5))
        if side * side != num_visual:
            raise NotImplementedError(f"quecc needs the grid shape for {num_visual} visual tokens (not a square)")
        return self.expected_kept_in_grid(side, side)

    def forward(self, state: TokenState) -> TokenState:
        if self.network is None:
            raise RuntimeError("quecc: its network is not built (attach the pipeline to a model, or call bind())")
        if state.tiles is None or state.tile_grids is None:
            raise RuntimeError("quecc needs the tokens' tiles (the runtime sets state.tiles)")
        net, k = self.network, self.params.size
        hidden, sizes = state.hidden.clone(), state.sizes.clone().float()
        keep = ~state.visual_mask.clone()
        delta = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        dev = next(net.parameters()).device
        for b in range(state.batch_size):
            vis = state.visual_mask[b] & state.valid_mask[b]
            keep[b] |= vis & (state.tiles[b] < 0)
            rows_q = state.signals.query_rows("instruction", b)
            if rows_q.numel() == 0:  # an image after the text: the question is what text there is
                rows_q = state.signals.query_rows("text", b)
            text = state.hidden[b, rows_q].float().mean(0) if rows_q.numel() else \
                torch.zeros(hidden.shape[-1], device=hidden.device)
            for rows, cols, idx in whole_tiles(state, b, vis, "quecc"):
                block, slot, first = grid_blocks(rows, cols, k, idx.device)
                added = net(state.hidden[b, idx].float().to(dev), text.to(dev), block.to(dev), slot.to(dev),
                            first.numel())
                others = first[block] != torch.arange(rows * cols, device=idx.device)
                targets = idx[first]
                merge_into(hidden[b], sizes[b], targets, idx[others], block[others], state.merge_record(b))
                delta[b, targets] = added.to(delta.device)
                keep[b, targets] = True
        state.hidden = (hidden.float() + delta).to(hidden.dtype)
        state.sizes, state.keep_mask = sizes, keep
        return state


class AttentionPredictorNetwork(nn.Module):
    """AttentionPredictor's model (Yang et al., "AttentionPredictor: Temporal Pattern Matters for Efficient LLM
    Inference", 2025): the attention history of one head — its last ``T`` query rows over the ``N`` cached entries,
    a (T, N) image — through two 3x3 convolutions (1 -> 16 -> 32 channels, ReLU), averaged over time, and a 1x1
    convolution to one value per entry: the logits of the next step's attention over the entries. The history is
    scaled by ``N`` (a uniform row is all ones) so the same weights serve caches of any length."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.head = nn.Conv1d(32, 1, kernel_size=1)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """``history`` (M, T, N) attention rows (M heads or samples) -> (M, N) logits of the next row."""
        x = history[:, None] * history.shape[-1]
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=2))[:, 0]


def max_pool_entries(attn: torch.Tensor, block: int) -> torch.Tensor:
    """(..., N) -> (..., ceil(N / block)): the largest value of each run of ``block`` entries (the last run holds
    what is left), AttentionPredictor's compression of the key axis."""
    if block == 1:
        return attn
    pad = (-attn.shape[-1]) % block
    return F.pad(attn, (0, pad)).unflatten(-1, (-1, block)).amax(-1)


@register_operator("attention_predictor")
class AttentionPredictor(LearnedOperator, Scorer):
    """The next decoding step's attention, predicted from the attention history by a small trained convolutional
    network (AttentionPredictor; Yang et al., "AttentionPredictor: Temporal Pattern Matters for Efficient LLM
    Inference", 2025): per head, the last ``history`` query rows of the prompt over the layer's entries (max-pooled
    over runs of ``block`` entries) go through :class:`AttentionPredictorNetwork`; each head's prediction becomes a
    distribution (softmax), the heads are averaged, and each entry scores its run's value. At a ``kv_cache`` stage
    the cache then keeps the entries the first decoding step is predicted to attend to most. A learned operator
    (``weights``; ``tokenprune train-operator``, objective ``attention``)."""

    shape_params = ()
    objective = "attention"  # the predicted next-step attention against the observed one
    min_layer = 1  # at a decoder layer, the history is the previous layer's attention (a kv_cache stage: its own)

    @dataclass
    class Params(ScorerParams):
        history: int = 8  # query rows of attention history (the prompt's last)
        block: int = 1  # entries max-pooled into one before the network (16 in the paper's long contexts)
        weights: str = ""  # a shipped name (experiments/presets/weights/NAME.safetensors), a .safetensors path, or init
        sha256: str = ""  # the weights file's digest (filled in when the pipeline is built; given: checked)

        def __post_init__(self) -> None:
            for name in ("history", "block"):
                if getattr(self, name) < 1:
                    raise ParamError(name, f"must be >= 1, got {getattr(self, name)}")

    def __init__(self, params: Any = None, key: str | None = None):
        super().__init__(params, key)
        self.init_learned()

    def build_network(self, hidden_size: int) -> nn.Module:
        return AttentionPredictorNetwork()

    def history_rows(self, state: TokenState, sample: int) -> torch.Tensor:
        """(H, T, N) the attention of the sample's last ``history`` real query rows, per head (the history the
        network reads)."""
        rows = state.signals.query_rows("all", sample)[-self.params.history:]
        return state.signals.attention_probs(sample, rows)

    def predict_rows(self, history: torch.Tensor) -> torch.Tensor:
        """(M, T, N) histories (heads) -> (M, N) each one's predicted next-step attention: a softmax over the pooled
        entries, each entry given its run's value."""
        dev = next(self.network.parameters()).device
        pooled = max_pool_entries(history.float().to(dev), self.params.block)
        probs = torch.softmax(self.network(pooled), dim=-1)
        return probs.repeat_interleave(self.params.block, -1)[:, :history.shape[-1]]

    def predict(self, history: torch.Tensor) -> torch.Tensor:
        """(H, T, N) history -> (N,) the predicted next-step attention, averaged over heads."""
        return self.predict_rows(history).mean(0)

    def score(self, state: TokenState) -> torch.Tensor:
        if self.network is None:
            raise RuntimeError("attention_predictor: its network is not built (attach the pipeline to a model)")
        out = torch.zeros(state.visual_mask.shape, dtype=torch.float32, device=state.visual_mask.device)
        for b in range(state.batch_size):
            valid = state.valid_mask[b]  # the sample's entries (padding is no part of its history)
            out[b, valid] = self.predict(self.history_rows(state, b)[:, :, valid.to(state.hidden.device)]).to(out.device)
        return out
