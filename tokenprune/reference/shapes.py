"""``shapes``: a visual question answering benchmark whose answers depend on image detail.

Images are 336×336 RGB with 1–6 small shapes (circle, square, triangle, diamond, cross; seven
colours; 20–60 px; anywhere, never overlapping) on a plain or textured background. Every question
has a one-word answer, in five types:

- ``color``: "What color is the triangle?" (a kind that appears exactly once);
- ``count``: "How many circles are there?" (0–6, as digits);
- ``exist``: "Is there a red square?" — balanced yes/no, and half of the "no" questions are
  *plausible*, POPE-style: the kind is in the image in another colour, or the colour on another kind;
- ``position``: "Is the blue cross on the left or the right?" / "... at the top or the bottom?";
- ``relation``: "Is the green circle above or below the red square?" / "... left or right of ...".

Everything is drawn with integer arithmetic on numpy arrays and every random choice comes from
``random.Random(seed_string).random()``, whose stream Python keeps stable, so a split is
bit-identical on every machine (``tests/test_shapes.py`` checks the digest of ``test``).

>>> items = load_split("test")             # 1000 items: {image, question, answer, type}
>>> score(["red"] * len(items), items)     # {"overall": ..., "per_type": {...}, "n": 1000}
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 336
KINDS = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
TYPES = ("color", "count", "exist", "position", "relation")
#: Items per split (the test split is fixed; train is drawn on the fly).
SPLIT_SIZES = {"test": 1000, "val": 500}
_SPLIT_SEEDS = {"test": "shapes-test-v1", "val": "shapes-val-v1"}
_MIN_OFFSET = 24  # px: a position or relation is only asked when the answer is this clear


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: int
    cy: int
    size: int  # side of the bounding box, px

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


class Rng:
    """Deterministic choices from ``random.Random(seed).random()`` only (stable across Python versions)."""

    def __init__(self, seed: str):
        self._r = random.Random(seed)

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def between(self, lo: int, hi: int) -> int:  # inclusive
        return lo + self.below(hi - lo + 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, p: float) -> bool:
        return self._r.random() < p


def shape_mask(shape: Shape) -> tuple[np.ndarray, int, int]:
    """(mask, top, left) of a shape's pixels within its bounding box, by integer geometry."""
    s = shape.size
    y, x = np.mgrid[0:s, 0:s]
    # coordinates doubled so the centre (s-1)/2 is an integer: u, v in [-(s-1), s-1]
    u, v = 2 * x - (s - 1), 2 * y - (s - 1)
    r = s - 1
    if shape.kind == "circle":
        m = u * u + v * v <= r * r
    elif shape.kind == "square":
        m = (np.abs(u) <= r) & (np.abs(v) <= r)
    elif shape.kind == "diamond":
        m = np.abs(u) + np.abs(v) <= r
    elif shape.kind == "triangle":  # apex up: |u| <= (v + r) / 2
        m = 2 * np.abs(u) <= v + r
    elif shape.kind == "cross":
        arm = r // 3
        m = ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    else:  # pragma: no cover - KINDS is closed
        raise ValueError(shape.kind)
    return m, shape.cy - s // 2, shape.cx - s // 2


def background(rng: Rng, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) int32: a plain grey, or faintly textured, background drawn from ``rng``."""
    base = np.array([rng.between(20, 70)] * 3, dtype=np.int32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if rng.chance(0.5):  # texture: faint diagonal stripes or a checkerboard
        y, x = np.mgrid[0:size, 0:size]
        period = rng.between(8, 24)
        pattern = ((x + y) // period) % 2 if rng.chance(0.5) else ((x // period) + (y // period)) % 2
        img += (pattern[..., None] * rng.between(6, 18)).astype(np.int32)
    return img


#: Shape sizes of the benchmark, px (training curricula may draw larger ones).
SIZES = (20, 60)


def _place(rng: Rng, n: int, kinds: tuple[str, ...] = KINDS, sizes: tuple[int, int] = SIZES) -> list[Shape]:
    shapes: list[Shape] = []
    tries = 0
    while len(shapes) < n and tries < 2000:
        tries += 1
        size = rng.between(*sizes)
        half = size // 2 + 2
        cx, cy = rng.between(half, SIZE - 1 - half), rng.between(half, SIZE - 1 - half)
        if any((cx - o.cx) ** 2 + (cy - o.cy) ** 2 < ((size + o.size) * 0.75 + 6) ** 2 for o in shapes):
            continue
        shapes.append(Shape(rng.choice(kinds), rng.choice(tuple(COLORS)), cx, cy, size))
    return shapes


def paint(img: np.ndarray, shapes: list[Shape]) -> np.ndarray:
    """``shapes`` drawn over a copy of ``img`` (a :func:`background`), as uint8."""
    img = img.copy()
    for sh in shapes:
        m, top, left = shape_mask(sh)
        region = img[top:top + sh.size, left:left + sh.size]
        region[m] = COLORS[sh.color]
    return np.clip(img, 0, 255).astype(np.uint8)


def render(shapes: list[Shape], rng: Rng) -> np.ndarray:
    """(336, 336, 3) uint8 image of ``shapes`` on a background drawn from ``rng``."""
    return paint(background(rng), shapes)


def _unique(shapes: list[Shape]) -> list[Shape]:
    """Shapes whose colour-and-kind name is unique in the image."""
    return [s for s in shapes if sum(o.name == s.name for o in shapes) == 1]


def question(qtype: str, shapes: list[Shape], rng: Rng, variant: int) -> tuple[str, str] | None:
    """(question, answer) of type ``qtype`` about ``shapes``, or None if the image cannot carry one.

    ``variant`` (the item's rank among those of its type) balances the answers where the draw alone
    would not: ``exist`` alternates yes / plausible no / yes / random no.
    """
    if qtype == "color":
        single = [s for s in shapes if sum(o.kind == s.kind for o in shapes) == 1]
        if not single:
            return None
        s = rng.choice(single)
        return f"What color is the {s.kind}?", s.color
    if qtype == "count":
        kind = rng.choice(tuple(s.kind for s in shapes)) if rng.chance(0.85) else rng.choice(KINDS)
        return f"How many {kind}s are there?", str(sum(s.kind == kind for s in shapes))
    if qtype == "exist":
        present = {s.name for s in shapes}
        if variant % 2 == 0:
            return f"Is there a {rng.choice(shapes).name}?", "yes"
        kinds, colors = {s.kind for s in shapes}, {s.color for s in shapes}
        if variant % 4 == 1:  # plausible: a present kind in an absent colour, or a present colour on an absent kind
            absent = [f"{c} {k}" for c in COLORS for k in KINDS
                      if f"{c} {k}" not in present and (k in kinds or c in colors)]
        else:
            absent = [f"{c} {k}" for c in COLORS for k in KINDS if f"{c} {k}" not in present]
        return (f"Is there a {rng.choice(absent)}?", "no") if absent else None
    uniq = _unique(shapes)
    if qtype == "position":
        axis = rng.choice(("x", "y"))
        clear = [s for s in uniq if abs((s.cx if axis == "x" else s.cy) - SIZE // 2) >= _MIN_OFFSET]
        if not clear:
            return None
        s = rng.choice(clear)
        if axis == "x":
            return f"Is the {s.name} on the left or the right?", "left" if s.cx < SIZE // 2 else "right"
        return f"Is the {s.name} at the top or the bottom?", "top" if s.cy < SIZE // 2 else "bottom"
    if qtype == "relation":
        axis = rng.choice(("x", "y"))
        pairs = [(a, b) for a in uniq for b in uniq if a is not b
                 and abs((a.cx - b.cx) if axis == "x" else (a.cy - b.cy)) >= _MIN_OFFSET]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        if axis == "x":
            return f"Is the {a.name} left or right of the {b.name}?", "left" if a.cx < b.cx else "right"
        return f"Is the {a.name} above or below the {b.name}?", "above" if a.cy < b.cy else "below"
    raise ValueError(f"question type {qtype!r}; allowed: {', '.join(TYPES)}")


def make_item(seed: str, qtype: str, variant: int = 0, sizes: tuple[int, int] = SIZES) -> dict:
    """One item ``{image, question, answer, type}`` of type ``qtype``, fully determined by ``seed`` and
    ``variant``. Count questions get images drawn from two kinds, so counts up to 6 occur. ``sizes``
    (px, inclusive) is for training curricula only: the benchmark's splits use :data:`SIZES`; with
    larger shapes fewer may fit (the question always describes the image drawn)."""
    if not 4 <= sizes[0] <= sizes[1] <= SIZE // 2:
        raise ValueError(f"sizes={tuple(sizes)}: need 4 <= min <= max <= {SIZE // 2}")
    rng = Rng(seed)
    for _ in range(100):
        kinds = (rng.choice(KINDS), rng.choice(KINDS)) if qtype == "count" else KINDS
        shapes = _place(rng, rng.between(1, 6), kinds, tuple(sizes))
        qa = question(qtype, shapes, rng, variant)
        if qa is not None:
            image = render(shapes, rng)
            return {"image": Image.fromarray(image), "question": qa[0], "answer": qa[1], "type": qtype,
                    "shapes": [s.__dict__.copy() for s in shapes]}
    raise RuntimeError(f"no {qtype} question found for seed {seed!r}")  # pragma: no cover


def iter_items(seed: str, n: int | None = None) -> Iterator[dict]:
    """Items ``seed/0, seed/1, ...`` with the question types in turn (``n=None``: without end)."""
    i = 0
    while n is None or i < n:
        yield make_item(f"{seed}/{i}", TYPES[i % len(TYPES)], i // len(TYPES))
        i += 1


def load_items(name: str, seed: int | str, size: int | None, iterate, seeds: dict[str, str], sizes: dict[str, int],
               train_prefix: str) -> list[dict] | Iterator[dict]:
    """Split ``name`` of a benchmark whose items ``iterate(seed_string, n)`` draws: a fixed split (``seeds``,
    ``sizes``) as a list, ``train`` as an endless iterator from ``f"{train_prefix}-{seed}"`` (or ``size`` items)."""
    if name == "train":
        return iterate(f"{train_prefix}-{seed}", size)
    if name not in sizes:
        raise ValueError(f"split {name!r}; allowed: train, {', '.join(sizes)}")
    return list(iterate(seeds[name], sizes[name] if size is None else size))


def load_split(name: str, seed: int | str = 0, size: int | None = None) -> list[dict] | Iterator[dict]:
    """The items of split ``name``: ``test`` (1000, fixed) and ``val`` (500, fixed) as lists; ``train``
    as an endless iterator drawn from ``seed`` (or ``size`` items), disjoint from the fixed splits."""
    return load_items(name, seed, size, iter_items, _SPLIT_SEEDS, SPLIT_SIZES, "shapes-train")


def digest(items: list[dict]) -> str:
    """sha256 over every item's pixels (its image, or each frame of its ``video``), question, answer and type (what
    makes a split the same split)."""
    h = hashlib.sha256()
    for it in items:
        for frame in it["video"] if "video" in it else [it["image"]]:
            h.update(np.asarray(frame, dtype=np.uint8).tobytes())
        h.update(f"\0{it['question']}\0{it['answer']}\0{it['type']}\0".encode())
    return h.hexdigest()


_NUMBERS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                              "eight", "nine", "ten"))}


def normalize_words(answer: str) -> list[str]:
    """Lower case, no punctuation or articles, number words as digits: the remaining words."""
    words = re.sub(r"[^a-z0-9 ]", " ", str(answer).lower()).split()
    return [_NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the")]


def normalize(answer: str) -> str:
    """:func:`normalize_words`' first word (the benchmark's answers are one word)."""
    words = normalize_words(answer)
    return words[0] if words else ""


def score(predictions: list[str], items: list[dict]) -> dict:
    """Exact match after :func:`normalize`: ``{"overall", "per_type": {type: accuracy}, "n"}``."""
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    hits: dict[str, list[bool]] = {}
    for pred, it in zip(predictions, items):
        hits.setdefault(it["type"], []).append(normalize(pred) == normalize(it["answer"]))
    every = [h for v in hits.values() for h in v]
    return {"overall": sum(every) / len(every) if every else 0.0,
            "per_type": {t: sum(v) / len(v) for t, v in sorted(hits.items())}, "n": len(every)}
