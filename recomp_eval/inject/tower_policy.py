"""How many tower passes a batch costs, and which pass is reused: the one place for it.

A method's :class:`~recomp_eval.methods.base.SignalSpec` says ``vit_passes``: 1, or 2 for the
released RC code, which runs a second, identical tower pass for the patch states ``Z`` of its
text score (kept for cost parity: same input, same weights, so the same values). This module
runs the passes through the family adapter, times them honestly and counts their FLOPs:

* no cache: the first pass under the method's hooks; with ``vit_passes == 2`` a second, plain
  pass whose last hidden state replaces the first's (its time is measured);
* with a :class:`~recomp_eval.inject.vision_cache.VisionCache` (``runner.share_vision``): a
  stored pass of the same batch is reused and its measured span is reported as this run's
  vision stage, once per pass the method would have run.
"""

from __future__ import annotations

from typing import Any

import torch

from recomp_eval.inject.vision_cache import TowerPass, VisionCache

VALID_PASSES = (1, 2)


def check_passes(spec: Any) -> int:
    if spec.vit_passes not in VALID_PASSES:
        raise ValueError(f"vit_passes must be 1 or 2, got {spec.vit_passes}")
    return int(spec.vit_passes)


@torch.no_grad()
def vision_passes(
    adapter: Any,
    bundle: Any,
    probe: Any,
    pixel_values: torch.Tensor,
    spec: Any,
    timer: Any,
    cache: VisionCache | None = None,
    cache_key: tuple | None = None,
    layout: Any = None,
) -> TowerPass:
    """The batch's tower pass(es) for ``spec``, timed into ``timer``'s vision stage.

    Args:
        adapter, bundle: the family adapter and the loaded model.
        probe: from ``compress(...)`` (the method's q/k hooks).
        pixel_values: [B,3,S,S].
        spec: the method's signal spec (``vit_passes``).
        timer: a :class:`~recomp_eval.timing.StageTimer`.
        cache, cache_key: share passes across the runs of one evaluation (opt-in).
        layout: the batch's :class:`~recomp_eval.models.base.BatchLayout` (families whose tower
            needs more than the pixels, e.g. Qwen2.5-VL's image grids).
    """
    passes = check_passes(spec)
    done = None
    if cache is not None and cache_key is not None:
        done = cache.get(cache_key, probe.q_layers, probe.k_layers)
    if done is not None:
        for _ in range(passes):  # a reused pass still costs this run what it cost to compute
            timer.add("vision", *done.span)
        return done
    start = timer.mark()
    extra = (cache.q_layers, cache.k_layers) if cache is not None else ((), ())
    done = adapter.tower_pass(bundle, pixel_values, probe, *extra, layout=layout)
    done.span = (start, timer.mark())
    timer.add("vision", *done.span)
    if cache is not None and cache_key is not None:
        cache.put(cache_key, done)
    if passes == 2:
        with timer.stage("vision"):
            repeated = adapter.last_hidden(bundle, pixel_values, layout=layout)  # [B,N+1,C]
        # the release's second pass feeds Z; a stored pass keeps the first's identical values
        done = TowerPass(hidden=done.hidden, last_hidden=repeated, q=done.q, k=done.k,
                         span=done.span)  # fmt: skip
    return done


def vision_flops(shapes: Any, spec: Any) -> int:
    """FLOPs of the tower passes one image costs ``spec`` (``shapes``: the family's
    :class:`~recomp_eval.models.base.ModelShapes`)."""
    return check_passes(spec) * int(shapes.vision_flops)
