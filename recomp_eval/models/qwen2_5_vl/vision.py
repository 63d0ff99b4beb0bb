"""Qwen2.5-VL's vision side: one packed tower pass and the signals a method can use.

The tower (``model.model.visual``) embeds the patches of every image of the batch as one packed
sequence ``[sum_i t_i h_i w_i, C]``. It reorders them by ``window_index`` (merge groups of 2 x 2
patches, window by window), runs window attention in most blocks and full attention per image
in ``fullatt_block_indexes``, merges each group into one LLM token (``merger``, width E) and
undoes the order. The merged tokens are what the LLM sees, so they are what methods compress:
image i has ``N_i = t_i h_i w_i / 4`` of them, on an ``(h_i/2, w_i/2)`` grid.

There is no CLS token. The signals here are recomputed at one block (``score_block``, by default
the last full-attention block), from what its attention module receives (captured by a
forward pre-hook for the pass only):

- ``keys``: the block's key projection (before the vision RoPE), averaged over a merge group's
  four patches, ``[N_i, C]``;
- ``received``: the attention each merge group receives,
  ``softmax(q k^T / sqrt(d))`` with the block's RoPE, within the block's own attention segments
  (full: the image; window: the window), averaged over heads and queries, summed over the
  group's four patches, ``[N_i]`` (sums to 1 per image at a full-attention block).

Letters: P packed patches of the batch, G merge groups (= merged tokens) of the batch, C tower
width, E LLM width, H heads.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

QUERY_CHUNK = 1024  # queries per softmax block: bounds memory at [H, chunk, n] per segment


@dataclass
class QwenTowerPass:
    """One batch's pass: merged tokens and, when asked, the score block's signals (original
    order, all images packed). ``span`` as :class:`~recomp_eval.inject.vision_cache.TowerPass`."""

    merged: torch.Tensor  # [G,E]
    keys: torch.Tensor | None = None  # [G,C]
    received: torch.Tensor | None = None  # [G] float32
    block: int | None = None
    span: tuple[Any, Any] | None = None
    q: dict[int, torch.Tensor] = field(default_factory=dict)  # (cache protocol: unused)
    k: dict[int, torch.Tensor] = field(default_factory=dict)

    def covers(self, q_layers: Sequence[int], k_layers: Sequence[int]) -> bool:
        return not q_layers and not k_layers

    @property
    def hidden(self) -> torch.Tensor:
        return self.merged

    @property
    def last_hidden(self) -> torch.Tensor:
        return self.merged


def resolve_block(model: torch.nn.Module, block: int | None) -> int:
    """The score block: ``block`` (negative counts from the end), by default the last
    full-attention block."""
    vc = model.config.vision_config
    depth = int(vc.depth)
    if block is None:
        return int(vc.fullatt_block_indexes[-1])
    resolved = block + depth if block < 0 else block
    if not 0 <= resolved < depth:
        raise ValueError(
            f"model.options.score_block={block} is outside the tower's {depth} blocks; use "
            f"0..{depth - 1}, a negative index, or null (the last full-attention block)"
        )
    return resolved


def merged_counts(grids: Sequence[Sequence[int]], merge: int = 2) -> list[int]:
    """Merged tokens per image from its (t, h, w) patch grid."""
    return [int(t) * int(h) * int(w) // (merge * merge) for t, h, w in grids]


@torch.no_grad()
def tower_pass(
    model: torch.nn.Module, pixel_values: torch.Tensor, grids: Sequence[Sequence[int]],
    block: int | None = None,
) -> QwenTowerPass:  # fmt: skip
    """The packed tower pass; with ``block``, that block's keys and received attention too.

    Args:
        pixel_values: [P, 3*temporal*patch*patch] as the processor gives them.
        grids: per image (t, h, w) in patches (the processor's ``image_grid_thw``).
        block: a resolved block index, or None for the merged tokens only.
    """
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    grid_thw = torch.tensor([list(g) for g in grids], dtype=torch.int64, device=pixel_values.device)
    captured: dict[str, Any] = {}
    handle = None
    if block is not None:

        def grab(_module, args, kwargs):  # a forward pre-hook with kwargs
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["cu_seqlens"] = kwargs["cu_seqlens"]
            captured["rope"] = kwargs["position_embeddings"]

        handle = visual.blocks[block].attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        dtype = next(visual.parameters()).dtype
        out = visual(pixel_values.to(visual.device, dtype), grid_thw=grid_thw)
    finally:
        if handle is not None:
            handle.remove()
    merged = out.pooler_output  # [G,E], original order
    if block is None:
        return QwenTowerPass(merged=merged)
    vc = model.config.vision_config
    window_index, _ = get_vision_window_index(grid_thw.cpu(), vc.spatial_merge_size,
                                              vc.window_size, vc.patch_size)  # fmt: skip
    keys, received = block_signals(visual.blocks[block].attn, captured, vc.spatial_merge_size**2)
    reverse = torch.argsort(window_index.to(merged.device))  # permuted group -> original order
    return QwenTowerPass(merged=merged, keys=keys[reverse], received=received[reverse],
                         block=block)  # fmt: skip


def block_signals(attn: torch.nn.Module, captured: dict[str, Any], unit: int):
    """Per merge group (permuted order): mean pre-RoPE key [G,C] and received attention [G].

    ``captured``: the block's attention input (``hidden`` [P,C] in window order), its
    ``cu_seqlens`` (attention segments) and ``rope`` (cos, sin).
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    hidden = captured["hidden"]
    p = hidden.shape[0]
    heads = attn.num_heads
    qkv = attn.qkv(hidden).reshape(p, 3, heads, -1)  # [P,3,H,d]
    q, k = qkv[:, 0], qkv[:, 1]  # [P,H,d]
    keys = k.reshape(p // unit, unit, -1).float().mean(dim=1)  # [G,C] pre-RoPE
    cos, sin = captured["rope"]
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # [H,P,d]
    received = torch.zeros(p, dtype=torch.float32, device=hidden.device)
    bounds = captured["cu_seqlens"].tolist()
    for start, end in itertools.pairwise(bounds):  # one attention segment at a time
        n = end - start
        ks = k[:, start:end]  # [H,n,d]
        total = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for at in range(start, end, QUERY_CHUNK):
            qs = q[:, at : min(end, at + QUERY_CHUNK)]  # [H,c,d]
            probs = torch.softmax(qs @ ks.transpose(1, 2) * attn.scaling, dim=-1)  # [H,c,n]
            total += probs.sum(dim=1).mean(dim=0)  # [n] summed over queries, mean over heads
        received[start:end] = total / n  # mean over the segment's queries
    return keys.to(hidden.dtype), received.reshape(p // unit, unit).sum(dim=1)  # [G,C], [G]
