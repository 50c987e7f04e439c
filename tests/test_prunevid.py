"""PruneVid (``prunevid_merge`` and the ``prunevid`` preset): the time segments' refinement, the static cells and
the DPC-kNN clusters, each by hand on small clips; the preset on tiny Qwen clips through generate()
(tests/test_video.py)."""

import math

import torch
from test_fastvid import clip_state

from tokenprune.core.registry import registered_operators


def merger(**params):
    cls = registered_operators()["prunevid_merge"]
    return cls(cls.parse_params(params))


def test_segments_keep_each_clusters_longest_runs_and_give_the_rest_to_the_longer_neighbour():
    """[0 0 1 0 0 2 2 1]: cluster 0 keeps both its runs of two, cluster 1 has only single frames (none kept), 2 keeps
    its run; frame 2 joins the tie's left (0), frame 7 its left (2): segments of 5 and 3. [1 0 0 2]: the single
    frames join their only neighbours: one segment of 4."""
    from tokenprune.operators.mergers import contiguous_segments

    assert contiguous_segments([0, 0, 1, 0, 0, 2, 2, 1]) == [5, 3]
    assert contiguous_segments([1, 0, 0, 2]) == [4]
    assert contiguous_segments([3, 3, 1, 1, 1]) == [2, 3]


def test_static_cells_become_their_mean_and_dynamic_ones_stay_by_hand():
    """Two frames of three cells, one segment: cell 0 repeats (similarity 1) and cell 2 nearly (0.9), both above
    tau 0.8, so each becomes one token, its two frames' mean, carried by frame 0 (size 2); cell 1 flips
    (similarity -1): its token stays in each frame."""
    e = torch.eye(3)
    c2 = torch.tensor([0.9, 0.0, math.sqrt(1 - 0.81)])  # cosine 0.9 with e0
    state = clip_state([[e[1], e[2], e[0]], [e[1], -e[2], c2]])
    out = merger(min_tokens=14)(state)
    assert out.keep_mask[0].nonzero().flatten().tolist() == [0, 1, 2, 4]
    assert torch.allclose(out.hidden[0, 0], e[1]) and torch.allclose(out.hidden[0, 2], (e[0] + c2) / 2)
    assert out.sizes[0].tolist() == [2, 1, 2, 1, 1, 1]
    assert out.merged_into[0].tolist() == [-1, -1, -1, 0, -1, 2]


def test_dynamic_tokens_are_clustered_by_density_peaks_by_hand():
    """One frame (an image) of four tokens at 0, 0.1, 5 and 5.2 on a line, more than min_tokens 2, cluster 0.5:
    two DPC-kNN clusters (knn 2, itself included). Densities exp(-0.005) (0 and 0.1; the tie goes to 0) and
    exp(-0.02); centre scores 5.2 e^-0.005, 0.1 e^-0.005, 4.9 e^-0.02, 0.2 e^-0.02: centres 0 and 5, each the mean
    of its cluster."""
    x = [torch.tensor([v]) for v in (0.0, 0.1, 5.0, 5.2)]
    out = merger(min_tokens=2, cluster=0.5, knn=2)(clip_state([x]))
    assert out.keep_mask[0].nonzero().flatten().tolist() == [0, 2]
    assert torch.allclose(out.hidden[0, [0, 2], 0], torch.tensor([0.05, 5.1]))


def test_attention_rows_max_is_the_largest_over_the_query_rows_by_hand():
    """Uniform causal attention over [image, image, text, text]: the text rows pay token 0 1/3 and 1/4; their mean
    is 7/24, their max (PruneVid's reduction) 1/3."""
    from tokenprune.core.attention import LogitsSource
    from tokenprune.core.state import TokenState

    state = TokenState.from_tensors(torch.zeros(1, 4, 8), torch.tensor([[True, True, False, False]]),
                                    attention=LogitsSource(torch.zeros(1, 2, 4, 4)))
    got_max = state.signals.attention(queries="text", heads="max", rows="max")[0]
    got_mean = state.signals.attention(queries="text", heads="max")[0]
    assert torch.allclose(got_max, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1 / 4]))
    assert torch.allclose(got_mean, torch.tensor([7 / 24, 7 / 24, 7 / 24, 1 / 8]))
