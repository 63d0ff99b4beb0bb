"""Pure mask and index algebra of in-LLM pruning (no transformers import, no model state).

Masks are bool, True = attend, shaped like transformers' sdpa masks ``[B|1,1,q,kv]``. "Rows" are
the prompt positions (indices into the full prefill of length ``Lp``) that survive, sorted.

Letters: ``B`` batch, ``Lp`` prefill length, ``L`` current rows, ``L'`` kept rows, ``q``/``kv``
query/key lengths of one attention call, ``H`` heads, ``d`` head width.
"""

from __future__ import annotations

import torch


def causal_allowed(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[1,1,q,kv] bool causal mask; query i sits at key position ``i + kv - q``."""
    rows = torch.arange(q_len, device=device) + (kv_len - q_len)  # [q]
    return (torch.arange(kv_len, device=device)[None, :] <= rows[:, None])[None, None]


def masked_keep(
    mask: torch.Tensor | None, keep: torch.Tensor, q_len: int, kv_len: int
) -> torch.Tensor:
    """AND the keep mask into an attention mask (mask variant); a dropped row still sees itself.

    Args:
        mask: [B|1,1,q,kv] bool (True = attend) or None (plain causal).
        keep: [B,Lp] bool over the prefill positions; decode columns past ``Lp`` are kept.
    Returns:
        [B,1,q,kv] bool.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"expected a bool sdpa mask, got {mask.dtype}")
    b, seq = keep.shape
    base = causal_allowed(q_len, kv_len, keep.device) if mask is None else mask  # [B|1,1,q,kv]
    cols = torch.ones(b, kv_len, dtype=torch.bool, device=keep.device)  # [B,kv]
    cols[:, :seq] = keep
    rows = torch.arange(q_len, device=keep.device) + (kv_len - q_len)  # [q]
    self_col = torch.arange(kv_len, device=keep.device)[None, :] == rows[:, None]  # [q,kv]
    return base & (cols[:, None, None, :] | self_col[None, None])  # [B,1,q,kv]


def gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather positions along dim 1: x [B|1,L,...], index [B,L'] -> [B,L',...]."""
    b, kept = index.shape
    x = x.expand(b, *x.shape[1:])  # [B,L,...]
    idx = index.view(b, kept, *([1] * (x.dim() - 2))).expand(b, kept, *x.shape[2:])  # [B,L',...]
    return x.gather(1, idx)  # [B,L',...]


def gather_heads(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather positions along dim 2 of per-head states: x [B,H,L,d], index [B,L'] -> [B,H,L',d]."""
    b, h, _, d = x.shape
    idx = index[:, None, :, None].expand(b, h, index.shape[1], d)  # [B,H,L',d]
    return x.gather(2, idx)  # [B,H,L',d]


def gather_mask(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows and columns of a prefill mask: [B|1,1,L,L] -> [B,1,L',L']."""
    b, kept = index.shape
    mask = mask.expand(b, *mask.shape[1:])  # [B,1,L,L]
    rows = mask.gather(2, index[:, None, :, None].expand(b, 1, kept, mask.shape[3]))  # [B,1,L',L]
    return rows.gather(3, index[:, None, None, :].expand(b, 1, kept, kept))  # [B,1,L',L']


def gather_cols(mask: torch.Tensor, index: torch.Tensor, prefill_len: int) -> torch.Tensor:
    """Decode mask columns: kept prefix + every decoded position. [B|1,1,q,kv] -> [B,1,q,L'+kv-Lp]."""
    b, _ = index.shape
    q_len, kv_len = mask.shape[2], mask.shape[3]
    new = torch.arange(prefill_len, kv_len, device=index.device).expand(b, -1)  # [B,kv-Lp]
    cols = torch.cat([index, new], dim=1)  # [B,L'+kv-Lp]
    mask = mask.expand(b, *mask.shape[1:])  # [B,1,q,kv]
    index4 = cols[:, None, None, :].expand(b, 1, q_len, cols.shape[1])  # [B,1,q,L'+kv-Lp]
    return mask.gather(3, index4)  # [B,1,q,L'+kv-Lp]


def keep_index(keep: torch.Tensor) -> torch.Tensor:
    """[B,L] bool with equal row sums -> [B,L'] int64 sorted kept positions."""
    b, seq = keep.shape
    positions = torch.arange(seq, device=keep.device).expand(b, seq)  # [B,L]
    return positions[keep].view(b, -1)  # [B,L'] (row-major order keeps each row sorted)


def compose_rows(rows: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """Prompt positions that survive a selection made over the current rows.

    Args:
        rows: [B,L] int64 prompt positions of the current rows, or None (all ``Lp`` rows).
        keep: [B,L] bool kept current rows, equal row sums.
    Returns:
        [B,L'] int64 sorted prompt positions.
    """
    index = keep_index(keep)  # [B,L']
    return index if rows is None else rows.gather(1, index)  # [B,L']


def rows_mask(rows: torch.Tensor, prefill_len: int) -> torch.Tensor:
    """[B,L'] int64 prompt positions -> [B,Lp] bool, True at those positions."""
    keep = torch.zeros(rows.shape[0], prefill_len, dtype=torch.bool, device=rows.device)  # [B,Lp]
    return keep.scatter(1, rows, True)  # [B,Lp]


def all_rows(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """[B,L] int64 ``0..L-1`` in every row."""
    return torch.arange(length, device=device).expand(batch, length)  # [B,L]


def position_index(rows: torch.Tensor, renumber: bool) -> torch.Tensor:
    """Prune variant: where the kept rows read their RoPE tables / position ids.

    The prefill position ids are contiguous after left padding, so renumbering the ``L'`` kept
    rows contiguously means giving them the positions of the first ``L'`` prompt rows.

    Args:
        rows: [B,L'] int64 kept prompt positions.
        renumber: False keeps the original positions.
    Returns:
        [B,L'] int64 index into the prefill's ``(cos, sin)`` / ``position_ids``.
    """
    if not renumber:
        return rows
    return all_rows(rows.shape[0], rows.shape[1], rows.device)  # [B,L']


def renumber_index(keep: torch.Tensor) -> torch.Tensor:
    """Mask variant: kept row ``j`` reads the position of prompt row ``#kept before j``.

    Args:
        keep: [B,Lp] bool kept prompt rows (dropped rows get a harmless index: they are masked).
    Returns:
        [B,Lp] int64 index into the prefill's ``(cos, sin)`` / ``position_ids``.
    """
    return (keep.long().cumsum(dim=1) - 1).clamp_min(0)  # [B,Lp]
