"""``Pipeline``: the stages built from YAML, and the object a user attaches to a model.

The language (sites, stages, operators, validation) lives in :mod:`tokenprune.core`; attaching runs it
through :mod:`tokenprune.runtime`, which is why this module sits above both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from tokenprune.core.config import (
    apply_overrides,
    import_plugins,
    load_source,
    validate_input,
    validate_pipeline_config,
)
from tokenprune.core.errors import ConfigError
from tokenprune.core.learned import learned_operators
from tokenprune.core.registry import build_operator
from tokenprune.core.stage import Stage
from tokenprune.core.trace import StageTrace
from tokenprune.runtime.attach import AttachedPipeline


class Pipeline(nn.Module):
    """A list of stages built from a YAML config; ``with pipeline.attach(model): ...`` runs it.

    After a forward, :attr:`trace` holds one :class:`StageTrace` per stage that ran.
    """

    def __init__(self, stages: Iterable[Stage], name: str = "pipeline", config: DictConfig | None = None,
                 input: Mapping[str, float] | None = None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.name = name
        self.config = config
        #: What happens to the images before the processor (``{"scale": s}``: each side times s), or None.
        self.input = dict(input) if input else None
        self.trace: list[StageTrace] = []
        self.runs: list[int] = [0] * len(self.stages)
        #: time each operator of a stage on its own (``StageTrace.operator_ms_by_op``); on a GPU this
        #: synchronises between operators, so it is off unless asked for (``tokenprune bench`` turns it on)
        self.time_operators = False
        self.train(False)  # a learned operator builds autograd graphs only when put in training (train-operator)

    def attach(self, model: nn.Module, guide: nn.Module | None = None,
               images_prepared: bool = False) -> AttachedPipeline:
        """Install the pipeline's hooks on ``model`` for the duration of a ``with`` block.

        ``guide``: a small VLM that tokenises images like ``model``, for the ``guide_model`` scorer (SGL).
        ``images_prepared``: the inputs were made from images passed through :meth:`prepare_images` (required
        when the pipeline has ``input`` settings, which no hook inside the model can apply).
        """
        if self.input is not None and not images_prepared:
            raise ConfigError("input", f"{self.name!r} changes the images before the processor ({self.input}): "
                                       "make the inputs from pipeline.prepare_images(images) and attach with "
                                       "images_prepared=True (tokenprune run, sweep and the lmms-eval model do)")
        return AttachedPipeline(self, model, guide=guide)

    def prepare_images(self, images: list[Any]) -> list[Any]:
        """The images as the pipeline's ``input`` shows them to the processor: each side scaled by ``scale``
        (bicubic, at least 1 px; the downsampling baseline). Unchanged without ``input``. PIL images, or lists of
        them (several images a sample)."""
        if self.input is None:
            return list(images)
        return [self.prepare_images(im) if isinstance(im, list) else _scaled(im, self.input["scale"])
                for im in images]

    def validate_for_depth(self, num_layers: int) -> None:
        """Check every site against a model with ``num_layers`` decoder layers."""
        for stage in self.stages:
            stage.check_depth(num_layers)

    def report(self) -> str:
        """Per-stage kept counts of the last prefill, one line per stage."""
        if not self.trace:
            return f"{self.name}: no stage has run"
        lines = []
        for t in self.trace:
            where = {"prefill": f"layer {t.layer}", "kv_cache": f"layer {t.layer}'s KV cache",
                     "decode": f"layer {t.layer}'s KV cache, decoding step {t.step}"}[t.site]
            lines.append(f"stage {t.stage} ({where}): visual tokens {t.visual_before} -> {t.visual_after}, "
                         f"tokens {t.tokens_before} -> {t.tokens_after}")
        return "\n".join(lines)


def build_pipeline(cfg: DictConfig, plugin_folders: Iterable[str | Path] = ()) -> Pipeline:
    """Validate a pipeline config and build its operators (``plugin_folders``: where plugins are looked up
    first, besides the working directory)."""
    import_plugins(cfg.get("plugins"), plugin_folders)
    stages = []
    for i, raw in enumerate(validate_pipeline_config(cfg)):
        ops = []
        for j, op_cfg in enumerate(raw["operators"]):
            params = {k: v for k, v in op_cfg.items() if k != "op"}
            ops.append(build_operator(op_cfg["op"], _key=f"stages.{i}.operators.{j}.op", **params))
        stages.append(Stage(raw["layer"], ops, key=f"stages.{i}", positions=raw.get("positions", "keep"),
                            protect=raw.get("protect", ()), cache=raw.get("cache"),
                            budget=raw.get("budget", "per_image")))
    for op in learned_operators(stages):  # the config pins the weights it was built with (a rerun checks them)
        if op.params.sha256:
            OmegaConf.update(cfg, f"{op.config_key}.sha256", op.params.sha256, force_add=True)
    return Pipeline(stages, name=str(cfg.get("name", "pipeline")), config=cfg, input=validate_input(cfg))


def _scaled(image: Any, scale: float) -> Any:
    w, h = image.size
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def resolve_pipeline_config(source: str | Path | Mapping | DictConfig, overrides: Iterable[str] = ()) -> DictConfig:
    """The config of ``source`` with ``overrides`` applied, validated and with operator defaults filled in."""
    cfg = apply_overrides(load_source(source), overrides)
    pipeline = build_pipeline(cfg, _source_folder(source))
    resolved: dict[str, Any] = {"name": pipeline.name}
    if cfg.get("plugins"):
        resolved["plugins"] = list(cfg.plugins)
    if pipeline.input is not None:
        resolved["input"] = dict(pipeline.input)
    resolved["stages"] = [
        {"layer": s.layer, "positions": s.positions, **({"protect": list(s.protect)} if s.protect else {}),
         **({"budget": s.budget} if s.budget != "per_image" else {}),
         **({"cache": s.cache.as_dict()} if s.cache is not None else {}),
         "operators": [{"op": op.op_name, **OmegaConf.to_container(OmegaConf.structured(op.params))}
                                         for op in s.operators]}
        for s in pipeline.stages
    ]
    return OmegaConf.create(resolved)


def load_pipeline(source: str | Path | Mapping | DictConfig, overrides: Iterable[str] = ()) -> Pipeline:
    """Build a :class:`Pipeline` from a preset name, a YAML path, a dict or a DictConfig.

    >>> pipe = load_pipeline("fastv", ["stages.0.operators.1.keep=0.25"])
    """
    cfg = apply_overrides(load_source(source), overrides)
    return build_pipeline(cfg, _source_folder(source))


def _source_folder(source: Any) -> list[Path]:
    """The folder of a pipeline given as a YAML file (its plugins are looked up there)."""
    if isinstance(source, (str, Path)) and Path(source).is_file():
        return [Path(source).parent]
    return []

