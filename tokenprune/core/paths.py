"""Output paths checked before any work starts: a run that cannot write its results must not compute them."""

from __future__ import annotations

import os
from pathlib import Path

from tokenprune.core.errors import ConfigError


def writable_file(path: Path, key: str) -> None:
    """``path`` can be written as a file: not a folder, and its folder exists or can be created."""
    if path.is_dir():
        raise ConfigError(key, f"{path} is a folder, not a file")
    writable_folder(path.parent, key)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(key, f"{path}: not writable")


def writable_folder(path: Path, key: str) -> None:
    """``path`` is a folder, or one that can be created: not a file, no file above it, writable."""
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"{path} is a file, not a folder")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(key, f"{path} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{path}: cannot write in {parent}")
