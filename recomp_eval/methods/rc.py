"""Recoverable Compression (RC, Chen et al., arXiv 2409.01179) as batched tensor code.

Spec: docs method.md sections 3-6. Steps per sample, all samples at once:

1. visual filter: ``K_v = int(N * lof_ratio(a, k1))``, ``I_v`` = top-``K_v`` CLS attention;
2. text recovery: ``K_t`` from the LOF of the text score (min-masked over ``I_v``, Q6), ``I_t`` =
   top-``K_t`` text score outside ``I_v``; ``I_keep`` = ``I_v + I_t`` in spatial order;
3. merge: ``M`` centres = top attention of the rest set; each absorbs its 32 best candidates by
   ``cos(key) + w * s`` (``rc_merge.merge_centres``); one summary token absorbs the non-centres;
4. output ``[kept (spatial), centres (attention order), summary]``.

Switches (``RCConfig``) reproduce or fix each quirk of the release; ``official`` and ``paper`` are
the presets of method.md section 4. ``budget="fixed"`` (or ``retention=r``) gives exactly
``budget_from_ratio(r, N)`` tokens per sample (section 6).

Host reads: the adaptive budget makes the output width data dependent, so ``shapes="tight"`` reads
two integers per batch (largest output length and centre count) to size the tensors; the
alternative ``shapes="static"`` pads to ``N + 1`` rows and ``N`` centre slots without any host read
(several times the merge cost at B=1 on a CPU). The fixed budget needs no host read. The
``sklearn`` LOF backend round-trips to the CPU by design (parity backend). ``check_finite``
validates the inputs with one host read.

Members: a kept token holds itself, a centre itself and its neighbours, the summary every
non-centre rest token. Fallback: a sample whose counts are all zero (e.g. constant attention, no
outliers anywhere) would get no token; it gets its top-1 attention patch and ``stats["fallback"]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from recomp_eval.methods.base import (
    Compressed,
    Role,
    SignalSpec,
    TextSpec,
    VisionSignals,
    budget_from_ratio,
    check_options,
    check_retention,
    selection_output,
)
from recomp_eval.methods.outliers import count_from_ratio, iqr_outlier_fraction, lof_outlier_mask
from recomp_eval.methods.rc_merge import (
    above_median,
    assemble,
    descending_rank,
    merge_centres,
)

CHOICES: dict[str, tuple] = {
    "text_source": ("first_line", "question", "prompt", "none"),  # none = text-free (no step 2)
    "text_pool": ("last", "eot"),
    "vit_passes": (1, 2),
    "cls_attention": ("concat_heads", "mean_heads"),
    "lof_count": ("all", "upper"),
    "text_lof_domain": ("masked_all", "remaining"),
    "center_count_base": ("width", "rest"),
    "key_index": ("rest_positions", "grid"),
    "merge_weights": ("raw", "normalized"),
    "summary_token": ("if_centres", "always", "never"),
    "score_dtype": ("model", "float32"),
    "center_rule": ("lof", "iqr"),
    "lof_backend": ("sklearn", "torch"),
    "budget": ("adaptive", "fixed"),
    "shapes": ("tight", "static"),
}


@dataclass(frozen=True)
class RCConfig:
    """Every switch of method.md section 4 (defaults = ``paper``)."""

    text_source: str = "question"  # Q1
    text_max_len: int = 77  # Q2 CLIP context
    text_pool: str = "eot"  # Q2
    vit_passes: int = 1  # Q3
    cls_attention: str = "concat_heads"  # Q4
    lof_count: str = "all"  # Q5 all outliers or only those above the median
    text_lof_domain: str = "masked_all"  # Q6
    center_count_base: str = "rest"  # Q7 width = feature width C (release), rest = R
    lof_k: tuple[int, int, int] = (20, 20, 10)  # Q8 visual, text, centre LOF k
    key_index: str = "grid"  # Q9
    merge_weights: str = "raw"  # Q10
    summary_token: str = "if_centres"  # Q11
    score_dtype: str = "model"  # Q13 model = dtype of the signals
    center_rule: str = "lof"  # Q14
    lof_backend: str = "torch"
    neighbours: int = 32  # candidates merged into each centre
    text_weight: float = 50.0  # t = text_weight * s in the neighbour score
    budget: str = "adaptive"
    retention: float | None = None  # fixed budget ratio (budget="fixed")
    shapes: str = "tight"  # output sizing, see module docstring
    # fixed budget only: up to round(text_share * T) slots go to text-recovered tokens before the
    # attention tokens take the rest (None: attention first, text gets what is left)
    text_share: float | None = None

    def __post_init__(self) -> None:
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"RC option {key}={getattr(self, key)!r}; choose from {allowed}")
        if len(self.lof_k) != 3 or any(int(k) < 1 for k in self.lof_k):
            raise ValueError(f"lof_k must be three positive ints, got {self.lof_k!r}")
        if self.neighbours < 1 or self.text_max_len < 1:
            raise ValueError("neighbours and text_max_len must be positive")
        check_retention(self.retention)
        if self.budget == "fixed" and self.retention is None:
            raise ValueError("budget='fixed' needs retention=r (a float in (0, 1])")
        if self.budget == "adaptive" and self.retention is not None:
            raise ValueError("retention=r sets a fixed budget; drop budget='adaptive' or retention")
        if self.text_share is not None:
            if isinstance(self.text_share, bool) or not 0.0 <= float(self.text_share) <= 1.0:
                raise ValueError(f"text_share must be a share in [0, 1], got {self.text_share!r}")
            if self.budget != "fixed":
                raise ValueError(
                    "text_share splits a fixed budget; set retention=r, or drop text_share"
                )


PRESETS: dict[str, dict[str, Any]] = {
    "official": dict(
        text_source="first_line",
        text_max_len=20,
        text_pool="last",
        vit_passes=2,
        center_count_base="width",
        key_index="rest_positions",
        lof_backend="sklearn",
    ),
    "paper": {},
}


def make_config(variant: str = "paper", retention: float | None = None, **switches) -> RCConfig:
    """Preset ``variant`` with keyword overrides; ``retention`` (not None) implies a fixed budget.

    An override whose value is None keeps the preset's value (config files list every option as
    null so that a variant change is not silently overridden).
    """
    switches = {k: v for k, v in switches.items() if v is not None}
    if variant not in PRESETS:
        raise ValueError(f"unknown RC variant {variant!r}; choose from {sorted(PRESETS)}")
    check_options("recomp", switches, sorted(f.name for f in dataclasses.fields(RCConfig)))
    values = {**PRESETS[variant], **switches}
    if "lof_k" in values:
        values["lof_k"] = tuple(int(k) for k in values["lof_k"])
    if retention is not None:
        values.setdefault("budget", "fixed")
    return RCConfig(retention=retention, **values)


def signal_spec(cfg: RCConfig) -> SignalSpec:
    text = None
    if cfg.text_source != "none":
        text = TextSpec(source=cfg.text_source, max_len=cfg.text_max_len, pool=cfg.text_pool)
    return SignalSpec(
        cls_attn=cfg.cls_attention,
        cls_attn_layer=-1,
        keys="full",
        keys_layer=-1,
        text=text,
        vit_passes=cfg.vit_passes,
    )


def _outlier_fraction(
    values: torch.Tensor, k: int, valid: torch.Tensor | None, cfg: RCConfig
) -> torch.Tensor:
    """[B] float64 LOF outlier fraction of each row's valid entries (``lof_count`` aware)."""
    mask = lof_outlier_mask(values, k, valid, backend=cfg.lof_backend)  # [B,N]
    if cfg.lof_count == "upper":
        mask = mask & above_median(values, valid)
    n_valid = values.shape[1] if valid is None else valid.sum(-1).clamp(min=1)
    return mask.sum(-1).double() / torch.as_tensor(n_valid, dtype=torch.float64)


def _check_finite(signals: VisionSignals, key_norm: torch.Tensor, names: tuple[str, ...]) -> None:
    """Raise ValueError naming any signal with NaN or inf (one host read).

    Cheap probes first: a float32 sum of the features and of each [B,N] score, and the key norms
    the merge needs anyway, are non-finite whenever an entry is (NaN and inf propagate) and cost
    a fraction of ``isfinite(x).all()`` on a CPU; only a non-finite probe (or an overflowing sum)
    runs the exact per-signal check, which names the culprit.
    """
    probes = [getattr(signals, n).sum(dtype=torch.float32) for n in names if n != "keys"]
    probes.append(key_norm.float().sum())
    if not bool(torch.isfinite(torch.stack(probes)).all()):
        signals.check_finite(*names)


def compress(signals: VisionSignals, cfg: RCConfig) -> Compressed:
    """Recoverable Compression of one batch.

    Args:
        signals: features [B,N,C], cls_attn [B,N], keys [B,N,Ck], text_sim [B,N] (not needed when
            ``text_source="none"``).
        cfg: an :class:`RCConfig`.
    Returns:
        Compressed [B,T_max,C] with per-sample lengths, provenance and stats ``n_visual``,
        ``n_text``, ``n_centres``, ``n_summary``, ``clamped``, ``fallback``.
    """
    use_text = cfg.text_source != "none"
    needed = ("cls_attn", "keys", "text_sim") if use_text else ("cls_attn", "keys")
    signals.require(*needed, method="recomp")
    sdtype = signals.cls_attn.dtype if cfg.score_dtype == "model" else torch.float32
    keys = signals.keys.to(sdtype)  # [B,N,Ck]
    key_norm = keys.norm(dim=-1)  # [B,N]
    _check_finite(signals, key_norm, ("features", *needed))
    feats = signals.features
    b, n, width = feats.shape
    device = feats.device
    budget = n if cfg.budget == "adaptive" else budget_from_ratio(cfg.retention, n)
    if budget == n and cfg.budget == "fixed":
        index = torch.arange(n, device=device).expand(b, n)  # [B,N] identity, spatial order
        return selection_output(feats, index, Role.KEPT)
    attn = signals.cls_attn.to(sdtype)  # [B,N]
    ar = torch.arange(n, device=device)  # [N]
    k_vis, k_txt, k_ctr = cfg.lof_k

    # step 1: visual filter
    n_vis = count_from_ratio(n, _outlier_fraction(attn, k_vis, None, cfg))  # [B]
    order_a, rank_a = descending_rank(attn)  # [B,N]
    is_v = rank_a < n_vis[:, None]  # [B,N]

    # step 2: text recovery (Q6); I_t never overlaps I_v
    if use_text:
        sim = signals.text_sim.to(sdtype)  # [B,N]
        if cfg.text_lof_domain == "masked_all":
            masked = torch.where(is_v, sim.min(-1, keepdim=True).values, sim)  # [B,N]
            frac_t = _outlier_fraction(masked, k_txt, None, cfg)
        else:
            frac_t = _outlier_fraction(sim, k_txt, ~is_v, cfg)
        n_txt = count_from_ratio(n - n_vis, frac_t)  # [B]
        _, rank_s = descending_rank(sim, ~is_v)  # [B,N]
        text_bonus = cfg.text_weight * sim  # [B,N]
    else:
        n_txt = torch.zeros_like(n_vis)
        rank_s = torch.full_like(rank_a, n)
        text_bonus = torch.zeros_like(attn)
    if cfg.budget == "fixed":
        reserve = 0 if cfg.text_share is None else round(float(cfg.text_share) * budget)
        n_vis = torch.minimum(n_vis, budget - torch.clamp(n_txt, max=reserve))  # [B]
        is_v = rank_a < n_vis[:, None]
        n_txt = torch.minimum(n_txt, budget - n_vis)
    is_t = (rank_s < n_txt[:, None]) & ~is_v  # [B,N]
    is_keep = is_v | is_t  # [B,N]
    n_keep = n_vis + n_txt  # [B]
    n_rest = n - n_keep  # [B]
    perm = torch.where(is_keep, n + ar, ar).argsort(dim=-1)  # [B,N] rest ascending, then kept
    rest_idx = perm  # [B,N] the first n_rest entries are the rest set

    # step 3: centre count
    if cfg.budget == "fixed":
        slots = budget - n_keep  # [B]
        n_sum = (slots >= 1).long() if cfg.summary_token != "never" else torch.zeros_like(slots)
        n_ctr = slots - n_sum
        clamped = n_ctr > n_rest  # never true: T < N leaves R >= slots + 1
    else:
        valid_r = ar[None, :] < n_rest[:, None]  # [B,N]
        a_rest = attn.gather(1, rest_idx)  # [B,N]
        if cfg.center_rule == "lof":
            frac_c = _outlier_fraction(a_rest, k_ctr, valid_r, cfg)
        else:
            frac_c = iqr_outlier_fraction(a_rest, valid_r)
        base = width if cfg.center_count_base == "width" else n_rest
        n_ctr = count_from_ratio(base, frac_c)  # [B]
        clamped = n_ctr > n_rest
        n_ctr = torch.minimum(n_ctr, n_rest)
        keep_sum = {"always": n_ctr >= 0, "never": n_ctr < 0, "if_centres": n_ctr > 0}
        n_sum = keep_sum[cfg.summary_token].long()
    clamped = clamped | ((n_ctr > 0) & (n_rest - 1 < cfg.neighbours))

    # fallback: never a 0-length sample; keep the top-1 attention patch instead
    fallback = (n_keep + n_ctr + n_sum) == 0  # [B]
    is_v = is_v | (fallback[:, None] & (rank_a == 0))
    n_vis = n_vis + fallback.long()
    n_keep = n_keep + fallback.long()
    lengths = n_keep + n_ctr + n_sum  # [B]

    if cfg.budget == "fixed":
        width_out, capacity = budget, max(1, min(budget, n))
    elif cfg.shapes == "static":
        width_out, capacity = n + 1, n
    else:
        sizes = torch.stack([lengths.max(), n_ctr.max()]).cpu()  # the one host read (sizes)
        width_out, capacity = int(sizes[0]), max(1, int(sizes[1]))

    merge = merge_centres(
        feats,
        keys,
        key_norm,
        attn,
        text_bonus,
        rest_idx,
        n_rest,
        n_ctr,
        capacity,
        cfg.neighbours,
        grid_keys=cfg.key_index == "grid",
        normalized=cfg.merge_weights == "normalized",
    )
    keep_idx = perm.gather(1, (n_rest[:, None] + ar).clamp(max=n - 1))  # [B,N] kept first
    keep_idx[:, 0] = torch.where(fallback, order_a[:, 0], keep_idx[:, 0])
    stats = {
        "n_visual": n_vis,
        "n_text": n_txt,
        "n_centres": n_ctr,
        "n_summary": n_sum,
        "clamped": clamped,
        "fallback": fallback,
    }
    out = assemble(feats, keep_idx, n_keep, is_v, merge, n_ctr, n_sum, width_out, stats)
    if use_text:
        out.patch_scores["text"] = signals.text_sim  # [B,N] what step 2 ranked
    return out


def build(name: str = "recomp", variant: str = "paper", retention: float | None = None, **switches):
    """Registry entry: ``build_method("recomp", variant="official", lof_backend="torch")``."""
    from recomp_eval.methods import BuiltMethod

    cfg = make_config(variant, retention, **switches)
    return BuiltMethod(
        name=name,
        spec=signal_spec(cfg),
        fn=partial(compress, cfg=cfg),
        config={"variant": variant, **dataclasses.asdict(cfg)},
    )
