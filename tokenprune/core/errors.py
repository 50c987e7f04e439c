"""Errors that name the YAML key, what was given and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported against its key path (``stages.0.operators.1.keep``).

    The CLI prints the message without a traceback and exits with code 2.
    """

    def __init__(self, key: str | None, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)


class PipelineRuntimeError(RuntimeError):
    """A pipeline met inputs it cannot handle while running on a model."""
