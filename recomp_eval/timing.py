"""Stage timings: CUDA events on GPU, a monotonic clock on CPU.

A :class:`StageTimer` records marks without synchronising; :meth:`StageTimer.results_ms`
synchronises once and turns spans into milliseconds. Marks can be taken from inside
``generate`` through :class:`FirstTokenMark` (a no-op logits processor that marks the first
token, i.e. the end of prefill).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

STAGES = ("vision", "text", "compression", "prefill", "decode")
_MS_PER_S = 1000.0


class StageTimer:
    """Collects named spans between marks for one batch."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._spans: dict[str, list[tuple[Any, Any]]] = {}

    def mark(self) -> Any:
        """A point in time: a recorded CUDA event, or ``time.perf_counter()`` on CPU."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, name: str, start: Any, end: Any) -> None:
        """Add a span; several spans under one name are summed."""
        self._spans.setdefault(name, []).append((start, end))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self.mark()
        try:
            yield
        finally:
            self.add(name, start, self.mark())

    def results_ms(self) -> dict[str, float]:
        """Milliseconds per stage (every name in :data:`STAGES` present; 0 if not timed)."""
        if self.cuda and self._spans:
            torch.cuda.synchronize()
        out = dict.fromkeys(STAGES, 0.0)
        for name, spans in self._spans.items():
            if self.cuda:
                total = sum(start.elapsed_time(end) for start, end in spans)
            else:
                total = sum((end - start) * _MS_PER_S for start, end in spans)
            out[name] = float(total)
        return out


class FirstTokenMark:
    """Logits processor that marks the first call (prefill done) and leaves scores untouched."""

    def __init__(self, timer: StageTimer) -> None:
        self.timer = timer
        self.first: Any = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = self.timer.mark()
        return scores
