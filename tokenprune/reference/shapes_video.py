"""``shapes_video``: clips of moving and appearing shapes, with questions whose answers need time.

A clip is :data:`FRAMES` frames of 224×224 RGB on one background (the ``shapes`` background, drawn once), with
1–3 static shapes and the shapes of one event; within a clip every shape has its own kind and its own colour, so a
one-word answer names one shape and a colour finds its pixels. Five question types, one event each:

- ``moved``: one shape moves in a straight line from the first frame to the last; "Which shape moved?" — its kind;
- ``direction``: the same event; "Which way did the red circle move?" — left, right, up or down;
- ``appeared``: a shape appears at a frame after the first and stays; "Which shape appeared?" — its kind;
- ``order``: two shapes appear, at different frames; "Which appeared first, the red circle or the blue square?" —
  the first one's kind;
- ``duration``: a shape is visible in a run of frames (not all of them); "In how many frames is the red circle
  visible?" — the count, as digits.

A single frame cannot answer any of them, and no frame can be skipped for ``duration``. Like ``shapes``, every
random choice comes from ``random.Random(seed_string).random()`` and everything is drawn with integer arithmetic,
so a split is bit-identical on every machine (``tests/test_shapes_video.py`` checks the digest of ``test`` and
every answer against the pixels of its frames).

>>> items = load_split("test")     # 500 items: {video (list of PIL images), question, answer, type, events}
>>> score(["circle"] * len(items), items)
"""

from __future__ import annotations

from collections.abc import Iterator

from PIL import Image

from tokenprune.reference.shapes import (
    COLORS,
    KINDS,
    Rng,
    Shape,
    background,
    digest,
    load_items,
    paint,
    score,
)

__all__ = ["FRAMES", "SIZE", "SPLIT_SIZES", "TYPES", "WORDS", "digest", "iter_items", "load_split", "make_item",
           "score"]

SIZE = 224
#: Frames per clip (even: Qwen's towers merge two frames into one temporal patch).
FRAMES = 8
TYPES = ("moved", "direction", "appeared", "order", "duration")
SPLIT_SIZES = {"test": 500, "val": 200}
_SPLIT_SEEDS = {"test": "shapes-video-test-v1", "val": "shapes-video-val-v1"}
_SIZES = (24, 44)  # px, inclusive
#: Every word and punctuation mark of the questions and answers besides the colours, kinds and digits (a word-level
#: tokenizer for video adds those it lacks: :func:`tokenprune.reference.qwen.qwen_vocabulary`).
WORDS = ("Which", "shape", "moved", "?", "way", "did", "the", "move", "left", "right", "up", "down", "appeared",
         "first", ",", "or", "In", "how", "many", "frames", "is", "visible")
_MIN_TRAVEL = 64  # px: a moving shape's path


def _clear(a: Shape, b: Shape) -> bool:
    """Whether two shapes' discs (with a margin) do not touch."""
    return (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 >= ((a.size + b.size) * 0.75 + 6) ** 2


def _draw_shape(rng: Rng, kinds: list[str], colors: list[str], size: int | None = None) -> tuple[str, str, int]:
    kind = kinds.pop(rng.below(len(kinds)))
    color = colors.pop(rng.below(len(colors)))
    return kind, color, size if size is not None else rng.between(*_SIZES)


def _spot(rng: Rng, size: int, margin: int = 0) -> tuple[int, int]:
    half = size // 2 + 2 + margin
    return rng.between(half, SIZE - 1 - half), rng.between(half, SIZE - 1 - half)


def _path(rng: Rng, kinds: list[str], colors: list[str]) -> tuple[list[Shape], str]:
    """A shape's position in every frame, moving along one axis by at least :data:`_MIN_TRAVEL` px, and the
    direction."""
    kind, color, size = _draw_shape(rng, kinds, colors)
    half = size // 2 + 2
    axis = rng.choice(("x", "y"))
    lo, hi = half, SIZE - 1 - half
    start = rng.between(lo, hi - _MIN_TRAVEL)
    end = rng.between(start + _MIN_TRAVEL, hi)
    if rng.chance(0.5):
        start, end = end, start
    other = rng.between(lo, hi)
    steps = [start + (end - start) * f // (FRAMES - 1) for f in range(FRAMES)]
    if axis == "x":
        frames = [Shape(kind, color, p, other, size) for p in steps]
        direction = "right" if end > start else "left"
    else:
        frames = [Shape(kind, color, other, p, size) for p in steps]
        direction = "down" if end > start else "up"
    return frames, direction


def _timeline(rng: Rng, qtype: str, kinds: list[str], colors: list[str]) -> tuple[list[list[Shape]], dict]:
    """The event's shapes in every frame (a list per frame) and what the question asks about."""
    if qtype in ("moved", "direction"):
        frames, direction = _path(rng, kinds, colors)
        return [[s] for s in frames], {"shape": frames[0], "direction": direction}
    if qtype == "appeared":
        kind, color, size = _draw_shape(rng, kinds, colors)
        s = Shape(kind, color, *_spot(rng, size), size)
        at = rng.between(1, FRAMES - 2)
        return [[s] if f >= at else [] for f in range(FRAMES)], {"shape": s, "from": at}
    if qtype == "order":
        first_at = rng.between(1, FRAMES - 3)
        second_at = rng.between(first_at + 1, FRAMES - 2)
        kind, color, size = _draw_shape(rng, kinds, colors)
        a = Shape(kind, color, *_spot(rng, size), size)
        for _ in range(100):
            kind2, color2, size2 = kinds[rng.below(len(kinds))], colors[rng.below(len(colors))], rng.between(*_SIZES)
            b = Shape(kind2, color2, *_spot(rng, size2), size2)
            if _clear(a, b):
                kinds.remove(kind2)
                colors.remove(color2)
                break
        else:  # pragma: no cover - a 224-px frame always has room for two small shapes
            raise RuntimeError("no room for a second shape")
        return ([[x for x, at in ((a, first_at), (b, second_at)) if f >= at] for f in range(FRAMES)],
                {"shape": a, "other": b, "swap": rng.chance(0.5)})
    if qtype == "duration":
        kind, color, size = _draw_shape(rng, kinds, colors)
        s = Shape(kind, color, *_spot(rng, size), size)
        count = rng.between(1, FRAMES - 1)
        start = rng.between(0, FRAMES - count)
        return [[s] if start <= f < start + count else [] for f in range(FRAMES)], {"shape": s, "count": count}
    raise ValueError(f"question type {qtype!r}; allowed: {', '.join(TYPES)}")


def _question(qtype: str, event: dict) -> tuple[str, str]:
    s: Shape = event["shape"]
    if qtype == "moved":
        return "Which shape moved?", s.kind
    if qtype == "direction":
        return f"Which way did the {s.name} move?", event["direction"]
    if qtype == "appeared":
        return "Which shape appeared?", s.kind
    if qtype == "order":
        other: Shape = event["other"]
        names = (other.name, s.name) if event["swap"] else (s.name, other.name)  # the first one named first or not
        return f"Which appeared first, the {names[0]} or the {names[1]}?", s.kind
    return f"In how many frames is the {s.name} visible?", str(event["count"])


def make_item(seed: str, qtype: str) -> dict:
    """One item ``{video, question, answer, type, events}`` of type ``qtype``, fully determined by ``seed``:
    ``video`` is a list of :data:`FRAMES` PIL images; ``events`` every shape of every frame (dicts)."""
    rng = Rng(seed)
    bg = background(rng, SIZE)
    for _ in range(100):
        kinds, colors = list(KINDS), list(COLORS)
        moving, event = _timeline(rng, qtype, kinds, colors)
        everywhere = [s for frame in moving for s in frame]
        statics: list[Shape] = []
        for _ in range(rng.between(1, 3)):
            if not kinds or not colors:
                break
            kind, color, size = _draw_shape(rng, kinds, colors)
            for _ in range(50):
                s = Shape(kind, color, *_spot(rng, size), size)
                if all(_clear(s, o) for o in everywhere + statics):
                    statics.append(s)
                    break
        if statics:
            frames = [statics + f for f in moving]
            q, a = _question(qtype, event)
            return {"video": [Image.fromarray(paint(bg, f)) for f in frames], "question": q, "answer": a,
                    "type": qtype, "events": [[s.__dict__.copy() for s in f] for f in frames]}
    raise RuntimeError(f"no {qtype} clip found for seed {seed!r}")  # pragma: no cover


def iter_items(seed: str, n: int | None = None) -> Iterator[dict]:
    """Items ``seed/0, seed/1, ...`` with the question types in turn (``n=None``: without end)."""
    i = 0
    while n is None or i < n:
        yield make_item(f"{seed}/{i}", TYPES[i % len(TYPES)])
        i += 1


def load_split(name: str, seed: int | str = 0, size: int | None = None) -> list[dict] | Iterator[dict]:
    """The items of split ``name``: ``test`` (500, fixed) and ``val`` (200, fixed) as lists; ``train`` as an
    endless iterator drawn from ``seed`` (or ``size`` items), disjoint from the fixed splits."""
    return load_items(name, seed, size, iter_items, _SPLIT_SEEDS, SPLIT_SIZES, "shapes-video-train")
