"""HoliTom before the LLM (``holitom_temporal``) and the ``holitom_video`` preset: the windows' dynamic programme, the
static cells, their clusters and the dynamic tokens, each by hand on small clips; the preset on tiny Qwen clips
through generate() (tests/test_video.py)."""

import torch
from test_fastvid import clip_state

from tokenprune.core.registry import registered_operators


def temporal(**params):
    cls = registered_operators()["holitom_temporal"]
    return cls(cls.parse_params(params))


def test_windows_maximise_the_static_tokens_saved_by_hand():
    """Four frames of two cells; both cells alike from frame 0 to 1, cell 0 from 1 to 2, none from 2 to 3. Window
    0-1 saves 1 x 2, 0-2 saves 2 x 1 (only cell 0 is alike across it: no more than 0-1, so not taken), 1-2 saves 1:
    windows (0, 1), (2, 2), (3, 3), saving 2."""
    from tokenprune.operators.mergers import static_windows

    alike = torch.tensor([[True, True], [True, False], [False, False]])
    assert static_windows(alike, 1024) == ([(0, 1), (2, 2), (3, 3)], 2)
    assert static_windows(alike, 1) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0)  # windows of one frame only


def test_static_cells_cluster_and_dynamic_tokens_keep_the_most_salient_by_hand():
    """Two frames of four cells: cells 0 and 1 repeat (static over the window 0-1, 2 x 1 tokens saved of 8), cells 2
    and 3 flip. retain 0.375 -> r = 0.375 x 8 / 6 = 0.5: the two static means become round(2 x 0.5) = 1 cluster,
    centred on cell 0 (the density tie goes to it, its distance is the largest) and carried by frame 0:
    0.6 e0 + 0.4 e1; each frame keeps ceil(2 x 0.5) = 1 dynamic token, its most salient (frame 0: cell 3, frame 1:
    cell 2)."""
    e = torch.eye(4)
    state = clip_state([[e[0], e[1], e[2], e[3]], [e[0], e[1], -e[2], -e[3]]],
                       salience=[0.0, 0.0, 0.1, 0.5, 0.0, 0.0, 0.7, 0.2])
    out = temporal(retain=0.375, tau=0.8, beta=0.6)(state)
    assert out.keep_mask[0].nonzero().flatten().tolist() == [0, 3, 6]
    assert torch.allclose(out.hidden[0, 0], 0.6 * e[0] + 0.4 * e[1])
    assert out.merged_into[0].tolist() == [-1, 0, -1, -1, 0, 0, -1, -1]
    assert out.sizes[0, 0] == 4
