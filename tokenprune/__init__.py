"""tokenprune: visual-token pruning for vision-language models as YAML pipelines of small operators."""

from tokenprune.core.errors import ConfigError, PipelineRuntimeError
from tokenprune.core.operator import (
    KINDS,
    Compactor,
    Merger,
    Scorer,
    Selector,
    Shift,
    TokenOperator,
)
from tokenprune.core.registry import build_operator, register_operator, registered_operators
from tokenprune.core.stage import Stage
from tokenprune.core.state import Signals, TokenState
from tokenprune.core.trace import StageTrace
from tokenprune.pipeline import Pipeline, load_pipeline, resolve_pipeline_config

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "Compactor",
    "ConfigError",
    "Merger",
    "Pipeline",
    "PipelineRuntimeError",
    "Scorer",
    "Selector",
    "Shift",
    "Signals",
    "Stage",
    "StageTrace",
    "TokenOperator",
    "TokenState",
    "build_operator",
    "load_pipeline",
    "register_operator",
    "registered_operators",
    "resolve_pipeline_config",
]

import tokenprune.operators  # noqa: E402,F401  (registers the built-in operators)
