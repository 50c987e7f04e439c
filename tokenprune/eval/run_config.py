"""The run config: defaults, the YAML file, overrides, each value typed and checked with errors naming the key;
and the pipeline it names.

Every key is typed (:mod:`tokenprune.core.values`): a quoted ``'false'`` is not a boolean, ``'8'`` not an
integer. The run config is the user's own file, so it may refer to its own keys (``output_dir:
runs/${pipeline}``); resolvers (``${oc.env:HOME}``, any ``${name:...}``) are refused, so no value reads the
environment.
"""

from __future__ import annotations

import copy
import difflib
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokenprune.core.config import parse_override
from tokenprune.core.errors import ConfigError
from tokenprune.core.paths import writable_folder
from tokenprune.core.values import (
    Bool,
    Fields,
    Float,
    Int,
    ListOf,
    MappingOf,
    OneOf,
    Optional,
    Spec,
    Str,
    check_schema,
)
from tokenprune.core.yaml_files import read_yaml, refuse_interpolation
from tokenprune.eval.scoring import METRICS, SOURCES
from tokenprune.pipeline import load_pipeline

DEFAULTS: dict[str, Any] = {
    "model": {"path": "reference", "dtype": "float32", "attn_implementation": "sdpa", "device_map": None,
              "trust_remote_code": False},
    "data": {"source": "shapes", "split": "test", "limit": None, "path": None, "metric": None,
             "lmms_eval": None,  # lmms-eval tasks instead of items: a list, or {tasks, include_path, metrics}
             "filter": None},  # {hard_for: PIPELINE or unpruned, below: 0.5}: also score the items it gets wrong
    "pipeline": "asap",  # a preset name, a YAML path, or an inline mapping
    "overrides": [],  # KEY=VALUE overrides of the pipeline
    "generation": {"max_new_tokens": 4, "do_sample": False},
    "batch_size": 16,
    "seed": 0,
    "flops_convention": "exact",
    "trainer": {"accelerator": "auto", "devices": 1, "strategy": "auto", "precision": "32-true"},
    "logging": {"wandb": {"mode": "offline", "project": "tokenprune", "group": None, "tags": []},
                "progress_bar": True, "samples": 20},
    "output_dir": None,  # null: runs/<pipeline>-<time>
    "overwrite": False,  # replace the finished results of another run in output_dir
    "baseline_cache": "runs/.baselines",  # null: no cache
}
DTYPES = ("float32", "float16", "bfloat16")
WANDB_MODES = ("offline", "online", "disabled")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true",
              "ddp_find_unused_parameters_false", "fsdp", "single_device")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "32", "16", "bf16", "64")
#: The options of ``model.generate()`` a run accepts under ``generation:``. Beam search (``num_beams``) is left
#: out: a beam multiplies the batch after the prefill, and the per-item costs (KV bytes, kept tokens) would be
#: a beam's, not the item's.
GENERATION: dict[str, Spec] = {
    "max_new_tokens": Int(1), "min_new_tokens": Int(0), "do_sample": Bool(), "temperature": Float(above=0),
    "top_p": Float(above=0, maximum=1), "top_k": Int(0), "repetition_penalty": Float(above=0),
    "no_repeat_ngram_size": Int(0),
}
SCHEMA: dict[str, Any] = {
    "model": {"path": Str(), "dtype": Str(DTYPES), "attn_implementation": Str(ATTENTION),
              "device_map": Optional(OneOf(Str(), MappingOf())), "trust_remote_code": Bool()},
    "data": {"source": Str(SOURCES), "split": Optional(Str()), "limit": Optional(Int(1)), "path": Optional(Str()),
             "metric": Optional(Str(METRICS)),
             "lmms_eval": Optional(OneOf(Str(), ListOf(Str()), MappingOf())),
             "filter": Optional(Fields({"hard_for": OneOf(Str(), MappingOf(), allowed="a preset name, a pipeline "
                                                                                     "YAML path or mapping, or "
                                                                                     "unpruned"),
                                        "overrides": ListOf(Str()), "below": Float(above=0, maximum=1)},
                                       required=("hard_for",)))},
    "pipeline": Optional(OneOf(Str(), MappingOf())),
    "overrides": ListOf(Str()),
    "generation": GENERATION,
    "batch_size": Int(1),
    "seed": Int(0, 2**32 - 1),
    "flops_convention": Str(("exact", "fastv")),
    "trainer": {"accelerator": Str(ACCELERATORS), "devices": OneOf(Int(1), Str(("auto",)), ListOf(Int(0)),
                                                             allowed="a positive integer, auto, or a list of device "
                                                                     "indices"),
                "strategy": Str(STRATEGIES), "precision": OneOf(Str(PRECISIONS), Int(16, 64))},
    "logging": {"wandb": {"mode": Str(WANDB_MODES), "project": Str(), "group": Optional(Str()),
                          "tags": ListOf(Str())},
                "progress_bar": Bool(), "samples": Int(0)},
    "output_dir": Optional(Str()),
    "overwrite": Bool(),
    "baseline_cache": Optional(Str()),
}


def read_run_directory(run_dir: str | Path, key: str | None) -> dict[str, Any]:
    """The run config a run directory recorded (its ``config.yaml``, with ``resolved_pipeline``); errors under
    ``key`` when the folder holds none or it is not a mapping."""
    recorded = Path(run_dir) / "config.yaml"
    if not recorded.is_file():
        raise ConfigError(key, f"{str(run_dir)!r} holds no config.yaml: not a run directory")
    raw = read_yaml(recorded, "run directory config")
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"{recorded} is not a run config (a mapping of keys)")
    return dict(raw)


def load_rerun_config(run_dir: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """``tokenprune run --from RUN_DIR``: the run config a run directory recorded (its ``config.yaml``), with
    the pipeline as it was resolved then (``resolved_pipeline``: a preset edited since does not change the
    rerun), a new run directory (``output_dir: null``), no baseline cache (the baseline is computed again, so
    that both halves are reproduced), then ``overrides``."""
    if not Path(run_dir).is_dir():
        raise ConfigError("--from", f"{str(run_dir)!r} is not a folder (a run directory: tokenprune run writes one)")
    raw = read_run_directory(run_dir, "--from")
    recorded = Path(run_dir) / "config.yaml"
    if "resolved_pipeline" not in raw:
        raise ConfigError("--from", f"{recorded} has no resolved_pipeline: not written by tokenprune run")
    resolved = raw.pop("resolved_pipeline")
    if resolved is not None:
        raw["pipeline"], raw["overrides"] = resolved, []
    raw.update(output_dir=None, baseline_cache=None, overwrite=False)
    return _load(raw, None, overrides)


def load_run_config(path: str | Path | None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults, then the YAML file, then ``KEY=VALUE`` overrides; checked, with errors naming the key."""
    raw = None
    if path is not None:
        raw = read_yaml(path, "run config")
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(None, f"run config {path}: must be a mapping of keys ({', '.join(SCHEMA)}), "
                                    f"got {type(raw).__name__}")
    return _load(raw, path, overrides)


def _load(raw: Mapping[str, Any] | None, path: str | Path | None, overrides: Iterable[str]) -> DictConfig:
    data: dict[str, Any] = copy.deepcopy(DEFAULTS)
    if raw is not None:
        if isinstance(raw.get("generation"), Mapping) and "num_beams" in raw["generation"]:
            _refuse_beams()
        check_schema(raw, _loose(SCHEMA))  # unknown keys named here, before the merge
        _merge(data, raw)
    for item in overrides:
        key, value = parse_override(item, "generation.max_new_tokens=8")
        if key == "generation.num_beams" or (key == "generation" and isinstance(value, Mapping)
                                             and "num_beams" in value):
            _refuse_beams()
        _set(data, key, value)
    refuse_interpolation(data, what="a run config", resolvers_only=True)
    data = _resolve(data)
    data = check_schema(data, SCHEMA)
    gen = data["generation"]
    if gen.get("min_new_tokens", 0) > gen["max_new_tokens"]:
        raise ConfigError("generation.min_new_tokens", f"{gen['min_new_tokens']} is more than "
                                                       f"generation.max_new_tokens ({gen['max_new_tokens']})")
    cfg = OmegaConf.create(data)
    OmegaConf.set_struct(cfg, True)
    if cfg.data.path and path is not None and not Path(cfg.data.path).is_absolute():
        relative = Path(path).parent / cfg.data.path  # a data path relative to the config file, when it is there
        if relative.exists():
            cfg.data.path = str(relative)
    spec = cfg.data.lmms_eval
    if isinstance(spec, DictConfig) and isinstance(spec.get("include_path"), str) and path is not None \
            and not Path(spec.include_path).is_absolute() and (Path(path).parent / spec.include_path).exists():
        spec.include_path = str(Path(path).parent / spec.include_path)
    return cfg


def _refuse_beams():
    raise ConfigError("generation.num_beams", "beam search is not supported: a beam multiplies the batch after the "
                                              "prefill, so per-item costs would be a beam's; allowed in generation: "
                                              + ", ".join(GENERATION))


def _loose(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` with every value accepted: only the key names are checked (types after the merge)."""
    return {k: _loose(v) if isinstance(v, Mapping) else Spec() for k, v in schema.items()}


def _merge(into: dict[str, Any], new: Mapping[str, Any], schema: Mapping[str, Any] = SCHEMA) -> None:
    """``new`` merged into ``into``: a section (a mapping in the schema) key by key, any other key replaced."""
    for k, v in new.items():
        if isinstance(schema.get(k), Mapping) and isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v, schema[k])
        else:
            into[k] = copy.deepcopy(v)


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """One override: ``key`` a dotted path of the schema (below a free mapping such as an inline pipeline, any
    path)."""
    parts = key.split(".")
    node, schema = data, SCHEMA
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if schema is not None:
            if part not in schema:
                close = difflib.get_close_matches(part, list(schema), n=1)
                prefix = ".".join(parts[:i])
                hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
                raise ConfigError(here, f"unknown key{hint}; allowed{' in ' + prefix if prefix else ''}: "
                                        f"{', '.join(schema)}")
            sub = schema[part]
            if last:
                if isinstance(sub, Mapping) and isinstance(value, Mapping) and isinstance(node.get(part), dict):
                    _merge(node[part], value, sub)
                else:
                    node[part] = value
                return
            if isinstance(sub, Mapping):
                schema = sub
            elif _takes_mapping(sub):
                fields = _fields_of(sub)  # a typed section under a default of null (data.filter): its keys named
                schema = dict(fields.schema) if fields is not None else None
                if not isinstance(node.get(part), dict):
                    node[part] = {}
            else:
                raise ConfigError(here, f"is a single value ({sub.allowed}), not a section: set {here}=VALUE")
        elif last:
            node[part] = value
            return
        elif not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]


def _fields_of(spec: Spec) -> Fields | None:
    if isinstance(spec, Fields):
        return spec
    inner = getattr(spec, "spec", None)
    for s in getattr(spec, "specs", ()) + ((inner,) if inner is not None else ()):
        found = _fields_of(s)
        if found is not None:
            return found
    return None


def _takes_mapping(spec: Spec) -> bool:
    if isinstance(spec, (MappingOf, Fields)):
        return True
    inner = getattr(spec, "spec", None)  # Optional's
    specs = getattr(spec, "specs", ()) + ((inner,) if inner is not None else ())  # OneOf's
    return any(_takes_mapping(s) for s in specs)


def _resolve(data: dict[str, Any]) -> dict[str, Any]:
    """``${key.path}`` references replaced by the values they name; an error names the key that refers."""
    if "${" not in repr(data):
        return data
    cfg = OmegaConf.create(data)
    out: dict[str, Any] = {}
    for key in data:
        try:
            out[key] = OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig) \
                or OmegaConf.is_list(cfg[key]) else cfg[key]
        except OmegaConfBaseException as e:
            where = getattr(e, "full_key", None) or key
            message = str(e).splitlines()[0]
            raise ConfigError(str(where), f"interpolation failed: {message}") from None
    return out


def resolve_pipeline(cfg: DictConfig):
    """The run's pipeline (validated), or None for ``pipeline: none``."""
    return resolve_pipeline_spec(cfg.pipeline, list(cfg.overrides))


def resolve_pipeline_spec(spec: Any, overrides: list[str], key: str = "pipeline"):
    """The pipeline ``spec`` names (a preset name, a YAML path or a mapping; None or ``none``: no pipeline), with
    ``overrides``; errors are reported under ``key``."""

    if spec is None or spec == "none":
        return None
    try:
        return load_pipeline(OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec, overrides)
    except ConfigError as e:
        raise ConfigError(f"{key}{'.' + e.key if e.key else ''}", e.detail) from None


#: The item score under which the difficulty filter's pipeline counts an item as wrong (exact match and yes/no:
#: wrong; VQA soft accuracy: at most one annotator's answer matched).
HARD_BELOW = 0.5


def resolve_filter(cfg: DictConfig):
    """``(name, pipeline or None, below)`` of the run's difficulty filter (``data.filter``): the pipeline whose
    wrong answers pick the hard items (None: the unpruned model), checked before any model loads; None when the
    run has no filter."""
    spec = cfg.data.get("filter")
    if spec is None:
        return None
    if cfg.data.lmms_eval is not None:
        raise ConfigError("data.filter", "a difficulty filter scores items; an lmms-eval run scores tasks (drop "
                                         "data.filter or data.lmms_eval)")
    below = float(spec.get("below") or HARD_BELOW)
    if spec.hard_for == "unpruned":
        return "unpruned", None, below
    pipe = resolve_pipeline_spec(spec.hard_for, list(spec.get("overrides") or []), key="data.filter.hard_for")
    if pipe is None:
        raise ConfigError("data.filter.hard_for", "got none; allowed: a preset name, a pipeline YAML path or "
                                                  "mapping, or unpruned")
    return pipe.name, pipe, below


def resolved_config_yaml(cfg: DictConfig, pipeline) -> str:
    """A run directory's ``config.yaml``: the run config plus ``resolved_pipeline`` (the pipeline's config after
    its overrides; None for the unpruned model). The sweep compares it to tell whether a finished run is stale."""
    resolved = OmegaConf.to_container(cfg)
    resolved["resolved_pipeline"] = OmegaConf.to_container(pipeline.config) if pipeline is not None and \
        pipeline.config is not None else None
    return OmegaConf.to_yaml(OmegaConf.create(resolved))


FINISHED = "metrics.json"  # written last: a run directory holding it is a finished run


def run_directory(cfg: DictConfig, name: str) -> Path:
    """The run's directory, checked before any model loads: ``output_dir``, or (null) a new
    ``runs/<name>-<date-time>``. A directory that cannot be created is an error naming ``output_dir``, as is
    one holding another finished run, unless ``overwrite: true``; so is a ``baseline_cache`` that is not a
    folder. A finished run of this same config is fine (the caller reads it back)."""
    if cfg.output_dir:
        out = Path(cfg.output_dir)
    else:
        stem = f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        out, n = Path(stem), 2
        while out.exists():
            out, n = Path(f"{stem}-{n}"), n + 1
    writable_folder(out, "output_dir")
    if cfg.baseline_cache:
        writable_folder(Path(cfg.baseline_cache), "baseline_cache")
    return out


def finished_run(out: Path, config_text: str, overwrite: bool) -> dict[str, Any] | None:
    """The metrics of the finished run in ``out`` when its ``config.yaml`` is ``config_text`` (the same run);
    None when ``out`` holds no finished run, or holds one and ``overwrite`` is true. Another finished run is an
    error: its results are never replaced silently."""
    done = out / FINISHED
    if not done.is_file() or overwrite:
        return None
    previous = out / "config.yaml"
    if previous.is_file() and previous.read_text() == config_text:
        try:
            return json.loads(done.read_text())
        except json.JSONDecodeError:
            return None  # a damaged metrics.json is computed again
    raise ConfigError("output_dir", f"{out} holds the finished results of another run ({FINISHED}); set "
                                    "overwrite=true to replace them, or choose another output_dir")


