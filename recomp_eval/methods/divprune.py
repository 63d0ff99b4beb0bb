"""DivPrune (CVPR 2025; vbdi/divprune @ 799e2d95, ``llava_arch.py`` L146-171, L352-384): keep a
maximally diverse subset of the projected visual tokens (question-agnostic).

Signal: cosine distance ``D = 1 - cos`` between every pair of **projected** patch tokens (the
projector's output, what the LLM would see), ``D`` [B,N,N]. Selection: max-min diversity greedy
over ``T`` steps, batched over samples (one step = one op over [B,N]):

* first pick: the most isolated token, ``argmax_j`` of the 2nd-smallest value of column ``j``
  of ``D`` (the smallest is the token's own distance, ~0);
* every later pick: ``argmax_j min_{s in selected} D[s, j]`` (farthest-point sampling); ties go
  to the lower index.

Kept tokens are returned in raster order, with role KEPT and no merging.

Variants:

* ``official`` (the released behaviour):
  * ``T = round(r * N)`` with Python's round, which rounds half to even. The released default
    ``r = 0.098`` gives 56 tokens, not 64.
  * ``D`` is computed in the features' dtype (fp16 in eval).
  * Selected tokens are not masked out: their minimum distance is their ~0 self-distance.
  * ``first_sample_for_batch=true`` applies sample 0's selection to the whole batch, as the
    released code does (``new_input_embeds[0]``). The default is per sample; both agree at batch 1.
* ``fixed``:
  * ``T = budget_from_ratio(r, N)``, i.e. exactly ``round(r * N)`` rounded half up.
  * ``D`` is computed in fp32.
  * Selected tokens are masked, so picks are always unique.
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
    choice_option,
    flag_option,
    selection_output,
)

OFFICIAL_RETENTION = 0.098  # the released SUBSET_RATIO: 56 of 576 tokens
VARIANTS = ("official", "fixed")
SPEC = SignalSpec(projected=True)


@dataclass(frozen=True)
class DivPruneConfig:
    """``retention``: kept fraction; see the module docstring for the variants."""

    retention: float = OFFICIAL_RETENTION
    variant: str = "official"
    first_sample_for_batch: bool = False


def budget(cfg: DivPruneConfig, n: int) -> int:
    """Tokens kept of ``n``: the released ``int(round(r * n))`` or the project's rule."""
    if cfg.variant == "official":
        return max(1, min(n, round(cfg.retention * n)))
    return budget_from_ratio(cfg.retention, n)


def cosine_distance(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1 - cos`` between all token pairs of each sample: x [B,N,D] -> [B,N,N] in ``dtype``."""
    x = x.to(dtype)
    unit = x / x.norm(dim=-1, keepdim=True)  # [B,N,D]
    return 1 - unit @ unit.transpose(1, 2)  # [B,N,N]


def select(dist: torch.Tensor, t: int, mask_selected: bool) -> torch.Tensor:
    """Max-min diversity greedy: [B,N,N] distances -> [B,T] picks in selection order."""
    b, n, _ = dist.shape
    rows = torch.arange(b, device=dist.device)
    first = dist.topk(2, dim=1, largest=False).values[:, 1, :].argmax(dim=1)  # [B] most isolated
    picks = [first]
    nearest = dist[rows, first]  # [B,N] each token's distance to the selected set
    taken = torch.zeros(b, n, dtype=torch.bool, device=dist.device)
    taken[rows, first] = True
    for _ in range(t - 1):
        score = nearest.masked_fill(taken, float("-inf")) if mask_selected else nearest
        pick = score.argmax(dim=1)  # [B] the first index among ties
        picks.append(pick)
        taken[rows, pick] = True
        nearest = torch.minimum(nearest, dist[rows, pick])  # [B,N]
    return torch.stack(picks, dim=1)  # [B,T]


def compress(signals: VisionSignals, cfg: DivPruneConfig) -> Compressed:
    """The T most diverse projected tokens per sample, raster order.

    Args:
        signals: features [B,N,C] (what is kept), projected [B,N,D] (what is compared).
        cfg: :class:`DivPruneConfig`.
    Returns:
        Compressed [B,T,C], role KEPT; stats n_tokens, n_requested.
    """
    signals.require("projected", method="divprune")
    signals.check_finite("projected")
    x, z = signals.features, signals.projected
    n = x.shape[1]
    t = budget(cfg, n)
    official = cfg.variant == "official"
    dist = cosine_distance(z, z.dtype if official else torch.float32)  # [B,N,N]
    if official and cfg.first_sample_for_batch:
        dist = dist[:1].expand(x.shape[0], -1, -1)  # the released [0]: sample 0 decides
    keep = select(dist, t, mask_selected=not official).sort(dim=1).values  # [B,T] raster order
    out = selection_output(x, keep, Role.KEPT)
    out.stats = {"n_tokens": out.lengths.clone(), "n_requested": out.lengths.clone()}
    return out


def build(name: str = "divprune", retention: float | None = None, **options: Any):
    """Build DivPrune. Options: ``variant`` (official | fixed), ``first_sample_for_batch``."""
    from recomp_eval.methods import BuiltMethod

    check_options(name, options, ("variant", "first_sample_for_batch"))
    check_retention(retention)
    variant = choice_option(name, options, "variant", VARIANTS, "official")
    first = flag_option(name, options, "first_sample_for_batch", official_only=variant)
    cfg = DivPruneConfig(retention=OFFICIAL_RETENTION if retention is None else retention,
                         variant=variant, first_sample_for_batch=first)  # fmt: skip
    return BuiltMethod(name=name, spec=SPEC, fn=lambda s: compress(s, cfg), config=asdict(cfg))
