"""Wall-clock timing of generation steps."""

from __future__ import annotations

import time
from typing import Any

import torch


class StepClock:
    """A logits processor that stamps the time of every generation step (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: list[Any] = []

    def start(self) -> None:
        self.stamps = [self._now()]

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def __call__(self, input_ids, scores):
        self.stamps.append(self._now())
        return scores

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.stamps, self.stamps[1:])]
        return [(b - a) * 1000.0 for a, b in zip(self.stamps, self.stamps[1:])]
