"""Shared tensor helpers for the selection/merge baselines (PruMerge, PruMerge+).

Letters: ``B`` batch, ``N`` patches, ``K`` centres (padded), ``C`` feature width, ``Ck`` key width.
"""

from __future__ import annotations

import torch

from recomp_eval.methods.base import gather_rows


def merge_neighbours(
    features: torch.Tensor,
    keys: torch.Tensor,
    weights: torch.Tensor,
    centres: torch.Tensor,
    centre_valid: torch.Tensor,
    k: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add to each centre the weighted sum of its ``k`` nearest patches by key cosine.

    For centre ``i`` (a patch index) the candidates are all other ``N - 1`` patches, centres
    included; the ``min(k, N - 1)`` with the highest cosine between L2-normalised keys are its
    neighbours ``nbr(i)``, and ``merged_i = x_i + sum_{j in nbr(i)} w_j x_j`` with the raw weights
    ``w`` (PruMerge's rule: not renormalised). Centres read the *original* features, so the result
    does not depend on the order of the centres.

    Args:
        features: [B,N,C] patch features.
        keys: [B,N,Ck] patch keys (grid-indexed, same rows as ``features``).
        weights: [B,N] merge weight of every patch (e.g. CLS attention).
        centres: [B,K] int64 patch index of each centre (any value where not valid).
        centre_valid: [B,K] bool, which centre rows are real (ragged per-sample counts).
        k: neighbours per centre.

    Returns:
        merged: [B,K,C] in ``features.dtype``, zero on invalid rows.
        members: [B,K,N] bool, the centre's own patch and its neighbours (all False when invalid).
    """
    b, n, _ = features.shape
    n_nbr = min(k, n - 1)
    safe = torch.where(centre_valid, centres, torch.zeros_like(centres))  # [B,K]
    own = torch.zeros(b, safe.shape[1], n, dtype=torch.bool, device=features.device)  # [B,K,N]
    own.scatter_(2, safe.unsqueeze(-1), True)

    kn = torch.nn.functional.normalize(keys, p=2, dim=-1)  # [B,N,Ck]
    kc = gather_rows(kn, safe)  # [B,K,Ck]
    cos = kc @ kn.transpose(1, 2)  # [B,K,N]
    cos = cos.masked_fill(own, float("-inf"))  # a centre is not its own neighbour
    nbr = cos.topk(n_nbr, dim=-1).indices  # [B,K,n_nbr]

    w = weights.to(features.dtype)
    w_nbr = w.gather(1, nbr.reshape(b, -1)).view_as(nbr)  # [B,K,n_nbr]
    w_mat = torch.zeros(b, safe.shape[1], n, dtype=features.dtype, device=features.device)
    w_mat.scatter_(2, nbr, w_nbr)  # [B,K,N] sparse merge weights
    merged = gather_rows(features, safe) + w_mat @ features  # [B,K,C]
    merged = merged * centre_valid.unsqueeze(-1).to(features.dtype)  # [B,K,C]

    members = own.clone()  # [B,K,N]
    members.scatter_(2, nbr, True)
    members &= centre_valid.unsqueeze(-1)
    return merged, members


def weighted_summary(
    features: torch.Tensor, weights: torch.Tensor, include: torch.Tensor
) -> torch.Tensor:
    """One token ``sum_{j in include} w_j x_j`` per sample (PruMerge's extra token).

    Args:
        features: [B,N,C]. weights: [B,N] raw weights. include: [B,N] bool.
    Returns:
        [B,C] in ``features.dtype``.
    """
    w = torch.where(include, weights.to(features.dtype), torch.zeros_like(features[..., 0]))
    return (w.unsqueeze(1) @ features).squeeze(1)  # [B,1,N] @ [B,N,C] -> [B,C]
