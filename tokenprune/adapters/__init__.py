"""Model adapters: the only place that knows a model family's internals."""

from __future__ import annotations

from torch import nn

from tokenprune.adapters.base import ModelAdapter, ModelFacts
from tokenprune.adapters.gemma3 import Gemma3Adapter
from tokenprune.adapters.internvl import InternVLAdapter
from tokenprune.adapters.llava import LlavaAdapter
from tokenprune.adapters.llava_next import LlavaNextAdapter
from tokenprune.adapters.llava_onevision import LlavaOnevisionAdapter
from tokenprune.adapters.mllama import MllamaAdapter
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter
from tokenprune.adapters.qwen3_5 import Qwen3_5Adapter
from tokenprune.adapters.qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: cls for cls in (Gemma3Adapter, InternVLAdapter, LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, MllamaAdapter,
                                 Qwen2VLAdapter, Qwen3_5Adapter, Qwen3VLAdapter) for t in cls.model_types
}


def adapter_class(config: object, what: str = "") -> type[ModelAdapter]:
    """The adapter class for a model with ``config``, chosen from ``config.model_type`` (``what``: the model, for
    the message)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise TypeError(f"no tokenprune adapter for model_type {model_type!r}{f' ({what})' if what else ''}; "
                        f"supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, chosen from ``model.config.model_type``."""
    return adapter_class(getattr(model, "config", None), type(model).__name__)(model)


__all__ = ["ADAPTERS", "Gemma3Adapter", "InternVLAdapter", "LlavaAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter", "MllamaAdapter", "ModelAdapter", "ModelFacts", "Qwen2VLAdapter", "Qwen3_5Adapter",
           "Qwen3VLAdapter",
           "adapter_class", "get_adapter"]
