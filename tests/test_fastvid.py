"""FastVID (``fastvid``): DySeg's cuts, STPrune's budgets, the density peaks and the merge, each by hand on small
clips; the preset on tiny Qwen clips through generate() is in tests/test_video.py."""

import math

import torch

from tokenprune.core.registry import registered_operators
from tokenprune.core.state import TokenState


def fastvid(**params):
    cls = registered_operators()["fastvid"]
    return cls(cls.parse_params(params))


def clip_state(frames: list[list[torch.Tensor]], salience: list[float] | None = None, extra: int = 0):
    """A one-sample state of a clip (frames of equal cells, 1 x cells tiles) and ``extra`` image tokens after it."""
    cells = len(frames[0])
    hidden = torch.stack([v for f in frames for v in f] + [torch.ones_like(frames[0][0])] * extra)[None]
    n = hidden.shape[1]
    state = TokenState.from_tensors(hidden, torch.ones(1, n, dtype=torch.bool), layer=0)
    state.tiles = torch.tensor([[f for f in range(len(frames)) for _ in range(cells)] + [len(frames)] * extra])
    state.tile_grids = [[(1, cells)] * len(frames) + ([(1, extra)] if extra else [])]
    state.frames = torch.tensor([[f for f in range(len(frames)) for _ in range(cells)] + [0] * extra])
    state.cells = torch.tensor([list(range(cells)) * len(frames) + list(range(extra))])
    if salience is not None:
        sal = torch.tensor([salience + [0.0] * extra])
        state.signals.vision_cls_attention = lambda **kw: sal
    return state


def at_angles(*cosines):
    """2-D unit vectors whose consecutive cosines are ``cosines``."""
    angle, out = 0.0, [torch.tensor([1.0, 0.0])]
    for c in cosines:
        angle += math.acos(c)
        out.append(torch.tensor([math.cos(angle), math.sin(angle)]))
    return out


def test_dyseg_cuts_below_tau_and_at_the_least_similar_transitions():
    """Consecutive frame similarities 0.9, 0.5, 0.99, 0.2; segments 2, tau 0.6: cut after frames 1 and 3 (below
    tau; 3 is also the least similar) -> [0, 1], [2, 3], [4]; with tau 0 only the least similar: [0-3], [4]; with
    segments 3 and tau 0: the two least similar, after 1 and 3."""
    vecs = at_angles(0.9, 0.5, 0.99, 0.2)
    state = clip_state([[v, v] for v in vecs])
    frames = [torch.tensor([2 * f, 2 * f + 1]) for f in range(5)]

    def cut(**params):
        return [[int(f[0]) // 2 for f in seg] for seg in fastvid(**params).segments_of(state.hidden[0], frames)]

    assert cut(segments=2, tau=0.6) == [[0, 1], [2, 3], [4]]
    assert cut(segments=2, tau=0.0) == [[0, 1, 2, 3], [4]]
    assert cut(segments=3, tau=0.0) == [[0, 1], [2, 3], [4]]


def test_stprune_budgets_by_hand():
    """Six frames of 8 cells, retention 0.5 (4 a frame: 24), context 0.4 (int(9.6) = 9 contextual, 15 salient).
    Frames 0=1 and 3=4 repeat (similarity 1 >= ignore), so the representatives are frames 1, 2, 4, 5: salient 15
    shared 4, 4, 4, 3; with anchor_every 2 the anchors, counted from the end, are frames 5 and 2, the contextual 9
    shared 5, 4 and capped at half a frame (4): frame 5 gets 4 (and 3 salient, its share), frame 2 gets 4 (and 4
    salient, at most 8 - 4)."""
    e = torch.eye(4)
    vecs = [e[0], e[0], e[1], e[2], e[2], e[3]]
    state = clip_state([[v] * 8 for v in vecs])
    seg = [torch.arange(8 * f, 8 * f + 8) for f in range(6)]
    op = fastvid(retention=0.5, context=0.4, anchor_every=2, ignore=0.95)
    assert op.budgets(state.hidden[0], seg) == ([0, 4, 4, 0, 4, 3], [0, 0, 4, 0, 0, 4])


def test_density_peak_scores_by_hand():
    """Points 0, 1, 3 on a line, knn 2 (itself included): densities exp(-0.5), exp(-0.5), exp(-2); point 0 is the
    denser of the tie, so its distance is the largest (3), point 1's is 1 (to point 0), point 2's 2 (to point 1)."""
    from tokenprune.operators.mergers import density_peak_scores

    got = density_peak_scores(torch.tensor([[0.0], [1.0], [3.0]]), knn=2)
    want = torch.tensor([3 * math.exp(-0.5), 1 * math.exp(-0.5), 2 * math.exp(-2)])
    assert torch.allclose(got, want)


def test_fastvid_keeps_salient_and_contextual_tokens_and_merges_the_rest_by_hand():
    """Two frames of four cells, one segment (segments 1, tau 0), dissimilar frames (two representatives):
    retention 1 (8 tokens), context 0.25 (2 contextual, 6 salient: 3 + 3). The anchor is frame 1 (counted from the
    end), 2 contextual, so 2 salient there (at most 4 - 2). Frame 0 keeps its 3 most salient cells (0, 1, 2),
    frame 1 its 2 most salient (3, 2) and its other two as contextual; frame 0's cell 3 (e3) is merged into the
    contextual token most like it (frame 1 cell 0, 2 e3): 0.6 x 2 e3 + 0.4 x e3. The image token after stays."""
    e = torch.eye(4)
    frames = [[e[0], e[1], e[2], e[3]], [2 * e[3], e[0], -e[1], -e[2]]]
    state = clip_state(frames, salience=[0.4, 0.3, 0.2, 0.1, 0.1, 0.2, 0.3, 0.4], extra=1)
    out = fastvid(retention=1.0, context=0.25, segments=1, tau=0.0, anchor_every=2)(state)
    assert out.keep_mask[0].nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert torch.allclose(out.hidden[0, 4], 1.6 * e[3])
    assert torch.equal(out.hidden[0, 5], e[0])  # nothing merged into it: unchanged
    assert torch.equal(out.hidden[0, :3], torch.stack(frames[0][:3]))
