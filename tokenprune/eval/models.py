"""Loading the model a run names: the Auto classes, ``path: reference`` for the shipped reference model, and
what identifies its weights for the baseline cache."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from tokenprune.adapters import ADAPTERS, adapter_class, get_adapter
from tokenprune.core.errors import ConfigError
from tokenprune.reference import qwen as qwen_reference
from tokenprune.reference.processors import has_torchvision, images_only

_LOADED: dict[str, Any] = {}  # the last model loaded, so the variants of a sweep load it once


def load_model(model_cfg: Mapping[str, Any]):
    """(model, processor) through the Auto classes; ``path: reference`` is the shipped reference model.
    The last model loaded is kept and returned again for the same ``model`` section and the same files in its
    folder (a sweep's variants; a model written again into the folder is loaded again)."""
    key = json.dumps([dict(model_cfg), model_identity(model_cfg)], sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = open_model(model_cfg)
    return _LOADED[key]


SHIPPED = qwen_reference.SHIPPED  # ``model.path`` names of the shipped reference models


def model_path(model_cfg: Mapping[str, Any]) -> str:
    """The folder or hub id ``model.path`` names (``reference``, ``reference-qwen``: a shipped reference model's
    folder; one that is not trained yet is a :class:`ConfigError` saying how to train it)."""
    path = str(model_cfg["path"])
    if path not in SHIPPED:
        return path
    try:
        return str(SHIPPED[path]())
    except FileNotFoundError as e:
        raise ConfigError("model.path", str(e)) from None


def _is_local(path: str) -> bool:
    """Whether ``path`` names a folder rather than a hub id (``name`` or ``org/name``)."""
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def read_model_config(model_cfg: Mapping[str, Any], key: str = "model.path"):
    """The model's ``config.json`` as transformers reads it, before any weights load; a missing folder, a folder
    without ``config.json``, a model that needs its own code while ``trust_remote_code`` is off, and a model_type
    tokenprune has no adapter for are each one :class:`ConfigError` under ``key``."""
    path = model_path(model_cfg)
    local = _is_local(path)
    folder = Path(path).expanduser()
    if local and not folder.is_dir():
        raise ConfigError(key, f"no such model folder: {path} (a folder with config.json and the weights, or a "
                               f"Hugging Face hub id such as llava-hf/llava-1.5-7b-hf)")
    if local and not (folder / "config.json").is_file():
        raise ConfigError(key, f"{path} holds no config.json: a Hugging Face checkpoint folder has config.json, "
                               f"the weights (*.safetensors) and the processor files")
    trust = model_cfg.get("trust_remote_code", False) is True
    if local:
        try:
            raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(key, f"{folder / 'config.json'} is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(key, f"{folder / 'config.json'} is not a JSON object")
        if raw.get("model_type") not in ADAPTERS and raw.get("auto_map") and not trust:
            raise ConfigError("model.trust_remote_code" if key == "model.path" else key,
                              f"{path} (model_type {raw.get('model_type')!r}) needs its own code (config.json has "
                              f"auto_map), which runs only with trust_remote_code: true; tokenprune's adapters "
                              f"cover model_type {', '.join(sorted(ADAPTERS))}")
    try:
        config = AutoConfig.from_pretrained(str(folder) if local else path, local_files_only=local,
                                            trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(key, f"cannot read the config of {path!r}: {str(e).splitlines()[0]}") from None
    try:
        adapter_class(config, path)
    except TypeError as e:
        raise ConfigError(key, f"{e} (tokenprune prunes the visual tokens of vision-language models)") from None
    return config


def check_pipeline_for_model(model_or_config, pipeline, key: str = "pipeline") -> None:
    """Every model-dependent check of ``pipeline`` (depth, sites, signals, token kinds, positions) against the
    model's config (:func:`read_model_config`), before any weights load, or against the loaded model."""
    if pipeline is None:
        return
    if isinstance(model_or_config, torch.nn.Module):
        adapter = get_adapter(model_or_config)
        cls, facts = type(adapter), adapter.facts()
    else:
        cls = adapter_class(model_or_config)
        facts = cls.facts_from_config(model_or_config)
    try:
        cls.check_pipeline(facts, pipeline, guide=False)
    except ConfigError as e:
        raise ConfigError(f"{key}{'.' + e.key if e.key else ''}", e.detail) from None


def check_input_scale(model_cfg: Mapping[str, Any], pipeline, image, key: str = "pipeline") -> None:
    """For a pipeline that shows the images smaller (``input.scale``): refuse, before the weights load, a model whose
    own processor gives the same input for ``image`` scaled as for it whole (a processor that resizes every image
    to one pixel count, as the Qwen reference's pins ``min_pixels = max_pixels``): the run would only repeat the
    unpruned model."""
    if pipeline is None or pipeline.input is None:
        return
    path = model_path(model_cfg)
    processor = load_processor(path, Path(path).is_dir(), model_cfg["trust_remote_code"] is True)
    sizes = []
    for im in (image, pipeline.prepare_images([image])[0]):
        enc = processor(images=[[im]], text=[build_prompt(processor, "x")], return_tensors="pt")
        sizes.append((tuple(enc["input_ids"].shape), tuple(enc["pixel_values"].shape)))
    if sizes[0] == sizes[1]:
        raise ConfigError(f"{key}.input.scale", f"{pipeline.input['scale']} gives {path} the same input as the whole "
                                                f"image (its processor resizes every image to one size: "
                                                f"{type(processor.image_processor).__name__}); showing a smaller image "
                                                "has no meaning for this model (pooling is the baseline there)")


def open_model(model_cfg: Mapping[str, Any]):
    """(model, processor) loaded afresh (see :func:`load_model`)."""
    path = model_path(model_cfg)
    kwargs = {"dtype": getattr(torch, model_cfg["dtype"]), "attn_implementation": model_cfg["attn_implementation"],
              "trust_remote_code": model_cfg["trust_remote_code"] is True}
    if model_cfg.get("device_map"):
        kwargs["device_map"] = model_cfg["device_map"]
    local = Path(path).is_dir()
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=local, **kwargs)
        processor = load_processor(path, local, model_cfg["trust_remote_code"] is True)
    except OSError as e:
        raise ConfigError("model.path", f"cannot load {path!r}: {e}") from None
    return model.eval(), processor


def load_processor(path: str, local: bool, trust_remote_code: bool = False):
    """``AutoProcessor.from_pretrained(path)``; where that fails because torchvision is missing and the folder's
    processor class has a video processor (Qwen2-VL, Qwen2.5-VL), the same class without it (images only,
    :func:`tokenprune.reference.processors.images_only`), with a warning."""
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=local, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, AttributeError):
        cls = None if has_torchvision() else _video_processor_class(path, local)
        if cls is None:
            raise
    warnings.warn(f"torchvision is not installed: {cls.__name__} of {path} is loaded without its video processor "
                  "(images work; `tokenprune run` builds video inputs from the image processor)",
                  stacklevel=3)
    return images_only(cls).from_pretrained(path, local_files_only=local)


def _video_processor_class(path: str, local: bool):
    """The transformers processor class the checkpoint's processor config names, when it has a video processor."""
    import transformers
    from transformers.utils import cached_file

    for name in ("processor_config.json", "preprocessor_config.json"):
        file = cached_file(path, name, local_files_only=local, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if file is None:
            continue
        cls = getattr(transformers, str(json.loads(Path(file).read_text(encoding="utf-8")).get("processor_class")),
                      None)
        if cls is not None and "video_processor" in cls.get_attributes():
            return cls
    return None


def model_identity(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the weights for the baseline cache: a folder's files (names, sizes, mtimes), else the id."""
    path = model_path(model_cfg)
    ident: dict[str, Any] = {"path": str(Path(path).resolve()) if Path(path).is_dir() else path,
                             "dtype": model_cfg["dtype"], "attn": model_cfg["attn_implementation"]}
    if Path(path).is_dir():
        ident["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(path).iterdir()
                                if p.is_file())
    return ident


#: A run directory's record of :func:`model_identity` (the model folder's files when the run finished).
MODEL_RECORD = "model_identity.json"


def model_changed(run_dir: Path, model_cfg: Mapping[str, Any]) -> str | None:
    """What changed in the model's folder since the run in ``run_dir`` finished (``"model.safetensors"``: a file
    written again, resized, added or removed; its :data:`MODEL_RECORD` against :func:`model_identity` now), or None
    (nothing, or a run that recorded none). A model retrained into the same folder keeps its config, and a run's
    results must not be read back for it."""
    try:
        before = json.loads((Path(run_dir) / MODEL_RECORD).read_text())
    except (OSError, ValueError):
        return None
    now = json.loads(json.dumps(model_identity(model_cfg)))  # tuples as lists, as the record holds them
    if before.get("path") != now.get("path"):
        return None  # the config says which model; its change is the config's
    old, new = ({f[0]: f[1:] for f in ident.get("files", [])} for ident in (before, now))
    changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
    return ", ".join(changed) or None


def build_prompt(processor, question: str, images: int = 1) -> str:
    """The model's chat template around ``images`` images (before the text) and ``question``, ending where the
    answer starts."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}],
        add_generation_prompt=True)
