"""M-RoPE positions of a pruned Qwen2.5-VL prompt: computed on the full sequence, then gathered.

Stock ``get_rope_index`` numbers a prompt's tokens in three axes (temporal, height, width): the
text before the image 0..s-1 on all three, the image's merged tokens at
``s + (t, row, col)`` of their grid, the text after from ``s + max(h, w)`` on. A compressed image
has fewer tokens. Renumbering the shorter sequence would give the kept tokens another
token's spatial position. Here every sample's positions come from its *unpruned* sequence (all
``N`` merged tokens in place), and each kept token takes the position of its anchor:
- its source token;
- a pooled token takes its window's first token;
- a token with neither takes the image's last.

The text keeps its own positions. The result is what ``generate`` takes as ``position_ids``:
[4,B,L], the text-only row first (transformers builds the causal mask from it), zeros on the
left padding. Decoding then continues from each row's last position, as stock.

Letters: B batch, L padded length, N merged tokens of an image, T kept tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from recomp_eval.methods.base import Compressed, Role


def anchors(c: Compressed) -> torch.Tensor:
    """[T] the merged token whose position each visual token takes (see module doc)."""
    source, members, role = c.source[0], c.members[0], c.role[0]
    n = members.shape[-1]
    pooled = (source < 0) & (role == int(Role.POOLED)) & members.any(dim=-1)
    first = members.to(torch.int8).argmax(dim=-1)
    out = torch.where(pooled, first, source)
    return torch.where(out < 0, torch.full_like(out, n - 1), out)


def full_positions(model: Any, ids: Sequence[int], image_token_id: int, n: int,
                   grid: Sequence[int]) -> tuple[torch.Tensor, int, int]:  # fmt: skip
    """Positions [3, L_full] of the prompt ``ids`` with its image run expanded to ``n`` tokens,
    from stock ``get_rope_index``; and where the image starts and how many tokens it held."""
    ids = list(ids)
    at = ids.index(image_token_id)
    kept = sum(1 for t in ids if t == image_token_id)
    full = ids[:at] + [image_token_id] * n + ids[at + kept :]
    full_ids = torch.tensor([full])
    types = (full_ids == image_token_id).to(torch.int32)
    positions, _ = model.model.get_rope_index(
        full_ids, mm_token_type_ids=types, image_grid_thw=torch.tensor([list(grid)])
    )
    return positions[:, 0], at, kept  # [3, L_full]


def kept_positions(model: Any, ids: Sequence[int], image_token_id: int,
                   provenance: tuple[Compressed, dict[str, Any]]) -> torch.Tensor:  # fmt: skip
    """[3, L] positions of one unpadded pruned prompt ``ids`` (see module doc)."""
    c, info = provenance
    grid = info["grid_thw"]
    n = c.members.shape[-1]
    positions, at, kept = full_positions(model, ids, image_token_id, n, grid)
    anchor = anchors(c)[:kept]
    after = len(ids) - at - kept
    index = torch.cat([torch.arange(at), at + anchor, at + n + torch.arange(after)])
    return positions[:, index]


def kept_position_ids(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      image_token_id: int,
                      provenance: Sequence[tuple[Compressed, dict[str, Any]]]) -> torch.Tensor:  # fmt: skip
    """``position_ids`` [4,B,L] for left-padded ``input_ids`` [B,L] (one image per row)."""
    b, length = input_ids.shape
    out = torch.zeros((4, b, length), dtype=torch.int64)
    ids_cpu, mask_cpu = input_ids.cpu(), attention_mask.cpu().bool()
    for i in range(b):
        valid = mask_cpu[i]
        ids = ids_cpu[i][valid].tolist()
        out[1:, i, valid] = kept_positions(model, ids, image_token_id, provenance[i])
        out[0, i, valid] = torch.arange(int(valid.sum()))
    return out.to(input_ids.device)
