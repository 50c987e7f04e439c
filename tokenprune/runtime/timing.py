"""Wall time of a block, for the time spent inside operators."""

from __future__ import annotations

import time

import torch


class Stopwatch:
    """Wall time of a block in ms (the device synchronised at both ends when ``like`` is on a GPU); with ``into``,
    also added there under ``label``."""

    def __init__(self, like: torch.Tensor, into: dict[str, float] | None = None, label: str = ""):
        self._cuda = like.is_cuda
        self.ms = 0.0
        self._into, self._label = into, label

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.ms = (time.perf_counter() - self._t0) * 1000.0
        if self._into is not None:
            self._into[self._label] = self._into.get(self._label, 0.0) + self.ms
