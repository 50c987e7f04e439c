"""Video splits through ``tokenprune run``: the check that the model's adapter can
build the clip's inputs without transformers' video processors (which need torchvision) — Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, Qwen3.5 and LLaVA-OneVision (:meth:`~tokenprune.adapters.base.ModelAdapter.frame_video_inputs`). The
prompt around a clip is :func:`tokenprune.reference.model.prompt` with ``video=True``."""

from __future__ import annotations

from tokenprune.adapters import adapter_class
from tokenprune.core.errors import ConfigError


def check_video_family(config, key: str = "data.source") -> None:
    """Refuse a video split for a model whose video inputs tokenprune cannot build (``config``: its config.json)."""
    if config.model_type not in adapter_class(config).frame_videos:
        raise ConfigError(key, "a video split runs on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision models "
                               f"(their video inputs are built from the image processor); this model is "
                               f"{config.model_type!r}")

