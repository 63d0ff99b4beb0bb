"""Baseline methods (PruMerge(+), VisionZip, FasterVLM, random, pool) against independent oracles.

Oracles are per-sample numpy loops written from docs/baselines.md, not from the implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recomp_eval.methods import Role, VisionSignals, budget_from_ratio, build_method
from recomp_eval.methods.pool import output_grid
from recomp_eval.methods.random_keep import patch_keys

GRID = (24, 24)
N = GRID[0] * GRID[1]
WIDTH, KEY_WIDTH = 16, 8
U64 = (1 << 64) - 1


def make_signals(b: int = 3, dtype=torch.float64, seed: int = 0, scale: float = 3.0):
    """Random signals; heavy-tailed CLS attention so the IQR rule finds outliers."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, N, WIDTH, generator=g, dtype=torch.float64)
    attn = torch.softmax(torch.randn(b, N, generator=g, dtype=torch.float64) * scale, dim=-1)
    keys = torch.randn(b, N, KEY_WIDTH, generator=g, dtype=torch.float64)
    cls = torch.randn(b, WIDTH, generator=g, dtype=torch.float64)
    seeds = torch.randint(0, 2**62, (b,), generator=g)
    return VisionSignals(
        features=feats.to(dtype),
        cls_attn=attn.to(dtype),
        keys=keys.to(dtype),
        cls_feature=cls.to(dtype),
        seeds=seeds,
        grid=GRID,
    )


def subset(sig: VisionSignals, rows: list[int]) -> VisionSignals:
    pick = torch.tensor(rows)
    return VisionSignals(
        features=sig.features[pick],
        cls_attn=sig.cls_attn[pick],
        keys=sig.keys[pick],
        cls_feature=sig.cls_feature[pick],
        seeds=sig.seeds[pick],
        grid=sig.grid,
    )


def check_contract(out, sig: VisionSignals) -> None:
    """Padding, provenance and dtype invariants every method must satisfy."""
    b, m = out.features.shape[:2]
    assert out.features.dtype == sig.features.dtype
    assert out.features.device == sig.features.device
    assert out.lengths.dtype == torch.int64 and out.source.dtype == torch.int64
    assert out.role.dtype == torch.int8 and out.members.dtype == torch.bool
    assert out.members.shape == (b, m, N)
    assert torch.equal(out.stats["n_tokens"], out.lengths)
    for v in out.stats.values():
        assert v.shape == (b,)
    valid = out.valid
    assert torch.all(out.features[~valid] == 0)
    assert torch.all(out.role[~valid] == int(Role.PAD))
    assert torch.all(out.role[valid] != int(Role.PAD))
    assert torch.all(out.source[~valid] == -1)
    assert not out.members[~valid].any()
    for i in range(b):
        src = out.source[i][valid[i]]
        src = src[src >= 0]
        assert torch.all(src < N)
        assert src.unique().numel() == src.numel(), "duplicate source patches"
        rows = torch.nonzero(out.source[i] >= 0).squeeze(-1)
        assert out.members[i, rows, out.source[i, rows]].all(), "source not among its members"


def check_batch_equals_single(method, sig: VisionSignals, atol: float = 1e-10) -> None:
    out = method(sig)
    for i in range(sig.batch_size):
        alone = method(subset(sig, [i])).sample(0)
        part = out.sample(i)
        torch.testing.assert_close(part.features, alone.features, atol=atol, rtol=0)
        for name in ("lengths", "source", "role", "members"):
            assert torch.equal(getattr(part, name), getattr(alone, name)), name
        for key, value in alone.stats.items():
            assert torch.equal(part.stats[key], value), key


# ---------------------------------------------------------------- PruMerge oracle (numpy loops)


def iqr_count(a: np.ndarray) -> tuple[float, int]:
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    ratio = float(np.mean(a > q3 + 1.5 * (q3 - q1)))
    return ratio, int(len(a) * ratio)


def prumerge_reference(x, a, keys, plus: bool, retention=None, n_nbr: int = 32):
    """One sample: returns (tokens [T,C], centre indices) following docs/baselines.md."""
    n = len(a)
    ratio, k = iqr_count(a)
    fallback = k == 0
    if fallback:
        ratio, k = 1 / 8, int(n / 8)
    order = list(np.argsort(-a, kind="stable"))
    if retention is None:
        centres = order[:k]
        step_third = int(1 / ratio) // 3 if plus and not fallback else 0
        if step_third > 0:
            centres += [p for p in range(0, n - 1, step_third) if p not in centres]
    else:
        slots = budget_from_ratio(retention, n) - 1
        k_att = min(k, slots) if plus else slots
        centres = order[:k_att]
        need = slots - k_att
        if need > 0:
            stride = max(1, (n - 1) // need)
            lattice = [p for p in range(0, n - 1, stride) if p not in centres]
            rest = [p for p in range(n) if p not in centres and p not in lattice]
            centres += sorted((lattice + rest)[:need])  # output in raster order
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    tokens = []
    for i in centres:  # the release's per-centre loop
        others = np.array([j for j in range(n) if j != i])
        cos = kn[others] @ kn[i]
        nbr = others[np.argsort(-cos, kind="stable")[:n_nbr]]
        tokens.append(x[i] + (a[nbr, None] * x[nbr]).sum(0))
    pruned = np.array([j for j in range(n) if j not in set(centres)], dtype=np.int64)
    tokens.append((a[pruned, None] * x[pruned]).sum(0))
    return np.stack(tokens), centres


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
@pytest.mark.parametrize("retention", [None, 0.1, 0.25, 0.5])
def test_prumerge_matches_loop_reference(name: str, retention) -> None:
    sig = make_signals(b=2, seed=1)
    out = build_method(name, retention=retention)(sig)
    check_contract(out, sig)
    for i in range(2):
        x, a, k = (t[i].numpy() for t in (sig.features, sig.cls_attn, sig.keys))
        ref, centres = prumerge_reference(
            x, a, k, plus=name == "prumerge_plus", retention=retention
        )
        t = int(out.lengths[i])
        assert t == len(ref)
        if retention is not None:
            assert t == budget_from_ratio(retention, N) == out.features.shape[1]
        assert out.source[i, : t - 1].tolist() == [int(c) for c in centres]
        np.testing.assert_allclose(out.features[i, :t].numpy(), ref, atol=1e-10)
        assert out.role[i, t - 1] == int(Role.SUMMARY) and out.source[i, t - 1] == -1
        assert out.members[i, t - 1].sum() == N - (t - 1)  # summary absorbs every non-centre


@pytest.mark.parametrize("seed", range(4))
def test_prumerge_adaptive_count_is_iqr_rule(seed: int) -> None:
    sig = make_signals(b=3, seed=seed, scale=1.0 + seed)
    out = build_method("prumerge")(sig)
    plus = build_method("prumerge_plus")(sig)
    for i in range(3):
        ratio, k = iqr_count(sig.cls_attn[i].numpy())
        assert int(out.stats["n_attention"][i]) == k > 0
        assert int(out.lengths[i]) == k + 1
        step_third = int(1 / ratio) // 3
        lattice = set(range(0, N - 1, step_third)) if step_third else set()
        top = set(np.argsort(-sig.cls_attn[i].numpy(), kind="stable")[:k].tolist())
        assert int(plus.lengths[i]) == k + len(lattice - top) + 1
        # PruMerge+ order: attention-ranked centres, then the fill in raster order
        fill = plus.source[i, k : int(plus.lengths[i]) - 1]
        assert torch.all(fill[1:] > fill[:-1])
        assert torch.all(plus.role[i, :k] == int(Role.ATTENTION))
        assert torch.all(plus.role[i, k : int(plus.lengths[i]) - 1] == int(Role.KEPT))


def test_prumerge_fallback_and_edges() -> None:
    sig = make_signals(b=2, seed=3)
    sig.cls_attn = torch.full_like(sig.cls_attn, 1.0 / N)  # constant: no IQR outlier
    out = build_method("prumerge_plus")(sig)
    assert out.stats["fallback"].all()
    assert torch.all(out.lengths == N // 8 + 1) and torch.all(out.stats["n_fill"] == 0)
    # the static output width is tight: 144 huge values of 576 are all IQR outliers
    sig = make_signals(b=1, seed=3)
    sig.cls_attn[0, torch.randperm(N)[:144]] += 10.0
    out = build_method("prumerge")(sig)
    assert int(out.lengths[0]) == out.features.shape[1] == 145
    one = build_method("prumerge", retention=1 / N)(make_signals(b=2))
    assert torch.all(one.lengths == 1) and torch.all(one.role[:, 0] == int(Role.SUMMARY))
    assert one.members.all()  # summary-only output absorbs every patch


# ---------------------------------------------------------------- VisionZip oracle


def visionzip_reference(x, a, keys, cls, d: int, c: int):
    n = len(a)
    dom = sorted(np.argsort(-a, kind="stable")[: d - 1].tolist())
    tokens = [cls] + [x[i] for i in dom]
    rest = [p for p in range(n) if p not in set(dom)]
    m = keys[rest] / np.linalg.norm(keys[rest], axis=1, keepdims=True)
    step = max(1, len(rest) // c)
    targets = list(range(0, len(rest), step))[:c]
    groups: dict[int, list[int]] = {t: [] for t in range(len(targets))}
    for o in range(len(rest)):
        if o in targets:
            continue
        sims = [float(m[o] @ m[t]) for t in targets]
        groups[int(np.argmax(sims))].append(o)
    for t, pos in enumerate(targets):
        members = groups[t]
        mean = sum((x[rest[o]] for o in members), np.zeros_like(cls)) / max(1, len(members))
        tokens.append(x[rest[pos]] + mean)
    return np.stack(tokens), dom, [rest[p] for p in targets]


@pytest.mark.parametrize(
    "options,expect",
    [({}, (54, 10)), ({"dominant": 108, "contextual": 20}, (108, 20)),
     ({"dominant": 162, "contextual": 30}, (162, 30)), ({"retention": 128 / N}, (108, 20)),
     ({"retention": 0.1}, (49, 9))],
)  # fmt: skip
def test_visionzip_matches_loop_reference(options, expect) -> None:
    sig = make_signals(b=2, seed=4)
    out = build_method("visionzip", **options)(sig)
    check_contract(out, sig)
    d, c = expect
    assert torch.all(out.lengths == d + c) and out.features.shape[1] == d + c
    for i in range(2):
        args = (t[i].numpy() for t in (sig.features, sig.cls_attn, sig.keys, sig.cls_feature))
        ref, dom, targets = visionzip_reference(*args, d=d, c=c)
        np.testing.assert_allclose(out.features[i].numpy(), ref, atol=1e-10)
        assert out.source[i].tolist() == [-1, *dom, *targets]
        assert out.role[i, 0] == int(Role.CLS)
        assert torch.all(out.role[i, d:] == int(Role.CONTEXTUAL))
        assert out.members[i].sum(0).max() == 1  # dominant + contextual partition the patches
        assert out.members[i].sum() == N - (d - 1) + (d - 1)


def test_visionzip_retention_split() -> None:
    for r in (0.05, 0.1, 0.3, 0.9):
        t = budget_from_ratio(r, N)
        out = build_method("visionzip", retention=r)(make_signals(b=1))
        assert int(out.lengths[0]) == t
        assert int(out.stats["n_contextual"][0]) == int(t * 10 / 64 + 0.5)


# ---------------------------------------------------------------- FasterVLM, random, pool


def test_fastervlm_topk_raster() -> None:
    sig = make_signals(b=3, seed=5)
    assert build_method("fastervlm").config["retention"] == 0.1
    for r, t in ((0.5, 288), (0.25, 144), (0.1, 58), (0.05, 29)):
        out = build_method("fastervlm", retention=r)(sig)
        check_contract(out, sig)
        assert torch.all(out.lengths == t)
        for i in range(3):
            top = np.sort(np.argsort(-sig.cls_attn[i].numpy(), kind="stable")[:t])
            assert out.source[i].tolist() == top.tolist()
            np.testing.assert_array_equal(out.features[i].numpy(), sig.features[i, top].numpy())


def test_random_keys_match_python_splitmix() -> None:
    def mix(z: int) -> int:
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & U64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & U64
        return z ^ (z >> 31)

    seeds = torch.tensor([0, 1, -5, 2**62 + 7])
    keys = patch_keys(seeds, 40, salt=3)
    for b, s in enumerate(seeds.tolist()):
        base = mix((s & U64) ^ 3)
        expect = [mix((base + p * 0x9E3779B97F4A7C15) & U64) for p in range(1, 41)]
        assert [v & U64 for v in keys[b].tolist()] == expect


def test_random_deterministic_across_batches_and_seeds() -> None:
    sig = make_signals(b=4, seed=6)
    method = build_method("random", retention=0.1)
    full = method(sig)
    check_contract(full, sig)
    assert torch.all(full.lengths == 58)
    swapped = method(subset(sig, [3, 1]))
    assert torch.equal(swapped.source[0], full.source[3])
    assert torch.equal(swapped.source[1], full.source[1])
    assert not torch.equal(full.source[0], full.source[1])  # different samples, different subsets
    other = build_method("random", retention=0.1, seed=1)(sig)
    assert not torch.equal(other.source, full.source)
    assert torch.all(full.source[:, 1:] > full.source[:, :-1])  # raster order


def test_random_is_roughly_uniform() -> None:
    n_samples, t = 2000, 58
    keys = patch_keys(torch.arange(n_samples), N)
    keep = keys.argsort(dim=1, stable=True)[:, :t]
    freq = torch.bincount(keep.flatten(), minlength=N).double()
    expect = n_samples * t / N
    sd = (expect * (1 - t / N)) ** 0.5
    assert (freq - expect).abs().max() < 6 * sd


@pytest.mark.parametrize("stride", [2, 3, 4, 6])
def test_pool_matches_avg_pool2d(stride: int) -> None:
    sig = make_signals(b=2, seed=7)
    out = build_method("pool", stride=stride)(sig)
    check_contract(out, sig)
    fmap = sig.features.transpose(1, 2).reshape(2, WIDTH, *GRID)
    ref = F.avg_pool2d(fmap, stride, stride).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.features, ref)
    assert out.features.shape[1] == (24 // stride) ** 2
    assert torch.all(out.members.sum(-1) == stride * stride)
    assert torch.all(out.members.sum(1) == 1)
    strided = build_method("pool", stride=stride, mode="strided")(sig)
    check_contract(strided, sig)
    grid = sig.features.reshape(2, *GRID, WIDTH)[:, ::stride, ::stride].reshape(2, -1, WIDTH)
    torch.testing.assert_close(strided.features, grid)


@pytest.mark.parametrize("retention", [0.03, 0.1, 0.2, 0.5])
def test_pool_retention_grid(retention: float) -> None:
    sig = make_signals(b=2, seed=8)
    out = build_method("pool", retention=retention)(sig)
    check_contract(out, sig)
    t = budget_from_ratio(retention, N)
    hp, wp = output_grid(t, GRID, 2.0)
    assert int(out.stats["n_tokens"][0]) == hp * wp and int(out.stats["n_requested"][0]) == t
    # brute force: no admissible grid is closer to T
    best = min(abs(h * w - t) for h in range(1, 25) for w in range(1, 25) if max(h / w, w / h) <= 2)
    assert abs(hp * wp - t) == best
    fmap = sig.features.transpose(1, 2).reshape(2, WIDTH, *GRID)
    ref = F.adaptive_avg_pool2d(fmap, (hp, wp)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out.features, ref)
    mean_of_members = (out.members.double() @ sig.features) / out.members.sum(-1, keepdim=True)
    torch.testing.assert_close(out.features, mean_of_members)


# ---------------------------------------------------------------- shared properties

CONFIGS = [
    ("prumerge", {}),
    ("prumerge", {"retention": 0.1}),
    ("prumerge_plus", {}),
    ("prumerge_plus", {"retention": 0.25}),
    ("visionzip", {}),
    ("visionzip", {"retention": 0.2}),
    ("fastervlm", {}),
    ("random", {}),
    ("pool", {}),
    ("pool", {"retention": 0.1, "mode": "strided"}),
]


@pytest.mark.parametrize("name,options", CONFIGS)
def test_batch_equals_single(name: str, options: dict) -> None:
    check_batch_equals_single(build_method(name, **options), make_signals(b=3, seed=9))


@pytest.mark.parametrize("name,options", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_preserved(name: str, options: dict, dtype) -> None:
    sig = make_signals(b=2, dtype=dtype, seed=10)
    out = build_method(name, **options)(sig)
    check_contract(out, sig)


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus", "visionzip", "fastervlm", "random"])
def test_retention_one_is_identity(name: str) -> None:
    sig = make_signals(b=2, seed=11)
    out = build_method(name, retention=1.0)(sig)
    assert torch.equal(out.features, sig.features)
    assert torch.equal(out.source, torch.arange(N).expand(2, N))
    pooled = build_method("pool", retention=1.0)(sig)
    assert torch.equal(pooled.features, sig.features)


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus", "visionzip", "fastervlm"])
def test_bad_inputs(name: str) -> None:
    sig = make_signals(b=2)
    sig.cls_attn[1, 5] = float("nan")
    with pytest.raises(ValueError, match="cls_attn"):
        build_method(name)(sig)
    sig = make_signals(b=2)
    sig.cls_attn = None
    with pytest.raises(ValueError, match="cls_attn"):
        build_method(name)(sig)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="outside"):
            build_method(name, retention=bad)
    with pytest.raises(ValueError, match="valid"):
        build_method(name, bogus=1)


def test_bad_inputs_random_and_pool() -> None:
    sig = make_signals(b=2)
    sig.seeds = None
    with pytest.raises(ValueError, match="seeds"):
        build_method("random")(sig)
    sig = make_signals(b=2)
    sig.features[0, 0, 0] = float("inf")
    for name in ("random", "pool"):
        with pytest.raises(ValueError, match="features"):
            build_method(name)(sig)
    with pytest.raises(ValueError, match="divide"):
        build_method("pool", stride=5)(make_signals(b=1))
    with pytest.raises(ValueError, match="not both"):
        build_method("pool", stride=2, retention=0.1)
    with pytest.raises(ValueError, match="not both"):
        build_method("visionzip", dominant=54, contextual=10, retention=0.1)
    sig = make_signals(b=1)
    sig.keys = None
    with pytest.raises(ValueError, match="keys"):
        build_method("visionzip")(sig)
    with pytest.raises(ValueError, match="keys"):
        build_method("prumerge")(sig)


@pytest.mark.gpu
@pytest.mark.parametrize("name,options", CONFIGS)
def test_cuda_matches_cpu(name: str, options: dict) -> None:
    sig = make_signals(b=3, seed=12)
    method = build_method(name, **options)
    cpu = method(sig)
    dev = VisionSignals(
        features=sig.features.cuda(),
        cls_attn=sig.cls_attn.cuda(),
        keys=sig.keys.cuda(),
        cls_feature=sig.cls_feature.cuda(),
        seeds=sig.seeds.cuda(),
        grid=sig.grid,
    )
    gpu = method(dev)
    assert gpu.features.device.type == "cuda"
    torch.testing.assert_close(gpu.features.cpu(), cpu.features, atol=1e-8, rtol=0)
    assert torch.equal(gpu.source.cpu(), cpu.source)
    assert torch.equal(gpu.members.cpu(), cpu.members)


@pytest.mark.parametrize(
    ("name", "typo", "suggestion"),
    [
        ("none", "retension", None),
        ("recomp", "lof_neighbours", None),
        ("prumerge", "n_neighbours", "n_neighbors"),
        ("prumerge_plus", "fallback_ration", "fallback_ratio"),
        ("visionzip", "dominent", "dominant"),
        ("fastervlm", "retentoin", "retention"),
        ("random", "sead", "seed"),
        ("pool", "strides", "stride"),
    ],
)
def test_unknown_options_are_one_line_with_a_suggestion(name, typo, suggestion) -> None:
    """Every method's ``build`` checks its options with ``methods.base.check_options``."""
    with pytest.raises(ValueError, match="valid options") as info:
        build_method(name, **{typo: 1})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"unknown options ['{typo}'] for method '{name}'")
    if suggestion is not None:
        assert f"(did you mean '{suggestion}'?)" in message


def test_check_options() -> None:
    from recomp_eval.methods.base import check_options

    check_options("pool", {"stride": 2}, ("stride", "mode"))
    check_options("none", {}, ())
    with pytest.raises(ValueError, match=r"for method 'none'; valid options: none$"):
        check_options("none", {"x": 1}, ())
    with pytest.raises(ValueError, match=r"\['mod', 'zz'\] .*did you mean 'mode'\?\)"):
        check_options("pool", {"zz": 1, "mod": 2}, ("stride", "mode"))
