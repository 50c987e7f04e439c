"""The shapes benchmark: a fixed, bit-identical test split, answers that follow from the drawn scene,
balanced yes/no, and the scorer's normalisation."""

import itertools
import re

import numpy as np
import pytest

from tokenprune.reference import shapes as S

TEST_DIGEST = "2c0d0d7dfdde2449eec3977c2159fba48515eb743689f49aaa4410374f9391a3"


@pytest.fixture(scope="module")
def test_items():
    return S.load_split("test")


def test_test_split_is_bit_identical(test_items):
    """Recorded once; any change to drawing, randomness or questions changes it (and the split)."""
    assert len(test_items) == 1000
    assert S.digest(test_items) == TEST_DIGEST


def test_items_are_deterministic_and_types_balanced(test_items):
    again = S.make_item("shapes-test-v1/7", "exist", 1)  # item 7: type 7 % 5, its 2nd of that type
    assert again["question"] == test_items[7]["question"]
    assert np.array_equal(np.asarray(again["image"]), np.asarray(test_items[7]["image"]))
    counts = {t: sum(it["type"] == t for it in test_items) for t in S.TYPES}
    assert counts == {t: 200 for t in S.TYPES}
    exist = [it["answer"] for it in test_items if it["type"] == "exist"]
    assert exist.count("yes") == exist.count("no") == 100


def _find(shapes, name):
    color, kind = name.split(" ")
    return [s for s in shapes if s["color"] == color and s["kind"] == kind]


def test_answers_follow_from_the_scene(test_items):
    """Recompute every answer from the recorded shapes (independently of the generator's code), and
    check each shape is drawn in its colour at its centre."""
    for it in test_items:
        shapes, q, a = it["shapes"], it["question"], it["answer"]
        px = np.asarray(it["image"])
        for s in shapes:
            assert tuple(px[s["cy"], s["cx"]]) == S.COLORS[s["color"]], (q, s)
            assert 20 <= s["size"] <= 60
        assert 1 <= len(shapes) <= 6
        if it["type"] == "color":
            kind = re.match(r"What color is the (\w+)\?", q).group(1)
            (only,) = [s for s in shapes if s["kind"] == kind]
            assert a == only["color"]
        elif it["type"] == "count":
            kind = re.match(r"How many (\w+)s are there\?", q).group(1)
            assert a == str(sum(s["kind"] == kind for s in shapes))
        elif it["type"] == "exist":
            name = re.match(r"Is there a (\w+ \w+)\?", q).group(1)
            assert a == ("yes" if _find(shapes, name) else "no")
        elif it["type"] == "position":
            m = re.match(r"Is the (\w+ \w+) (on the left or the right|at the top or the bottom)\?", q)
            (s,) = _find(shapes, m.group(1))
            if "left" in m.group(2):
                assert a == ("left" if s["cx"] < 168 else "right") and abs(s["cx"] - 168) >= 24
            else:
                assert a == ("top" if s["cy"] < 168 else "bottom") and abs(s["cy"] - 168) >= 24
        else:
            m = re.match(r"Is the (\w+ \w+) (left or right of|above or below) the (\w+ \w+)\?", q)
            (x,), (y,) = _find(shapes, m.group(1)), _find(shapes, m.group(3))
            if m.group(2) == "left or right of":
                assert a == ("left" if x["cx"] < y["cx"] else "right")
            else:
                assert a == ("above" if x["cy"] < y["cy"] else "below")


def test_half_the_no_questions_are_plausible(test_items):
    """POPE-style: the asked object's kind or colour is in the image for the plausible "no" questions."""
    nos = [it for it in test_items if it["type"] == "exist" and it["answer"] == "no"]
    plausible = 0
    for it in nos:
        color, kind = re.match(r"Is there a (\w+) (\w+)\?", it["question"]).groups()
        plausible += any(s["kind"] == kind or s["color"] == color for s in it["shapes"])
    assert plausible >= len(nos) // 2


def test_train_is_endless_and_disjoint_from_test(test_items):
    train = list(itertools.islice(S.load_split("train", seed=0), 50))
    assert len(train) == 50 and [it["type"] for it in train[:5]] == list(S.TYPES)
    test_images = {np.asarray(it["image"]).tobytes() for it in test_items}
    assert not any(np.asarray(it["image"]).tobytes() in test_images for it in train)
    other = next(iter(S.load_split("train", seed=1)))
    assert other["question"] != train[0]["question"] or not np.array_equal(np.asarray(other["image"]),
                                                                           np.asarray(train[0]["image"]))


def test_score_normalises_and_reports_per_type():
    items = [{"type": "count", "answer": "3"}, {"type": "color", "answer": "red"},
             {"type": "color", "answer": "blue"}, {"type": "exist", "answer": "no"}]
    out = S.score(["Three.", "The RED", "green", "No, there is not"], items)
    assert out == {"overall": 0.75, "per_type": {"color": 0.5, "count": 1.0, "exist": 1.0}, "n": 4}
    with pytest.raises(ValueError, match="3 predictions for 4 items"):
        S.score(["a", "b", "c"], items)


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="split 'dev'; allowed: train, test, val"):
        S.load_split("dev")
