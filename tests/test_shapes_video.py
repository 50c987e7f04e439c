"""The video benchmark: bit-identical splits, balanced types, and every answer checked against the frames' pixels
(each shape's colour is unique in its clip, so a colour's pixels are that shape)."""

import re

import numpy as np
import pytest

from tokenprune.reference import shapes_video as V
from tokenprune.reference.shapes import COLORS, KINDS

TEST_DIGEST = "b005eff4b2f4c106c401f21472a01f39579cf7f75386483ba628e56f11f2b88a"


def color_masks(frame) -> dict[str, np.ndarray]:
    a = np.asarray(frame, dtype=np.int32)
    return {c: (a == np.array(rgb)).all(-1) for c, rgb in COLORS.items()}


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def kind_of(item, color: str) -> str:
    return next(s["kind"] for f in item["events"] for s in f if s["color"] == color)


def check_against_pixels(item) -> None:
    frames = [color_masks(f) for f in item["video"]]
    present = [{c for c, m in f.items() if m.any()} for f in frames]
    q, a, t = item["question"], item["answer"], item["type"]
    named = re.findall(r"\b(" + "|".join(COLORS) + r") (" + "|".join(KINDS) + r")\b", q)
    if t == "moved":
        movers = [c for c in present[0] & present[-1] if centroid(frames[0][c]) != centroid(frames[-1][c])]
        assert len(movers) == 1 and kind_of(item, movers[0]) == a
    elif t == "direction":
        (color, _), = named
        (x0, y0), (x1, y1) = centroid(frames[0][color]), centroid(frames[-1][color])
        dx, dy = x1 - x0, y1 - y0
        assert a == (("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up"))
        assert max(abs(dx), abs(dy)) >= 60
    elif t == "appeared":
        new = present[-1] - present[0]
        assert len(new) == 1 and kind_of(item, new.pop()) == a
    elif t == "order":
        (c1, _), (c2, _) = named
        first = {c: min(i for i, p in enumerate(present) if c in p) for c in (c1, c2)}
        assert first[c1] != first[c2]
        assert kind_of(item, min(first, key=first.get)) == a
    elif t == "duration":
        (color, _), = named
        assert a == str(sum(color in p for p in present)) and int(a) < V.FRAMES
    else:  # pragma: no cover
        raise AssertionError(t)


@pytest.fixture(scope="module")
def test_items():
    return V.load_split("test")


def test_the_test_split_is_bit_identical(test_items):
    assert len(test_items) == 500
    assert V.digest(test_items) == TEST_DIGEST


def test_every_answer_follows_from_the_frames(test_items):
    for item in test_items[:100]:
        assert len(item["video"]) == V.FRAMES and item["video"][0].size == (V.SIZE, V.SIZE)
        check_against_pixels(item)


def test_types_are_balanced_and_answers_vary(test_items):
    types = [it["type"] for it in test_items]
    assert {t: types.count(t) for t in V.TYPES} == {t: 100 for t in V.TYPES}
    for t in V.TYPES:
        answers = [it["answer"] for it in test_items if it["type"] == t]
        top = max(answers.count(x) for x in set(answers))
        assert top / len(answers) < 0.5, (t, top)  # no answer a prior could bank on


def test_splits_are_disjoint_and_train_is_endless():
    val = V.load_split("val", size=20)
    train = V.load_split("train", seed=3)
    first = [next(train) for _ in range(20)]
    assert {it["question"] + V.digest([it]) for it in val}.isdisjoint({it["question"] + V.digest([it]) for it in first})
    with pytest.raises(ValueError, match="split 'dev'; allowed: train, test, val"):
        V.load_split("dev")


def test_scoring_is_the_image_benchmarks():
    items = V.load_split("val", size=10)
    preds = [it["answer"] for it in items]
    preds[0] = "nothing"
    assert V.score(preds, items)["overall"] == 0.9
