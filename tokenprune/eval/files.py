"""Files a run writes: atomic writes and content digests."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def digest(obj: Any) -> str:
    """16 hex digits of a JSON-able value's SHA-256 (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of its own (two writers never share one) and a
    rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cached_records(path: Path, ids: list[Any], needed: tuple[str, ...]) -> tuple[list[dict[str, Any]] | None,
                                                                                     str | None]:
    """The records of a cache file written by :func:`write_jsonl`, one per id of ``ids`` in that order, each
    with the keys ``needed``; ``(None, why)`` when the file is missing or damaged (truncated, another item
    set), so the caller computes them again."""
    if not path.is_file():
        return None, None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable ({type(e).__name__})"
    if len(rows) != len(ids):
        return None, f"{len(rows)} records for {len(ids)} items"
    for i, (row, ident) in enumerate(zip(rows, ids)):
        if not isinstance(row, dict) or row.get("id") != ident:
            return None, f"record {i + 1} is not item {ident!r}'s"
        missing = [k for k in needed if k not in row]
        if missing:  # a cache an earlier version wrote, before these measurements existed
            return None, f"record {i + 1} lacks {', '.join(missing)}"
    return rows, None


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object a line, written atomically."""
    write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
