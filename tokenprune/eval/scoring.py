"""Data and scoring for ``tokenprune run``: evaluation items from the shapes benchmark or a JSONL file,
answer normalisation and the three metrics (exact match, VQA soft accuracy, yes/no accuracy with F1).

An *item* is a dict ``{id, image, question, answer, type, metric}``; ``image`` is a PIL image or a path
opened when its batch is built; ``answer`` is a string, or a list of human answers for ``vqa``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tokenprune.core.errors import ConfigError
from tokenprune.reference import shapes, shapes_video
from tokenprune.reference.shapes import normalize_words

METRICS = ("exact_match", "vqa", "yes_no")
SOURCES = ("shapes", "shapes_video", "jsonl", "datasets")

def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles dropped, number words as digits, spaces collapsed."""

    return " ".join(normalize_words(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA soft accuracy (Antol et al., ICCV 2015; the official evaluation): the mean, over the 10 ways of
    leaving one human answer out, of min(1, matches among the other answers / 3)."""
    pred = normalize_answer(prediction)
    norm = [normalize_answer(a) for a in answers]
    if len(norm) < 2:
        return float(bool(norm) and pred == norm[0])
    scores = [min(1.0, sum(a == pred for j, a in enumerate(norm) if j != i) / 3) for i in range(len(norm))]
    return sum(scores) / len(scores)


def item_score(prediction: str, item: Mapping[str, Any]) -> float:
    """The item's score in [0, 1] under its metric."""
    metric = item["metric"]
    if metric == "vqa":
        answers = item["answer"] if isinstance(item["answer"], list) else [item["answer"]]
        return vqa_accuracy(prediction, answers)
    answer = item["answer"][0] if isinstance(item["answer"], list) else item["answer"]
    if metric == "yes_no":
        return float(_yes_no(prediction) == _yes_no(answer))
    return float(normalize_answer(prediction) == normalize_answer(answer))


def _yes_no(text: str) -> str:
    words = normalize_answer(text).split()
    return words[0] if words and words[0] in ("yes", "no") else "other"


def summarize(predictions: list[str], items: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``{accuracy, per_type: {type: accuracy}, n}``, plus ``yes_no: {accuracy, f1}`` when some item uses it
    (F1 of the "yes" class, scikit-learn; an answer that is neither yes nor no counts as wrong)."""
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    scores = [item_score(p, it) for p, it in zip(predictions, items)]
    per_type: dict[str, list[float]] = {}
    for s, it in zip(scores, items):
        per_type.setdefault(str(it["type"]), []).append(s)
    out: dict[str, Any] = {"accuracy": sum(scores) / len(scores) if scores else 0.0,
                           "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())}, "n": len(scores)}
    yn = [(p, it) for p, it in zip(predictions, items) if it["metric"] == "yes_no"]
    if yn:
        from sklearn.metrics import f1_score

        truth = [_yes_no(it["answer"]) for _, it in yn]
        pred = [_yes_no(p) for p, _ in yn]
        out["yes_no"] = {"accuracy": sum(a == b for a, b in zip(pred, truth)) / len(yn),
                         "f1": float(f1_score(truth, pred, labels=["yes"], average="micro", zero_division=0.0))}
    return out


def relative_score(per_type: Mapping[str, float], baseline_per_type: Mapping[str, float]) -> float | None:
    """Pruned / unpruned accuracy x 100, averaged over the tasks (question types) the baseline gets above 0."""
    ratios = [per_type.get(t, 0.0) / b * 100 for t, b in baseline_per_type.items() if b > 0]
    return sum(ratios) / len(ratios) if ratios else None


# --- loading -----------------------------------------------------------------------------------------

def load_items(data: Mapping[str, Any], key: str = "data") -> list[dict[str, Any]]:
    """The items ``data`` (a run config's ``data`` section) names, checked before any model is loaded."""
    source = data.get("source", "shapes")
    limit = data.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{key}.limit", f"must be a positive integer or null, got {limit!r}")
    metric = data.get("metric") or "exact_match"
    if metric not in METRICS:
        raise ConfigError(f"{key}.metric", f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if source == "shapes":

        split = data.get("split", "test")
        if split not in shapes.SPLIT_SIZES:
            raise ConfigError(f"{key}.split", f"shapes split {split!r}; allowed: {', '.join(shapes.SPLIT_SIZES)}")
        raw = shapes.load_split(split, size=limit)
        return [{"id": f"shapes-{split}-{i}", "image": it["image"], "question": it["question"],
                 "answer": it["answer"], "type": it["type"], "metric": metric} for i, it in enumerate(raw)]
    if source == "shapes_video":
        split = data.get("split", "test")
        if split not in shapes_video.SPLIT_SIZES:
            raise ConfigError(f"{key}.split", f"shapes_video split {split!r}; allowed: "
                                              f"{', '.join(shapes_video.SPLIT_SIZES)}")
        raw = shapes_video.load_split(split, size=limit)
        return [{"id": f"shapes-video-{split}-{i}", "video": it["video"], "question": it["question"],
                 "answer": it["answer"], "type": it["type"], "metric": metric} for i, it in enumerate(raw)]
    if source == "jsonl":
        path = data.get("path")
        if not path:
            raise ConfigError(f"{key}.path", "a JSONL data source needs a path")
        return _load_jsonl(Path(path), metric, limit)
    if source == "datasets":
        path = data.get("path")
        if not path:
            raise ConfigError(f"{key}.path", "a datasets source needs the folder written by Dataset.save_to_disk")
        items = _load_datasets_folder(Path(path), data.get("split"), metric, limit)
        return items
    raise ConfigError(f"{key}.source", f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")


def _load_datasets_folder(path: Path, split: str | None, metric: str, limit: int | None) -> list[dict[str, Any]]:
    """Rows of a local ``datasets`` folder (``save_to_disk``): columns image (an Image feature or a path
    relative to the folder), question, answer, and optionally type, metric, id."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source", "'datasets' needs the datasets package: pip install 'tokenprune-lvlm[datasets]'") \
            from None
    if not path.is_dir():
        raise ConfigError("data.path", f"no such folder: {path}")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError("data.path", f"{path}: not a datasets folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError("data.split", f"{split!r} is not a split of {path}; it has: {', '.join(ds)}")
        ds = ds[split]
    missing = {"image", "question", "answer"} - set(ds.column_names)
    if missing:
        raise ConfigError("data.path", f"{path}: missing column(s) {', '.join(sorted(missing))} "
                          f"(a dataset needs image, question, answer; it has {', '.join(ds.column_names)})")
    items = []
    for i in range(min(len(ds), limit) if limit else len(ds)):
        where = f"{path}, row {i}"
        try:
            row = ds[i]  # an Image feature decodes here
        except Exception as e:  # noqa: BLE001 - datasets/PIL raise many kinds for a damaged row
            raise ConfigError("data.path", f"{where}: does not decode ({type(e).__name__}: {e})") from None
        for field in ("image", "question", "answer"):
            if row.get(field) in (None, "", []):
                raise ConfigError("data.path", f"{where}: missing {field!r}")
        row_metric = row.get("metric") or metric
        if row_metric not in METRICS:
            raise ConfigError("data.path", f"{where}: unknown metric {row_metric!r}; allowed: {', '.join(METRICS)}")
        image = row["image"]
        if isinstance(image, str):
            image = (path / image).resolve()
            check_image_file(image, where)
            image = str(image)
        elif isinstance(image, Image.Image):
            try:
                image.load()
            except (OSError, SyntaxError, ValueError) as e:
                raise ConfigError("data.path", f"{where}: the image does not decode ({type(e).__name__}: {e})") \
                    from None
        else:
            raise ConfigError("data.path", f"{where}: 'image' must be an Image feature or a file path, got "
                                           f"{type(image).__name__}")
        items.append({"id": str(row.get("id") or f"{path.name}-{i}"), "image": image, "question": str(row["question"]),
                      "answer": row["answer"], "type": str(row.get("type") or "all"), "metric": row_metric})
    if not items:
        raise ConfigError("data.path", f"{path}: no rows")
    _check_unique_ids(items, path)
    return items


def _load_jsonl(path: Path, metric: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{image, question, answer[, type, metric, id]}``; image paths are relative to the file; the first
    ``limit`` rows."""
    if path.is_dir():
        raise ConfigError("data.path", f"{path} is a folder, not a JSONL file")
    if not path.is_file():
        raise ConfigError("data.path", f"no such file: {path}")
    items: list[dict[str, Any]] = []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if limit and len(items) >= limit:
            break
        where = f"{path}, row {line_no}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError("data.path", f"{where}: not UTF-8 text (byte {e.start})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError("data.path", f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError("data.path", f"{where}: a row must be a JSON object, got {type(row).__name__}")
        for field in ("image", "question", "answer"):
            if row.get(field) in (None, "", []):
                raise ConfigError("data.path", f"{where}: missing {field!r} (a row needs image, question, answer)")
        _check_row_types(row, where)
        row_metric = row.get("metric", metric)
        if row_metric not in METRICS:
            raise ConfigError("data.path", f"{where}: unknown metric {row_metric!r}; allowed: {', '.join(METRICS)}")
        image = (path.parent / row["image"]).resolve()
        check_image_file(image, where)
        items.append({"id": str(row.get("id", f"{path.stem}-{line_no}")), "image": str(image),
                      "question": row["question"], "answer": row["answer"],
                      "type": str(row.get("type", "all")), "metric": row_metric})
    if not items:
        raise ConfigError("data.path", f"{path}: no rows")
    _check_unique_ids(items, path)
    return items


def _check_row_types(row: Mapping[str, Any], where: str) -> None:
    if not isinstance(row["image"], str):
        raise ConfigError("data.path", f"{where}: 'image' must be a file path (a string), got {row['image']!r}")
    if not isinstance(row["question"], str):
        raise ConfigError("data.path", f"{where}: 'question' must be a string, got {row['question']!r}")
    answer = row["answer"]
    if not (isinstance(answer, str) or (isinstance(answer, list) and all(isinstance(a, str) for a in answer))):
        raise ConfigError("data.path", f"{where}: 'answer' must be a string or a list of strings, got {answer!r}")


def _check_unique_ids(items: list[dict[str, Any]], path: Path) -> None:
    seen: set[str] = set()
    for it in items:
        if it["id"] in seen:
            raise ConfigError("data.path", f"{path}: id {it['id']!r} is given to two rows (ids must be unique)")
        seen.add(it["id"])


def check_image_file(image: Path, where: str) -> None:
    """``image`` exists and decodes (every pixel read, so a truncated file is caught before the model loads)."""
    if not image.is_file():
        raise ConfigError("data.path", f"{where}: image file not found: {image}")
    try:
        with Image.open(image) as im:
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ConfigError("data.path", f"{where}: image {image} does not decode ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def open_image(image):
    """A PIL RGB image from an item's ``image`` (a PIL image or a path)."""

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def data_digest(items: list[Mapping[str, Any]]) -> str:
    """sha256 over every item's id, question, answer, metric and image (pixels, or the file's bytes) or clip."""

    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it["id"], it["question"], it["answer"], it["metric"]]).encode())
        for image in it["video"] if "video" in it else [it["image"]]:  # a clip: each frame
            if isinstance(image, (str, Path)):
                h.update(Path(image).read_bytes())
            else:
                h.update(np.asarray(image).tobytes())
    return h.hexdigest()
