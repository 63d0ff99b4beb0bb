"""Random baseline: keep T patches uniformly without replacement, in raster order.

Each sample's subset depends only on its own seed (``signals.seeds``, a hash of the sample id made
by the adapter) and on ``cfg.seed``, never on the batch it sits in or the device: every patch ``p``
gets the 64-bit key ``splitmix64(seed_b + (p + 1) * GOLDEN)`` (the p-th output of a SplitMix64
stream started at ``seed_b``), computed with wrapping int64 arithmetic in torch, and the ``T``
patches with the smallest keys are kept (a uniformly random T-subset, up to the hash's quality).
Logical right shifts are emulated on signed int64 by masking.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from recomp_eval.methods.base import (
    Compressed,
    Role,
    SignalSpec,
    VisionSignals,
    budget_from_ratio,
    check_options,
    check_retention,
    selection_output,
)

DEFAULT_RETENTION = 0.1
_U64 = 1 << 64


def _s64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - _U64 if value >= 1 << 63 else value


GOLDEN = _s64(0x9E3779B97F4A7C15)  # SplitMix64 increment
MIX1 = _s64(0xBF58476D1CE4E5B9)
MIX2 = _s64(0x94D049BB133111EB)

SPEC = SignalSpec(needs_seeds=True)


@dataclass(frozen=True)
class RandomConfig:
    """``retention``: kept fraction. ``seed``: run-level salt mixed into every sample's seed."""

    retention: float = DEFAULT_RETENTION
    seed: int = 0


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed values)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (bitwise equal to the uint64 reference)."""
    x = (x ^ _shr(x, 30)) * MIX1
    x = (x ^ _shr(x, 27)) * MIX2
    return x ^ _shr(x, 31)


def patch_keys(seeds: torch.Tensor, n: int, salt: int = 0) -> torch.Tensor:
    """[B,N] int64 pseudo-random key per (sample, patch).

    Args:
        seeds: [B] int64 sample seeds. n: patches. salt: run-level seed.
    """
    base = splitmix64(seeds.to(torch.int64) ^ _s64(salt % _U64))  # [B] salted stream start
    p = torch.arange(1, n + 1, dtype=torch.int64, device=seeds.device)  # [N]
    state = base[:, None] + p[None, :] * GOLDEN  # [B,N] wrapping int64
    return splitmix64(state)


def compress(signals: VisionSignals, cfg: RandomConfig) -> Compressed:
    """Random T-subset per sample, raster order.

    Args:
        signals: features [B,N,C], seeds [B] int64.
        cfg: :class:`RandomConfig`.
    Returns:
        Compressed [B,T,C], role KEPT; stats n_tokens, n_requested.
    """
    signals.require("seeds", method="random")
    signals.check_finite("features")
    x = signals.features
    n = x.shape[1]
    t = budget_from_ratio(cfg.retention, n)
    keys = patch_keys(signals.seeds.to(x.device), n, cfg.seed)  # [B,N]
    keep = keys.argsort(dim=1, stable=True)[:, :t].sort(dim=1).values  # [B,T] raster order
    out = selection_output(x, keep, Role.KEPT)
    out.stats = {"n_tokens": out.lengths.clone(), "n_requested": out.lengths.clone()}
    return out


def build(name: str = "random", retention: float | None = None, **options: Any):
    """Build the random baseline. Options: ``seed`` (int, default 0)."""
    from recomp_eval.methods import BuiltMethod

    check_options(name, options, ("seed",))
    check_retention(retention)
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"random: seed must be an int, got {seed!r}")
    cfg = RandomConfig(retention=DEFAULT_RETENTION if retention is None else retention, seed=seed)
    return BuiltMethod(name=name, spec=SPEC, fn=lambda s: compress(s, cfg), config=asdict(cfg))
