"""Analytic FLOPs of one Qwen2.5-VL tower pass over an image of ``P`` patches.

Per block: the fused qkv and output projections (``4 P C^2`` multiply-adds), attention scores
and values (``2 P S C``, where S is the attention span: the image's P patches at a
full-attention block, a window's patches elsewhere, taken as ``min(P, window^2)`` with ``window``
the window side in patches), and the gated MLP (``3 P C I``). Then the merger on ``P/4`` groups:
``(4C)^2 + 4C E`` per group. FLOPs = 2 x multiply-adds. The patch embedding (a 3-D convolution
over ``3*2*14*14`` inputs per patch) is included.
"""

from __future__ import annotations

from typing import Any


def tower_flops(vision_config: Any, patches: int) -> int:
    c = int(vision_config.hidden_size)
    inter = int(vision_config.intermediate_size)
    depth = int(vision_config.depth)
    full = set(vision_config.fullatt_block_indexes)
    window = int(vision_config.window_size) // int(vision_config.patch_size)
    p = int(patches)
    macs = p * c * 3 * int(vision_config.temporal_patch_size) * int(vision_config.patch_size) ** 2
    for block in range(depth):
        span = p if block in full else min(p, window * window)
        macs += 4 * p * c * c + 2 * p * span * c + 3 * p * c * inter
    merge = int(vision_config.spatial_merge_size) ** 2
    macs += (p // merge) * ((merge * c) ** 2 + merge * c * int(vision_config.out_hidden_size))
    return 2 * macs
