"""Reuse of one batch's vision-tower pass across the runs of one evaluation (opt-in).

Every entry of ``runs`` evaluates the same samples in the same batches, and all pre-LLM methods
read the same frozen tower: without sharing, the tower runs once per method. With
``runner.share_vision: true`` the evaluation keeps, per batch (keyed by its sample ids and pixel
shape), the feature-layer and last hidden states and the q/k captures of the layers the runs
need (their union, given up front). A run whose layers are all present skips the tower;
otherwise the tower runs again under that run's hooks and the entry gains its layers.

Timing stays honest: a reused pass reports the vision-stage span measured when it ran, so every
run's latency still includes one tower pass. Memory grows with the number of batches (about
``(2 + 2 * layers) * B * (N+1) * C`` values each), which is why this is off by default and on only
in the offline demo, whose subsets are small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TowerPass:
    """One batch's tower outputs. Tensors keep the model's device and dtype."""

    hidden: torch.Tensor  # [B,N+1,C] hidden state of the feature layer
    last_hidden: torch.Tensor  # [B,N+1,C] last_hidden_state (pre post_layernorm)
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B,N+1,C]
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B,N+1,C]
    span: tuple[Any, Any] | None = None  # timer marks of the pass that produced it

    def covers(self, q_layers: Sequence[int], k_layers: Sequence[int]) -> bool:
        return all(i in self.q for i in q_layers) and all(i in self.k for i in k_layers)


class VisionCache:
    """Tower passes by batch key; see the module docstring. ``hits``/``misses`` count lookups."""

    def __init__(self, q_layers: Sequence[int] = (), k_layers: Sequence[int] = ()) -> None:
        # layers every pass captures, whichever run triggers it (the union over the runs), so
        # that one pass per batch serves them all
        self.q_layers = tuple(sorted(set(q_layers)))
        self.k_layers = tuple(sorted(set(k_layers)))
        self._entries: dict[tuple, TowerPass] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(sample_ids: Sequence[str], pixel_values: torch.Tensor) -> tuple:
        return (tuple(str(s) for s in sample_ids), tuple(pixel_values.shape))

    def get(self, key: tuple, q_layers: Sequence[int], k_layers: Sequence[int]) -> TowerPass | None:
        entry = self._entries.get(key)
        if entry is not None and entry.covers(q_layers, k_layers):
            self.hits += 1
            return entry
        self.misses += 1
        return None

    def put(self, key: tuple, new: TowerPass) -> None:
        """Store ``new``, keeping the q/k of layers an older pass of the same batch captured."""
        old = self._entries.get(key)
        if old is not None:
            new.q = {**old.q, **new.q}
            new.k = {**old.k, **new.k}
        self._entries[key] = new

    def __len__(self) -> int:
        return len(self._entries)
