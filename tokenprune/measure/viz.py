"""Looking at attention: text→image attention on the image's patch grid, kept/pruned masks, and attention shift.

Everything here reads a stock model through its adapter, the way the pipelines do: the attention rows are
recomputed from each chosen layer's input with the layer's own projections (no eager attention, no
``output_attentions``), so a map matches what an operator at the next layer's site would score.

- :func:`image_panels` — where one sample's visual tokens sit: LLaVA-1.5's square grid, LLaVA-NeXT's base
  tile plus its anyres grid (newline tokens left blank), Qwen2-VL's per-image grid.
- :func:`text_to_image_attention` — per layer, the attention that chosen query tokens pay each visual
  token (heads averaged, maxed, or a list of heads), for one sample.
- :func:`plot_attention` / :func:`plot_kept` / :func:`plot_merged` — the values (attention, kept or pruned,
  merged groups coloured by the token they merged into) upsampled onto the image and blended over it;
  log scaling and attention-sink suppression; matplotlib figures (save with ``fig.savefig``, log with
  :func:`log_figure`).
- :func:`attention_shift` — FEATHER's statistic: the mean image row of the top-scored visual tokens
  against a uniform choice, per layer, with and without a shift correction (``rope_free``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenprune.adapters import get_adapter
from tokenprune.adapters.base import layer_hidden
from tokenprune.core.registry import build_operator
from tokenprune.core.state import TokenState
from tokenprune.runtime.sources import LayerAttentionSource

HEADS = ("mean", "max")


@dataclass
class Panel:
    """One image grid of a sample's visual tokens.

    ``name``: ``image`` (LLaVA-1.5, Qwen2-VL), ``base`` or ``anyres`` (LLaVA-NeXT). ``cells`` (rows, cols)
    long: for each grid cell, the index of its visual token among the sample's visual tokens (in sequence
    order), or -1 (LLaVA-NeXT's newline tokens have no cell; they are skipped).
    """

    name: str
    cells: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.cells.shape)

    def fill(self, values: torch.Tensor) -> np.ndarray:
        """(rows, cols) float array of ``values`` (one per visual token) on the grid; NaN on empty cells."""
        v = values.detach().float().cpu()
        out = torch.full(self.cells.shape, float("nan"))
        on = self.cells >= 0
        out[on] = v[self.cells[on]]
        return out.numpy()


def image_panels(model, inputs: dict, sample: int = 0) -> list[Panel]:
    """The panels of ``sample``'s visual tokens (one image per sample), as the model's adapter lays them out."""
    return [Panel(name, cells) for name, cells in get_adapter(model).image_panels(inputs, sample)]


@torch.no_grad()
def text_to_image_attention(model, inputs: dict, layers: list[int], queries: str = "last",
                            heads: str | list[int] = "mean", sample: int = 0, rotary: bool = True) -> dict[int, torch.Tensor]:
    """{layer: (V,) attention of ``queries`` (a query set: last, instruction, text, ...) over ``sample``'s V
    visual tokens at that layer}, query rows averaged; heads reduced by ``mean``/``max`` or averaged over a
    list of head indices. ``rotary=False`` scores without the rotary embedding (the ``rope_free`` shift).
    The rows are softmaxed over every key the query may see (causal, no padding), then cut to the visual
    columns, so they show the share of the row's attention each visual token gets."""
    adapter = get_adapter(model)
    bad = [layer for layer in layers if not 0 <= layer < adapter.num_layers]
    if bad:
        raise ValueError(f"layers: {bad[0]} is not a decoder layer of this model (0..{adapter.num_layers - 1})")
    if isinstance(heads, str) and heads not in HEADS:
        raise ValueError(f"heads={heads!r}; allowed: {', '.join(HEADS)} or a list of head indices")
    captured: dict[int, tuple[torch.Tensor, Any]] = {}

    def hook(layer):
        def grab(module, args, kwargs):
            hidden = layer_hidden(args, kwargs)
            captured[layer] = (hidden, kwargs.get("position_embeddings"))
        return grab

    handles = [adapter.layers[layer].register_forward_pre_hook(hook(layer), with_kwargs=True) for layer in layers]
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    ids = inputs["input_ids"]
    visual = adapter.visual_mask(ids)
    valid = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(visual)
    out = {}
    for layer in layers:
        hidden, pe = captured[layer]
        b, n = visual.shape
        idx = torch.arange(n).expand(b, n)
        state = TokenState(hidden=hidden, visual_mask=visual, valid_mask=valid, positions=idx, source_index=idx,
                           sizes=torch.ones(b, n), layer=layer + 1)
        state.signals.source = LayerAttentionSource(adapter, layer, hidden, pe, valid)
        rows = state.signals.query_rows(queries, sample)
        if rows.numel() == 0:
            raise ValueError(f"sample {sample} has no {queries!r} query rows")
        if not rotary:
            state.shifts.append(build_operator("rope_free"))
        probs = state.signals.attention_probs(sample, rows)  # (H, Q, N)
        if isinstance(heads, str):
            per_head = probs.mean(dim=1)  # (H, N)
            att = per_head.mean(0) if heads == "mean" else per_head.max(0).values
        else:
            att = probs[list(heads)].mean(dim=(0, 1))
        out[layer] = att[visual[sample]].cpu()
    return out


def display_values(values: torch.Tensor, log: bool = False, sink_quantile: float | None = None) -> torch.Tensor:
    """Values prepared for display: attention sinks (values above the ``sink_quantile`` quantile) clipped to
    it, so a few massive tokens do not wash out the map; then ``log10`` (of values floored at 1e-8)."""
    v = values.detach().float().clone()
    if sink_quantile is not None:
        if not 0.0 < sink_quantile < 1.0:
            raise ValueError(f"sink_quantile must be in (0, 1), got {sink_quantile}")
        v = v.clamp(max=float(torch.quantile(v, sink_quantile)))
    if log:
        v = v.clamp_min(1e-8).log10()
    return v


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a (rows, cols) grid to (height, width) (NaN stays NaN)."""
    rows, cols = grid.shape
    r = np.minimum((np.arange(height) * rows) // height, rows - 1)
    c = np.minimum((np.arange(width) * cols) // width, cols - 1)
    return grid[r][:, c]


def plot_attention(image, values: torch.Tensor, panels: list[Panel], title: str = "", log: bool = False,
                   sink_quantile: float | None = None, alpha: float = 0.6, cmap: str = "inferno"):
    """A figure with one axis per panel: ``values`` (one per visual token) upsampled onto ``image`` (PIL or
    array; ``None`` draws the grid alone) and blended over it."""
    import matplotlib.pyplot as plt

    v = display_values(values, log=log, sink_quantile=sink_quantile)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    img = None if image is None else np.asarray(image)
    lo, hi = float(np.nanmin(v.numpy())), float(np.nanmax(v.numpy()))
    for ax, panel in zip(axes[0], panels):
        grid = panel.fill(v)
        if img is not None:
            ax.imshow(img)
            ax.imshow(_upsample(grid, img.shape[0], img.shape[1]), alpha=alpha, cmap=cmap, vmin=lo, vmax=hi)
        else:
            ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(f"{panel.name} {panel.shape[0]}x{panel.shape[1]}", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def kept_values(model, inputs: dict, kept: list[int], sample: int = 0) -> torch.Tensor:
    """(V,) 1.0 on ``sample``'s visual tokens in ``kept`` (input-frame indices, as ``pipeline.trace[i].kept[b]``
    lists them), 0.0 on the pruned ones."""
    visual = get_adapter(model).visual_mask(inputs["input_ids"])[sample]
    positions = visual.nonzero().flatten()
    keep = torch.zeros(visual.shape[0], dtype=torch.bool)
    keep[torch.tensor(kept, dtype=torch.long)] = True
    return keep[positions].float()


def plot_kept(image, model, inputs: dict, kept: list[int], sample: int = 0, title: str = "", alpha: float = 0.55):
    """The kept (bright) and pruned (dark) visual tokens of one stage drawn over the image."""
    return plot_attention(image, kept_values(model, inputs, kept, sample), image_panels(model, inputs, sample),
                          title=title, alpha=alpha, cmap="gray")


def merge_groups(model, inputs: dict, trace, sample: int = 0) -> torch.Tensor:
    """(V,) group number of each of ``sample``'s visual tokens after the stage ``trace`` (a ``StageTrace``): each
    kept token its own group, a merged token its target's, a dropped (unmerged) token NaN. Groups are
    numbered in token order and spread over 20 colours (``tab20``) so neighbours differ."""
    visual = get_adapter(model).visual_mask(inputs["input_ids"])[sample]
    positions = visual.nonzero().flatten().tolist()
    kept = set(trace.kept[sample])
    merged = trace.merged_into[sample] if trace.merged_into else {}
    group = {}
    for i in positions:
        if i in kept:
            group[i] = (len(group) * 7) % 20  # 7 is prime to 20: consecutive groups get distant colours
    return torch.tensor([float(group[i]) if i in group else float(group[merged[i]]) if merged.get(i) in group
                         else float("nan") for i in positions])


def plot_merged(image, model, inputs: dict, trace, sample: int = 0, title: str = "", alpha: float = 0.7):
    """Merged groups drawn over the image, each coloured like the kept token it merged into (dropped: clear)."""
    return plot_attention(image, merge_groups(model, inputs, trace, sample), image_panels(model, inputs, sample),
                          title=title, alpha=alpha, cmap="tab20")


def attention_shift(model, inputs: dict, layers: list[int], keep: float = 0.25, queries: str = "last",
                    sample: int = 0) -> list[dict[str, float]]:
    """Per layer, the mean normalised image row (0 = top, 1 = bottom) of the ``keep`` share of visual tokens
    that ``queries`` attend to most, with RoPE (``rotary``) and without it (``rope_free``), and of a uniform
    choice (every token: ``uniform``). FEATHER (Endo et al., ICCV 2025) reports FastV's choice sitting at about
    80% of the image height on LLaVA-1.5 (RoPE's long-term decay favours the last rows); a correction that
    removes the shift brings ``rope_free`` back towards ``uniform``. Uses the sample's first panel."""
    panel = image_panels(model, inputs, sample)[0]
    rows = panel.cells.shape[0]
    row_of = torch.full((int(panel.cells.max()) + 1,), -1.0)
    for r in range(rows):
        on = panel.cells[r] >= 0
        row_of[panel.cells[r][on]] = r / max(rows - 1, 1)
    in_panel = row_of >= 0
    with_rope = text_to_image_attention(model, inputs, layers, queries, sample=sample)
    without = text_to_image_attention(model, inputs, layers, queries, sample=sample, rotary=False)
    k = max(1, int(round(keep * int(in_panel.sum()))))
    stats = []
    for layer in layers:
        entry = {"layer": layer, "uniform": float(row_of[in_panel].mean())}
        for name, att in (("rotary", with_rope[layer]), ("rope_free", without[layer])):
            a = att[: row_of.numel()].masked_fill(~in_panel, float("-inf"))
            top = torch.sort(a, descending=True, stable=True).indices[:k]
            entry[name] = float(row_of[top].mean())
        stats.append(entry)
    return stats


def plot_attention_shift(stats: list[dict[str, float]], title: str = "attention shift"):
    """Mean row of the top-scored tokens per layer, with and without RoPE, against a uniform choice."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    layers = [s["layer"] for s in stats]
    for key, style in (("rotary", "o-"), ("rope_free", "s--"), ("uniform", ":")):
        ax.plot(layers, [s[key] for s in stats], style, label=key)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean image row of the kept tokens (0 top, 1 bottom)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def log_figure(fig, key: str, run: Any = None) -> None:
    """Log ``fig`` to W&B under ``key`` (the active run, or ``run``)."""
    import wandb

    target = run if run is not None else wandb.run
    if target is None:
        raise RuntimeError("no active W&B run: call wandb.init(...) first or pass run=")
    target.log({key: wandb.Image(fig)})
