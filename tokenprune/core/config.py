"""Pipeline configs: load (dict, YAML path or preset name), override by dotted key, validate.

Every error names the key path, what was given and what is allowed.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.resources
import importlib.util
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokenprune.core.errors import ConfigError
from tokenprune.core.registry import registered_operators
from tokenprune.core.sites import KV_CACHE, CrossAttentionSite, KVCacheSite, LayerSite, site_of
from tokenprune.core.stage import BUDGETS, POSITIONS
from tokenprune.core.yaml_files import parse_yaml, read_yaml, refuse_interpolation

PIPELINE_KEYS = ("name", "plugins", "input", "stages")
#: What a pipeline's ``input`` does to the images before the processor: ``scale`` each side (the image shown at
#: a lower resolution: the downsampling baseline).
INPUT_KEYS = ("scale",)
#: The site of a stage on the image features of a cross-attention model (Mllama), instead of a decoder layer.
#: The site after the prefill: each decoder layer's cached visual keys/values (see tokenprune/core/kv_cache.py).
STAGE_KEYS = ("layer", "positions", "budget", "protect", "cache", "operators")


def preset_dir() -> Path:
    """Folder of the shipped presets (``experiments/presets`` in the repository)."""
    return Path(str(importlib.resources.files("tokenprune.presets")))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def load_source(source: str | Path | Mapping | DictConfig) -> DictConfig:
    """A pipeline config from a dict, a DictConfig, a YAML file or a preset name. A pipeline takes no
    interpolation (``${...}``): a shared pipeline file must not read the environment into results."""
    if isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=False)
    if isinstance(source, Mapping):
        refuse_interpolation(dict(source))
        return OmegaConf.create(dict(source))
    text = str(source)
    path = Path(text)
    if not path.is_file():
        preset = preset_dir() / f"{text}.yaml"
        if preset.is_file():
            path = preset
        else:
            close = difflib.get_close_matches(text, preset_names(), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise ConfigError(None, f"pipeline {text!r} is neither a file nor a preset; {hint}presets: {', '.join(preset_names())}")
    data = read_yaml(path, "pipeline")
    if not isinstance(data, dict):
        raise ConfigError(None, f"{path}: a pipeline is a mapping with keys {', '.join(PIPELINE_KEYS)}, got {type(data).__name__}")
    refuse_interpolation(data)
    return OmegaConf.create(data)


def apply_overrides(cfg: DictConfig, overrides: Iterable[str], example: str = "stages.0.operators.1.keep=0.25",
                    what: str = "a pipeline") -> DictConfig:
    """Apply ``KEY=VALUE`` overrides; keys are dotted paths, list items by number
    (``stages.0.operators.1.keep=0.25``); values are parsed as YAML (``{op: random, seed: 3}``), with no
    interpolation. ``example`` and ``what`` (the config's kind) are for messages."""
    for item in overrides:
        key, value = parse_override(item, example)
        refuse_interpolation(value, key, what=what)
        _check_override_path(cfg, key)
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(key, f"cannot set to {value!r}: {str(e).splitlines()[0]}") from None
    return cfg


def parse_override(item: Any, example: str) -> tuple[str, Any]:
    """``(key, value)`` of one ``KEY=VALUE`` override, the value parsed as YAML (a string if it is not YAML)."""
    if isinstance(item, str) and "=" not in item and item.strip():
        raise ConfigError(item.strip(), f"an override is KEY=VALUE, e.g. {example}")
    if not isinstance(item, str) or not item.split("=", 1)[0].strip():
        raise ConfigError(None, f"override {item!r} names no key: an override is KEY=VALUE, e.g. {example}")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = parse_yaml(raw, f"override {key}") if raw.strip() else None
    except ConfigError as e:
        if "given twice" in e.detail:
            raise ConfigError(key, e.detail.split(": not valid YAML, ", 1)[-1]) from None
        value = raw
    return key, value


def _check_override_path(cfg: DictConfig, key: str) -> None:
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        path = ".".join(parts[: i + 1])
        if isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(path, f"list index {part!r} out of range; the list has {len(node)} item(s)")
            node = node[int(part)]
        elif isinstance(node, DictConfig):
            if part not in node:
                raise ConfigError(path, f"no such key; available: {', '.join(map(str, node.keys()))}")
            node = node[part]
        else:
            raise ConfigError(path, f"is a value ({node!r}), not a mapping or list")
    last = parts[-1]
    if isinstance(node, ListConfig) and (not last.isdigit() or int(last) >= len(node)):
        raise ConfigError(key, f"list index {last!r} out of range; the list has {len(node)} item(s)")


_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
PLUGIN_HELP = ("a plugin is a Python module whose import registers operators with @register_operator(...); "
               "see docs/plugins.md")


def import_plugins(plugins: Any, folders: Iterable[str | Path] = (), key: str = "plugins") -> None:
    """Import the user modules ``plugins`` names (``plugins: [my_ops]``), each of which must register at least
    one operator. A module is looked up in ``folders`` (the pipeline file's folder), then the working directory,
    then ``sys.path``. Before a module is imported its source must mention ``register_operator``, so a
    ``plugins:`` entry cannot be used to import (and run) an arbitrary installed module."""
    if plugins is None:
        return
    if not isinstance(plugins, (list, ListConfig)) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(key, f"a list of module names, got {plugins!r}; {PLUGIN_HELP}")
    search = [str(Path(f).resolve()) for f in folders] + [str(Path.cwd())]
    for i, name in enumerate(plugins):
        where = key if key.startswith("-") else f"{key}.{i}"
        if not _MODULE_NAME.match(name):
            raise ConfigError(where, f"{name!r} is not a module name (my_ops, my_package.my_ops); {PLUGIN_HELP}")
        added = [d for d in search if d not in sys.path]
        sys.path[:0] = added
        try:
            _check_plugin_source(name, where)
            importlib.import_module(name)
        except ConfigError:
            raise
        except SyntaxError as e:
            raise ConfigError(where, f"{name!r} has a syntax error: {e.msg} ({e.filename}, line {e.lineno})") from None
        except ImportError as e:
            raise ConfigError(where, f"cannot import {name!r}: {e} (looked in {', '.join(search)} and "
                                     "the installed packages)") from None
        except ValueError as e:
            if "already registered" in str(e):
                raise ConfigError(where, f"{name!r}: {e}; rename the plugin's operator") from None
            raise ConfigError(where, f"importing {name!r} failed: ValueError: {e}") from None
        except Exception as e:  # noqa: BLE001 - a plugin's own error, reported in one line
            raise ConfigError(where, f"importing {name!r} failed: {type(e).__name__}: {e}") from None
        finally:
            for d in added:
                if d in sys.path:
                    sys.path.remove(d)
        if not any(cls.__module__ == name or cls.__module__.startswith(name + ".")
                   for cls in registered_operators().values()):
            raise ConfigError(where, f"{name!r} registers no operator; {PLUGIN_HELP}")


def _check_plugin_source(name: str, where: str) -> None:
    """Refuse, before importing it, a module whose source does not mention ``register_operator``."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ImportError(f"no module named {name!r}")
    origin = spec.origin
    if origin and origin.endswith(".py") and Path(origin).is_file():
        try:
            text = Path(origin).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(where, f"{name!r}: cannot read {origin}: {e}") from None
        if "register_operator" in text:
            return
    raise ConfigError(where, f"{name!r} ({origin or 'no source file'}) does not register operators; {PLUGIN_HELP}")


def validate_input(cfg: DictConfig) -> dict[str, float] | None:
    """A pipeline's ``input`` settings, checked (``{scale: s}``, 0 < s < 1), or None when it has none."""
    spec = cfg.get("input")
    if spec is None:
        return None
    if not isinstance(spec, DictConfig):
        raise ConfigError("input", f"must be a mapping with keys {', '.join(INPUT_KEYS)}, got {spec!r}")
    for key in spec:
        if key not in INPUT_KEYS:
            raise ConfigError(f"input.{key}", f"unknown input key; allowed: {', '.join(INPUT_KEYS)}")
    scale = spec.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < 1:
        raise ConfigError("input.scale", f"the factor each image side is scaled by, in (0, 1); got {scale!r}")
    return {"scale": float(scale)}


def validate_pipeline_config(cfg: DictConfig) -> list[dict]:
    """Check the structure and return plain stage dicts (operators still unbuilt)."""
    for key in cfg:
        if key not in PIPELINE_KEYS:
            close = difflib.get_close_matches(str(key), PIPELINE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(str(key), f"unknown pipeline key{hint}; allowed: {', '.join(PIPELINE_KEYS)}")
    if "name" in cfg and not isinstance(cfg.name, str):
        raise ConfigError("name", f"must be a string, got {cfg.name!r}")
    has_input = validate_input(cfg) is not None
    stages = cfg.get("stages")
    if has_input and (stages is None or (isinstance(stages, ListConfig) and len(stages) == 0)):
        return []  # the images changed before the processor, nothing pruned inside the model
    if not isinstance(stages, ListConfig) or len(stages) == 0:
        raise ConfigError("stages", f"must be a non-empty list of stages, got {OmegaConf.to_container(stages) if stages is not None else None!r}")
    plain = OmegaConf.to_container(stages, resolve=True)
    previous = -1
    for i, stage in enumerate(plain):
        where = f"stages.{i}"
        if not isinstance(stage, dict):
            raise ConfigError(where, f"a stage is a mapping with keys {', '.join(STAGE_KEYS)}, got {stage!r}")
        for key in stage:
            if key not in STAGE_KEYS:
                raise ConfigError(f"{where}.{key}", f"unknown stage key; allowed: {', '.join(STAGE_KEYS)}")
        layer = stage.get("layer")
        site = site_of(layer, f"{where}.layer")
        if isinstance(site, CrossAttentionSite) and len(plain) > 1:
            raise ConfigError(f"{where}.layer", "a 'cross_attention' stage must be the pipeline's only stage "
                              "(in a cross-attention model images enter the LLM only there)")
        if isinstance(site, KVCacheSite) and i != len(plain) - 1:
            raise ConfigError(f"{where}.layer", f"a '{KV_CACHE}' stage runs after the prefill, so it must be the "
                              f"pipeline's last stage (it is stage {i} of {len(plain)})")
        if "cache" in stage and not isinstance(site, KVCacheSite):
            raise ConfigError(f"{where}.cache", f"only a '{KV_CACHE}' stage takes cache settings (this stage's layer "
                              f"is {layer!r})")
        if isinstance(site, LayerSite):
            if site.layer <= previous:
                raise ConfigError(f"{where}.layer", f"stages must have strictly increasing layers; {layer} follows "
                                  f"{previous}")
            previous = site.layer
        if stage.get("positions", "keep") not in POSITIONS:
            raise ConfigError(f"{where}.positions", f"got {stage['positions']!r}; allowed: {', '.join(POSITIONS)}")
        if stage.get("budget", "per_image") not in BUDGETS:
            raise ConfigError(f"{where}.budget", f"got {stage['budget']!r}; allowed: {', '.join(BUDGETS)}")
        protect = stage.get("protect", [])
        if not isinstance(protect, list) or not all(isinstance(p, str) for p in protect):
            raise ConfigError(f"{where}.protect", f"must be a list of token kinds (e.g. [image_newline]), got {protect!r}")
        ops = stage.get("operators")
        if not isinstance(ops, list) or not ops:
            raise ConfigError(f"{where}.operators", f"must be a non-empty list of operators, got {ops!r}")
        for j, op in enumerate(ops):
            if not isinstance(op, dict) or "op" not in op:
                raise ConfigError(f"{where}.operators.{j}", f"an operator is a mapping with an 'op' key, got {op!r}")
    return plain
