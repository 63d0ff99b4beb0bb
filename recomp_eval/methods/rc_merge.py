"""Tensor kernels of Recoverable Compression (RC): ranks, 1-D LOF in sorted windows, centre merge.

Everything is batched over ``B`` with ragged per-sample sets expressed as masks; no Python loops
over samples, tokens or centres and no host reads. ``rc.py`` holds the switches and the order of
the steps. Letters: ``B`` batch, ``N`` patches, ``C`` feature width, ``Ck`` key width, ``Mc`` the
centre capacity (an upper bound on the number of centres of any sample in the batch), ``k``
neighbours.

Tie rule: every top-k here is a stable descending sort (equal scores: lower index first). The
release uses ``torch.topk``, whose tie order is unspecified (method.md Q13); the harness pins it.
"""

from __future__ import annotations

import torch

from recomp_eval.methods.base import Compressed, Role


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[b, index[b, k]]``: [B,N,C] at [B,K] -> [B,K,C] (flat index_select, copies rows)."""
    b, n, c = x.shape
    flat = index + n * torch.arange(b, device=x.device)[:, None]  # [B,K]
    return x.reshape(b * n, c).index_select(0, flat.reshape(-1)).view(b, -1, c)  # [B,K,C]


def descending_rank(x: torch.Tensor, valid: torch.Tensor | None = None):
    """Stable descending order and rank of every entry.

    Args:
        x: [B,N] scores. valid: [B,N] bool; invalid entries rank last.
    Returns:
        order [B,N] int64 (indices, best first) and rank [B,N] int64 (position of each entry).
    """
    if valid is not None:
        x = x.masked_fill(~valid, float("-inf"))
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices  # [B,N]
    ar = torch.arange(x.shape[1], device=x.device).expand_as(order)  # [B,N]
    rank = torch.empty_like(order).scatter_(1, order, ar)  # [B,N]
    return order, rank


def above_median(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B,N] bool: entries strictly above their row's median (numpy median over valid entries)."""
    x = values.double()
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    n_valid = valid.sum(-1)  # [B]
    xs = x.masked_fill(~valid, float("inf")).sort(dim=-1).values  # [B,N]
    lo = ((n_valid - 1).clamp(min=0) // 2)[:, None]  # [B,1]
    hi = (n_valid // 2).clamp(max=x.shape[1] - 1)[:, None]  # [B,1]
    median = (xs.gather(1, lo) + xs.gather(1, hi)) / 2  # [B,1]
    return (x > median) & valid


def merge_centres(
    features: torch.Tensor,
    keys: torch.Tensor,
    key_norm: torch.Tensor,
    attn: torch.Tensor,
    text: torch.Tensor,
    rest_idx: torch.Tensor,
    n_rest: torch.Tensor,
    n_centres: torch.Tensor,
    capacity: int,
    neighbours: int,
    grid_keys: bool,
    normalized: bool,
) -> dict[str, torch.Tensor]:
    """Centre selection, neighbour search and merge over each sample's rest set (step 3).

    Vectorises the release's per-centre loop as ``S = Kc Kn^T + t`` over the rest set with the
    columns in the loop's candidate order (centres in attention order, then non-centres
    ascending) and the centre's own column at -inf.

    Args:
        features: [B,N,C] patch features. keys: [B,N,Ck] patch keys (score dtype).
        key_norm: [B,N] L2 norms of the keys.
        attn: [B,N] CLS attention (score dtype). text: [B,N] text bonus ``w * s`` (score dtype).
        rest_idx: [B,N] grid index of each rest position; the first ``n_rest`` are valid, ascending.
        n_rest: [B] rest-set sizes R. n_centres: [B] centres M (already clamped to <= R).
        capacity: Mc >= max(M), the centre dimension of the outputs.
        neighbours: neighbour count (clamped per sample to R - 1).
        grid_keys: True = keys of the right patches; False = the release's Q9 gather (rest
            position p reads the key of grid patch p).
        normalized: merge weights normalised over the cluster (centre included) instead of raw.
    Returns:
        dict with ``merged`` [B,Mc,C], ``centre_src`` [B,Mc] grid index (-1 past M),
        ``centre_members`` [B,Mc,N] bool, ``summary`` [B,C], ``summary_members`` [B,N] bool,
        ``n_neighbours`` [B] int64.
    """
    b, n, _ = features.shape
    device, fdtype = features.device, features.dtype
    ar = torch.arange(n, device=device)  # [N]
    valid_r = ar[None, :] < n_rest[:, None]  # [B,N] rest-space validity
    a_rest = attn.gather(1, rest_idx)  # [B,N]
    _, rank_r = descending_rank(a_rest, valid_r)  # [B,N]
    is_c = (rank_r < n_centres[:, None]) & valid_r  # [B,N] rest space
    col_key = torch.where(is_c, rank_r, torch.where(valid_r, n + ar, 2 * n + ar))  # [B,N]
    cols = col_key.argsort(dim=-1)  # [B,N] rest positions in the loop's candidate order
    grid_cols = rest_idx.gather(1, cols)  # [B,N] grid patch of each column
    key_rows = grid_cols if grid_keys else cols  # [B,N] Q9: rest position used as a grid row
    # cosine = <k_c / |k_c|, k_j> / |k_j|: scaling the [Mc,N] scores instead of normalising all
    # N keys saves a pass over [N,Ck] (same value up to rounding of the last bit)
    inv_norm = key_norm.reciprocal()  # [B,N]
    centre_rows = key_rows[:, :capacity]  # [B,Mc]
    k_centre = take_rows(keys, centre_rows) * inv_norm.gather(1, centre_rows)[..., None]
    scores = (k_centre @ keys.transpose(1, 2)) * inv_norm[:, None, :]  # [B,Mc,N] grid columns
    scores = scores.gather(2, key_rows[:, None, :].expand(-1, capacity, -1))  # [B,Mc,N] columns
    scores = scores + text.gather(1, grid_cols)[:, None, :]  # [B,Mc,N]
    rows = torch.arange(capacity, device=device)  # [Mc]
    blocked = (rows[:, None] == ar[None, :])[None] | ~valid_r[:, None, :]  # [B,Mc,N]
    scores = scores.masked_fill(blocked, float("-inf"))

    k_max = max(1, min(neighbours, n - 1))
    nbr_col = scores.topk(k_max, dim=-1, sorted=True).indices  # [B,Mc,k]
    n_nbr = torch.minimum(n_rest - 1, torch.full_like(n_rest, neighbours)).clamp(min=0)  # [B]
    centre_ok = rows[None, :] < n_centres[:, None]  # [B,Mc]
    slot_ok = (torch.arange(k_max, device=device)[None, :] < n_nbr[:, None])[:, None, :]
    slot_ok = slot_ok & centre_ok[..., None]  # [B,Mc,k]
    nbr_grid = grid_cols.gather(1, nbr_col.reshape(b, -1)).view(b, capacity, k_max)  # [B,Mc,k]
    centre_grid = grid_cols[:, :capacity]  # [B,Mc]

    w_nbr = attn.gather(1, nbr_grid.reshape(b, -1)).view_as(nbr_grid).to(fdtype)  # [B,Mc,k]
    w_nbr = w_nbr * slot_ok.to(fdtype)
    weights = torch.zeros(b, capacity, n, dtype=fdtype, device=device)  # [B,Mc,N]
    weights.scatter_(2, nbr_grid, w_nbr)
    if normalized:
        w_self = attn.gather(1, centre_grid).to(fdtype)  # [B,Mc]
    else:
        w_self = torch.ones(b, capacity, dtype=fdtype, device=device)  # [B,Mc]
    weights.scatter_(2, centre_grid[..., None], (w_self * centre_ok.to(fdtype))[..., None])
    non_c = valid_r & ~is_c  # [B,N] rest space
    summary_members = torch.zeros_like(non_c).scatter_(1, rest_idx, non_c)  # [B,N] grid
    w_sum = attn.to(fdtype) * summary_members.to(fdtype)  # [B,N]
    weights = torch.cat([weights, w_sum[:, None, :]], dim=1)  # [B,Mc+1,N] last row: summary
    if normalized:
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=torch.finfo(fdtype).tiny)
    merged = weights @ features  # [B,Mc+1,C] one GEMM for the centres and the summary
    summary = merged[:, capacity]  # [B,C]
    merged = merged[:, :capacity]  # [B,Mc,C]

    members = torch.zeros(b, capacity, n, dtype=torch.bool, device=device)  # [B,Mc,N]
    members.scatter_(2, nbr_grid, slot_ok)
    members |= torch.zeros_like(members).scatter_(2, centre_grid[..., None], centre_ok[..., None])
    return {
        "merged": merged,
        "centre_src": torch.where(centre_ok, centre_grid, torch.full_like(centre_grid, -1)),
        "centre_members": members,
        "summary": summary,
        "summary_members": summary_members,
        "n_neighbours": n_nbr,
    }


def assemble(
    features: torch.Tensor,
    keep_idx: torch.Tensor,
    n_keep: torch.Tensor,
    is_v: torch.Tensor,
    merge: dict[str, torch.Tensor],
    n_centres: torch.Tensor,
    n_summary: torch.Tensor,
    width: int,
    stats: dict[str, torch.Tensor],
) -> Compressed:
    """Lay out ``[kept (spatial order), centres (attention order), summary]`` per sample.

    Args:
        features: [B,N,C]. keep_idx: [B,N] grid indices, the first ``n_keep`` kept ascending.
        n_keep, n_centres, n_summary: [B] int64 counts. is_v: [B,N] bool visual (vs text) picks.
        merge: output of :func:`merge_centres` (centre capacity Mc).
        width: padded output length >= max(n_keep + n_centres + n_summary).
        stats: per-sample [B] tensors stored on the result.
    """
    b, n, _ = features.shape
    device = features.device
    capacity = merge["merged"].shape[1]
    p = torch.arange(width, device=device)[None, :]  # [1,W]
    lengths = n_keep + n_centres + n_summary  # [B]
    kept_row = p < n_keep[:, None]  # [B,W]
    centre_row = ~kept_row & (p < (n_keep + n_centres)[:, None])  # [B,W]
    valid = p < lengths[:, None]  # [B,W]
    summary_row = valid & ~kept_row & ~centre_row  # [B,W]

    kept_src = keep_idx.gather(1, p.clamp(max=n - 1).expand(b, -1))  # [B,W]
    centre_slot = (p - n_keep[:, None]).clamp(0, capacity - 1)  # [B,W]
    # small bank of the new tokens: Mc merged centres, the summary, a zero row (kept and padding)
    zero = merge["summary"].new_zeros(b, 1, merge["summary"].shape[-1])  # [B,1,C]
    bank = torch.cat([merge["merged"], merge["summary"][:, None], zero], dim=1)  # [B,Mc+2,C]
    bank_row = torch.where(
        centre_row, centre_slot, torch.where(summary_row, capacity, capacity + 1)
    )
    out = torch.where(kept_row[..., None], take_rows(features, kept_src), take_rows(bank, bank_row))

    centre_src = merge["centre_src"].gather(1, centre_slot)  # [B,W]
    source = torch.where(kept_row, kept_src, torch.where(centre_row, centre_src, -1))
    source = torch.where(valid, source, torch.full_like(source, -1))  # [B,W]
    kept_role = torch.where(is_v.gather(1, kept_src), int(Role.ATTENTION), int(Role.TEXT))
    role = torch.full((b, width), int(Role.PAD), dtype=torch.int8, device=device)  # [B,W]
    role = torch.where(kept_row, kept_role.to(torch.int8), role)
    role = torch.where(centre_row, torch.full_like(role, int(Role.MERGED)), role)
    role = torch.where(summary_row, torch.full_like(role, int(Role.SUMMARY)), role)

    no_members = merge["summary_members"].new_zeros(b, 1, n)  # [B,1,N]
    mem_bank = torch.cat(
        [merge["centre_members"], merge["summary_members"][:, None], no_members], dim=1
    )  # [B,Mc+2,N]
    members = take_rows(mem_bank, bank_row)  # [B,W,N]
    own = torch.zeros_like(members).scatter_(2, kept_src[..., None], kept_row[..., None])
    return Compressed(
        features=out,
        lengths=lengths,
        source=source,
        role=role,
        members=members | own,
        stats=stats,
    )
