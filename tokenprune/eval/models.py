"""Loading the model a run names: the Auto classes, ``path: reference`` for the shipped reference model, and
what identifies its weights for the baseline cache."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tokenprune.core.errors import ConfigError
from tokenprune.reference import model as reference

_LOADED: dict[str, Any] = {}  # the last model loaded, so the variants of a sweep load it once


def load_model(model_cfg: Mapping[str, Any]):
    """(model, processor) through the Auto classes; ``path: reference`` is the shipped reference model.
    The last model loaded is kept and returned again for the same ``model`` section (a sweep's variants)."""
    key = json.dumps(dict(model_cfg), sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = open_model(model_cfg)
    return _LOADED[key]


def open_model(model_cfg: Mapping[str, Any]):
    """(model, processor) loaded afresh (see :func:`load_model`)."""
    path = str(model_cfg["path"])
    if path == "reference":

        path = str(reference.path())
    kwargs = {"dtype": getattr(torch, model_cfg["dtype"]), "attn_implementation": model_cfg["attn_implementation"],
              "trust_remote_code": bool(model_cfg["trust_remote_code"])}
    if model_cfg.get("device_map"):
        kwargs["device_map"] = model_cfg["device_map"]
    local = Path(path).is_dir()
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=local, **kwargs)
        processor = AutoProcessor.from_pretrained(path, local_files_only=local,
                                                  trust_remote_code=bool(model_cfg["trust_remote_code"]))
    except OSError as e:
        raise ConfigError("model.path", f"cannot load {path!r}: {e}") from None
    return model.eval(), processor


def model_identity(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the weights for the baseline cache: a folder's files (names, sizes, mtimes), else the id."""
    path = str(model_cfg["path"])
    if path == "reference":

        path = str(reference.path())
    ident: dict[str, Any] = {"path": str(Path(path).resolve()) if Path(path).is_dir() else path,
                             "dtype": model_cfg["dtype"], "attn": model_cfg["attn_implementation"]}
    if Path(path).is_dir():
        ident["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(path).iterdir()
                                if p.is_file())
    return ident


def build_prompt(processor, question: str, images: int = 1) -> str:
    """The model's chat template around ``images`` images (before the text) and ``question``, ending where the
    answer starts."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}],
        add_generation_prompt=True)
