"""Wall-clock timing of generation steps."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tokenprune.adapters import get_adapter


def stamp(cuda: bool) -> Any:
    """A point in time: a recorded CUDA event on a GPU (read once the GPU has synchronised), else the wall clock."""
    if cuda:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


class StepClock:
    """A logits processor that stamps the time of every generation step (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: list[Any] = []

    def start(self) -> None:
        self.stamps = [self._now()]

    def _now(self):
        return stamp(self.cuda)

    def __call__(self, input_ids, scores):
        self.stamps.append(self._now())
        return scores

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.stamps, self.stamps[1:])]
        return [(b - a) * 1000.0 for a, b in zip(self.stamps, self.stamps[1:])]


class VisionClock:
    """Times and records the calls of a model's vision side (:meth:`~tokenprune.adapters.base.ModelAdapter.
    vision_modules`: the tower and the projector) while attached (``with VisionClock(model) as vc:``): the
    wall time inside them (CUDA events on a GPU; a call nested in another is counted once) and each outermost
    call's module and arguments, so that :meth:`flops` can count the FLOPs of exactly those calls afterwards."""

    def __init__(self, model):
        self.modules = get_adapter(model).vision_modules()
        self.cuda = next(model.parameters()).is_cuda
        self.calls: list[tuple[Any, tuple, dict]] = []
        self.spans: list[tuple[Any, Any]] = []
        self._depth = 0
        self._start: Any = None
        self._handles: list[Any] = []

    def _now(self):
        return stamp(self.cuda)

    def _enter(self, module, args, kwargs):
        if self._depth == 0:
            self._start = self._now()
            self.calls.append((module, args, kwargs))
        self._depth += 1

    def _exit(self, module, args, kwargs, output):
        self._depth -= 1
        if self._depth == 0:
            self.spans.append((self._start, self._now()))

    def __enter__(self) -> VisionClock:
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._enter, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._exit, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def ms(self) -> float:
        """Wall time spent in the vision modules since attached (ms)."""
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans)
        return sum((b - a) * 1000.0 for a, b in self.spans)

    def flops(self, cache: dict | None = None) -> float:
        """FLOPs of the recorded calls in the ``exact`` convention (2 per multiply-add of every matmul, the
        attention products included), counted by ``torch.utils.flop_counter`` on a rerun of each call once the
        clock is detached (call it outside any hooks that should not see the rerun). On a CPU the rerun's
        attention takes PyTorch's math path, whose matmuls the counter sees (its CPU flash kernel it does not).
        ``cache`` (a dict kept across calls) reuses a count for a call of the same module on arguments of the same
        shapes and the same small integer tensors (patch grids, image sizes), which fix a tower's FLOPs."""
        total = 0.0
        for module, args, kwargs in self.calls:
            key = (id(module), _call_signature(args), _call_signature(kwargs))
            if cache is not None and key in cache:
                total += cache[key]
                continue
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                if self.cuda:
                    module(*args, **kwargs)
                else:
                    with sdpa_kernel(SDPBackend.MATH):
                        module(*args, **kwargs)
            count = float(counter.get_total_flops())
            if cache is not None:
                cache[key] = count
            total += count
        return total


def _call_signature(value: Any) -> Any:
    """What fixes a call's FLOPs in ``value``: tensors by shape (and by value when small and integer), the rest
    as given."""
    if isinstance(value, torch.Tensor):
        small = value.numel() <= 256 and not value.is_floating_point()
        return ("tensor", tuple(value.shape), str(value.dtype), tuple(value.flatten().tolist()) if small else None)
    if isinstance(value, dict):
        return tuple(sorted((k, _call_signature(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_call_signature(v) for v in value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
