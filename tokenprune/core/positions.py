"""Renumbering multi-axis rotary positions (M-RoPE) after tokens are removed.

With 1-D positions, ``positions: renumber`` makes the kept tokens contiguous. Under M-RoPE (Qwen2-VL,
Qwen2.5-VL) every token has a (temporal, height, width) position: text tokens have the same value on the
three axes, one more than the largest position before them; an image's tokens lie on its grid, from one
origin. Closing the gaps the way 1-D renumbering does would throw the grid away, so under M-RoPE renumbering
means:

- the kept tokens of one image (a run of consecutive visual tokens of the input) keep their relative
  (t, h, w) layout; the run is moved, by one amount on every axis, so that its smallest position is one more
  than the largest position before it (attention among its tokens, which RoPE makes relative, is unchanged);
- text tokens are laid contiguously after whatever precedes them, one position each on every axis;
- decoding continues right after the largest kept position, i.e. every later position moves down by the
  difference between the unpruned and the kept sequence's largest position (what the model's ``rope_deltas``
  add is kept, and this shift is subtracted).

Nothing moves when every token is kept. A one-frame image's temporal axis holds its origin on every token,
so while any of its tokens is kept the run starts where Qwen's ``get_rope_index`` would start the image after
the kept tokens before it, its kept tokens keep their grid coordinates, and the text after it moves back by
the rows and columns the run lost at its far (bottom, right) edges — in 1-D terms, by the positions the
removed tokens no longer occupy.
"""

from __future__ import annotations

import torch


def gather_axes(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(A, B, K) multi-axis positions (A, B|1, N) at the tokens ``index`` (B, K)."""
    positions = positions.expand(-1, index.shape[0], -1)
    return positions.gather(2, index[None].expand(positions.shape[0], -1, -1))


def visual_runs(visual: torch.Tensor) -> torch.Tensor:
    """(B, N) long: for each visual token, the index of its run of consecutive visual tokens in its sample
    (an image, in a family whose images are delimited by text tokens); -1 on other tokens."""
    prev = torch.nn.functional.pad(visual[:, :-1], (1, 0), value=False)
    starts = visual & ~prev
    return torch.where(visual, starts.long().cumsum(1) - 1, torch.full_like(visual, -1, dtype=torch.long))


def renumber_grid_positions(positions: torch.Tensor, runs: torch.Tensor, valid: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Renumber kept tokens' multi-axis positions as the module docstring defines.

    ``positions`` (A, B, K) the kept tokens' current positions (in order); ``runs`` (B, K) the run of each kept
    visual token (:func:`visual_runs` of the input, gathered), -1 on text; ``valid`` (B, K) real tokens (padding
    and filler slots keep their positions). Returns the new positions and (B,) one more than each sample's
    largest new position (where decoding continues).
    """
    out = positions.clone()
    nxt = torch.zeros(positions.shape[1], dtype=positions.dtype, device=positions.device)
    for b in range(positions.shape[1]):
        idx = valid[b].nonzero().flatten()
        if idx.numel() == 0:
            continue
        run = runs[b, idx]
        pos = positions[:, b, idx]  # (A, M)
        # segments: maximal stretches of consecutive kept tokens of one run (text: one stretch of text)
        cut = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
        cut[1:] = run[1:] != run[:-1]
        bounds = cut.nonzero().flatten().tolist() + [idx.numel()]
        top = int(pos[:, :bounds[1]].min()) - 1  # the first stretch starts where it started
        new = torch.empty_like(pos)
        for a, e in zip(bounds[:-1], bounds[1:]):
            if int(run[a]) < 0:
                new[:, a:e] = top + 1 + torch.arange(e - a, device=pos.device)
            else:
                new[:, a:e] = pos[:, a:e] - pos[:, a:e].min() + top + 1
            top = int(new[:, a:e].max())
        out[:, b, idx] = new
        nxt[b] = top + 1
    return out, nxt
