"""Files a run writes: atomic writes and content digests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def digest(obj: Any) -> str:
    """16 hex digits of a JSON-able value's SHA-256 (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object a line, written atomically."""
    write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
