"""tokenprune: visual-token pruning for vision-language models as YAML pipelines of small operators."""

from tokenprune.errors import ConfigError, PipelineRuntimeError
from tokenprune.operator import (
    KINDS,
    Compactor,
    Merger,
    Scorer,
    Selector,
    Shift,
    TokenOperator,
)
from tokenprune.pipeline import Pipeline, Stage, StageTrace, load_pipeline, resolve_pipeline_config
from tokenprune.registry import build_operator, register_operator, registered_operators
from tokenprune.state import Signals, TokenState

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
