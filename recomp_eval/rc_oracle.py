"""Test oracle: the released Recoverable Compression code path, one image at a time.

A plain port of method.md section 3 (batch size 1, scikit-learn LOF, a Python loop over centres),
written independently of ``recomp_eval.methods.rc`` (never import it here). Used by
``tests/test_rc.py`` for parity and by ``scripts/bench_compression.py`` as the speed baseline.

Two harness rules apply on top of the release (method.md section 4, edge cases): ``M <= R`` and
``min(32, R - 1)`` neighbours instead of crashing, and top-k ties resolve lowest index first (the
release's ``torch.topk`` leaves tie order unspecified, Q13).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.neighbors import LocalOutlierFactor


def lof_ratio(x: torch.Tensor, k: int) -> float:
    """Fraction of the values of ``x`` [n] that scikit-learn's LOF labels as outliers."""
    values = x.detach().float().cpu().numpy().reshape(-1, 1)
    n = values.shape[0]
    if n < 2:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate values (fp16 ties)
        pred = LocalOutlierFactor(n_neighbors=max(1, min(k, n - 1))).fit_predict(values)
    return float(np.sum(pred == -1)) / n


def topk_index(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of ``x`` [n], best first, ties lowest index first."""
    return torch.sort(x, descending=True, stable=True).indices[:k]


def rc_single(
    features: torch.Tensor,
    attn: torch.Tensor,
    keys: torch.Tensor,
    text_sim: torch.Tensor,
    center_base: str = "width",
    key_index: str = "rest_positions",
    neighbours: int = 32,
    text_weight: float = 50.0,
    lof_k: tuple[int, int, int] = (20, 20, 10),
) -> dict:
    """RC on one image, as the release computes it.

    Args:
        features: [N,C]. attn: [N] CLS attention. keys: [N,Ck] patch keys (``K[1:]``).
        text_sim: [N] text score. center_base: ``width`` (release, Q7) or ``rest``.
        key_index: ``rest_positions`` (release, Q9) or ``grid``.
    Returns:
        dict: ``tokens`` [T,C], ``source`` list (grid index, -1 for the summary), ``n_visual``,
        ``n_text``, ``n_centres``, ``neighbours`` (grid indices per centre), ``summary_members``.
    """
    n, width = features.shape
    k_vis, k_txt, k_ctr = lof_k
    n_vis = int(n * lof_ratio(attn, k_vis))
    i_v = topk_index(attn, n_vis)
    s = text_sim.clone()
    s[i_v] = s.min()
    n_txt = int((n - n_vis) * lof_ratio(s, k_txt))
    i_t = topk_index(s, n_txt)
    assert not set(i_v.tolist()) & set(i_t.tolist()), "I_t overlaps I_v (fp16 ties)"
    i_keep = torch.sort(torch.cat([i_v, i_t])).values
    x_keep = features[i_keep]

    keep_set = set(i_keep.tolist())
    # index lists live where the inputs do (on CUDA, as the release runs them)
    dev = features.device
    i_rest = torch.tensor([i for i in range(n) if i not in keep_set], dtype=torch.long, device=dev)
    r = len(i_rest)
    a_r, f_r, s_r = attn[i_rest], features[i_rest], s[i_rest]
    base = width if center_base == "width" else r
    m = min(int(base * lof_ratio(a_r, k_ctr)), r)
    n_nbr = min(neighbours, r - 1)
    j = topk_index(a_r, m).tolist()
    t = text_weight * s_r
    key_rows = keys[:r] if key_index == "rest_positions" else keys[i_rest]
    k_norm = key_rows / key_rows.norm(dim=-1, keepdim=True)
    centre_set = set(j)
    non_centres = [p for p in range(r) if p not in centre_set]

    merged, nbr_lists = [], []
    for i, centre in enumerate(j):
        cand = torch.tensor([j[q] for q in range(m) if q != i] + non_centres, dtype=torch.long,
                            device=dev)  # fmt: skip
        score = k_norm[cand] @ k_norm[centre] + t[cand]
        nbr = cand[torch.topk(score, n_nbr).indices]
        merged.append(f_r[centre] + (a_r[nbr, None] * f_r[nbr]).sum(0))
        nbr_lists.append(i_rest[nbr].tolist())
    non = torch.tensor(non_centres, dtype=torch.long, device=dev)
    summary = (a_r[non, None] * f_r[non]).sum(0)

    source = i_keep.tolist()
    tokens = [x_keep]
    if m > 0:
        tokens += [torch.stack(merged), summary[None]]
        source += [int(i_rest[c]) for c in j] + [-1]
    return {
        "tokens": torch.cat(tokens),
        "source": source,
        "n_visual": n_vis,
        "n_text": n_txt,
        "n_centres": m,
        "neighbours": nbr_lists,
        "summary_members": sorted(i_rest[non].tolist()),
    }


def make_inputs(
    seed: int,
    batch: int = 1,
    n: int = 576,
    width: int = 1024,
    clusters: int = 12,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Seeded, realistic-looking RC signals.

    ``attn`` is a softmax of heavy-tailed (Student-t) logits over CLS + N tokens (so the patch
    share sums to < 1), keys and features share a cluster structure, and ``text_sim`` is
    ``0.036 * cos`` between a query embedding and clustered joint-space patch embeddings.

    Returns:
        dict of ``features`` [B,N,C], ``attn`` [B,N], ``keys`` [B,N,C], ``text_sim`` [B,N].
    """
    g = torch.Generator().manual_seed(seed)
    joint = 768
    # Student-t with 2 degrees of freedom: z / sqrt(chi2_2 / 2), chi2_2 / 2 ~ Exp(1)
    z = torch.randn(batch, n + 1, generator=g)
    expo = -torch.rand(batch, n + 1, generator=g).clamp(min=1e-12).log()
    heavy = (0.7 * z / expo.sqrt()).clamp(max=8.0)  # a few strong tokens, none one-hot
    logits = heavy + 2.0 * torch.randn(batch, n + 1, generator=g)
    attn = logits.softmax(-1)[:, 1:]  # [B,N] CLS->CLS dropped
    assign = torch.randint(0, clusters, (batch, n), generator=g)  # [B,N]
    centres = torch.randn(batch, clusters, width, generator=g)  # [B,clusters,C]
    pick = assign[..., None].expand(-1, -1, width)  # [B,N,C]
    keys = centres.gather(1, pick) + 0.8 * torch.randn(batch, n, width, generator=g) + 0.3
    feats = 0.5 * centres.gather(1, pick) + torch.randn(batch, n, width, generator=g)
    proj_centres = torch.randn(batch, clusters, joint, generator=g)
    proj = proj_centres.gather(1, assign[..., None].expand(-1, -1, joint))
    proj = proj + 1.5 * torch.randn(batch, n, joint, generator=g)  # [B,N,D]
    query = proj_centres[:, 0] + 2.0 * torch.randn(batch, joint, generator=g)  # [B,D]
    cos = torch.nn.functional.cosine_similarity(proj, query[:, None], dim=-1)  # [B,N]
    text_sim = cos * joint**-0.5
    out = {"features": feats, "attn": attn, "keys": keys, "text_sim": text_sim}
    return {k: v.to(dtype) for k, v in out.items()}
