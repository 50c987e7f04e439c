"""Model adapters: the only place that knows a model family's internals."""

from __future__ import annotations

from torch import nn

from tokenprune.adapters.base import ModelAdapter
from tokenprune.adapters.llava import LlavaAdapter
from tokenprune.adapters.llava_next import LlavaNextAdapter
from tokenprune.adapters.mllama import MllamaAdapter
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: cls for cls in (LlavaAdapter, LlavaNextAdapter, MllamaAdapter, Qwen2VLAdapter) for t in cls.model_types
}


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise TypeError(
            f"no tokenprune adapter for model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "LlavaAdapter", "LlavaNextAdapter", "MllamaAdapter", "ModelAdapter", "Qwen2VLAdapter", "get_adapter"]
