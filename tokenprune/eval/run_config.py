"""The run config: defaults, the YAML file, overrides, checked with errors naming the key; and the pipeline it
names."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tokenprune.core.errors import ConfigError
from tokenprune.pipeline import load_pipeline

DEFAULTS: dict[str, Any] = {
    "model": {"path": "reference", "dtype": "float32", "attn_implementation": "sdpa", "device_map": None,
              "trust_remote_code": False},
    "data": {"source": "shapes", "split": "test", "limit": None, "path": None, "metric": None,
             "lmms_eval": None},  # lmms-eval tasks instead of items: a list, or {tasks, include_path, metrics}
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
    "baseline_cache": "runs/.baselines",  # null: no cache
}
DTYPES = ("float32", "float16", "bfloat16")
WANDB_MODES = ("offline", "online", "disabled")


def load_run_config(path: str | Path | None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults, then the YAML file, then ``KEY=VALUE`` overrides; checked, with errors naming the key."""
    cfg = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(cfg, True)
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(None, f"no such run config: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf names the key
        raise ConfigError(None, f"run config{f' {path}' if path else ''}: {e}") from None
    if cfg.model.dtype not in DTYPES:
        raise ConfigError("model.dtype", f"{cfg.model.dtype!r}; allowed: {', '.join(DTYPES)}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError("batch_size", f"must be a positive integer, got {cfg.batch_size!r}")
    if cfg.logging.wandb.mode not in WANDB_MODES:
        raise ConfigError("logging.wandb.mode", f"{cfg.logging.wandb.mode!r}; allowed: {', '.join(WANDB_MODES)}")
    if cfg.flops_convention not in ("fastv", "exact"):
        raise ConfigError("flops_convention", f"{cfg.flops_convention!r}; allowed: fastv, exact")
    if cfg.data.path and path is not None and not Path(cfg.data.path).is_absolute():
        relative = Path(path).parent / cfg.data.path  # a data path relative to the config file, when it is there
        if relative.exists():
            cfg.data.path = str(relative)
    spec = cfg.data.lmms_eval
    if isinstance(spec, DictConfig) and spec.get("include_path") and path is not None \
            and not Path(spec.include_path).is_absolute() and (Path(path).parent / spec.include_path).exists():
        spec.include_path = str(Path(path).parent / spec.include_path)
    return cfg


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


def resolved_config_yaml(cfg: DictConfig, pipeline) -> str:
    """A run directory's ``config.yaml``: the run config plus ``resolved_pipeline`` (the pipeline's config after
    its overrides; None for the unpruned model). The sweep compares it to tell whether a finished run is stale."""
    resolved = OmegaConf.to_container(cfg)
    resolved["resolved_pipeline"] = OmegaConf.to_container(pipeline.config) if pipeline is not None and \
        pipeline.config is not None else None
    return OmegaConf.to_yaml(OmegaConf.create(resolved))
