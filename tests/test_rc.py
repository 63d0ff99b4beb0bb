"""Recoverable Compression: parity with the loop oracle, switches, budgets, batching, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import LocalOutlierFactor

from recomp_eval.methods import Role, VisionSignals, budget_from_ratio, build_method
from recomp_eval.methods.outliers import lof_outlier_mask
from recomp_eval.methods.rc import RCConfig, make_config
from recomp_eval.rc_oracle import lof_ratio, make_inputs, rc_single

N, C = 576, 1024


def signals_of(x: dict[str, torch.Tensor], **extra) -> VisionSignals:
    return VisionSignals(
        features=x["features"],
        cls_attn=x["attn"],
        keys=x["keys"],
        text_sim=x.get("text_sim"),
        **extra,
    )


def run(x: dict[str, torch.Tensor], variant: str = "official", **switches):
    return build_method("recomp", variant=variant, **switches)(signals_of(x))


def oracle(x: dict[str, torch.Tensor], i: int, **kwargs) -> dict:
    return rc_single(x["features"][i], x["attn"][i], x["keys"][i], x["text_sim"][i], **kwargs)


def assert_matches_oracle(out, x, atol: float = 1e-5, **oracle_kwargs) -> None:
    for i in range(out.features.shape[0]):
        ref = oracle(x, i, **oracle_kwargs)
        got = out.sample(i)
        assert int(got.stats["n_visual"]) == ref["n_visual"]
        assert int(got.stats["n_text"]) == ref["n_text"]
        assert int(got.stats["n_centres"]) == ref["n_centres"]
        assert got.source[0].tolist() == ref["source"]
        torch.testing.assert_close(got.features[0], ref["tokens"], atol=atol, rtol=0)
        merged = (got.role[0] == Role.MERGED).nonzero().flatten()
        for row, nbrs in zip(merged.tolist(), ref["neighbours"]):
            expect = {int(got.source[0, row]), *nbrs}
            assert set(got.members[0, row].nonzero().flatten().tolist()) == expect
        summary = (got.role[0] == Role.SUMMARY).nonzero().flatten().tolist()
        if summary:
            members = got.members[0, summary[0]].nonzero().flatten().tolist()
            assert members == ref["summary_members"]


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_official_matches_oracle_fp32(backend: str) -> None:
    x = make_inputs(seed=0, batch=2)
    out = run(x, lof_backend=backend)
    assert out.stats["n_centres"].min() > 0  # the merge path is exercised
    assert_matches_oracle(out, x)


def test_official_matches_oracle_fp16_rounded_sklearn() -> None:
    x = {k: v.half().float() for k, v in make_inputs(seed=3, batch=2).items()}
    assert_matches_oracle(run(x, lof_backend="sklearn"), x)


def test_paper_variant_matches_oracle_with_fixes() -> None:
    x = make_inputs(seed=5, batch=2)
    out = run(x, variant="paper")
    assert_matches_oracle(out, x, center_base="rest", key_index="grid")


def test_fp16_signals_keep_dtype_and_selection() -> None:
    x = {k: v.half() for k, v in make_inputs(seed=1, batch=1).items()}
    out = run(x)
    assert out.features.dtype == torch.float16 and out.features.device == x["features"].device
    for i in range(1):
        ref = oracle(x, i)
        got = out.sample(i)
        assert int(got.lengths) == len(ref["source"])
        k = int(got.stats["n_visual"] + got.stats["n_text"])
        assert got.source[0, :k].tolist() == ref["source"][:k]
        torch.testing.assert_close(got.features[0, :k], ref["tokens"][:k], atol=0, rtol=0)


@pytest.mark.parametrize("n,k", [(576, 20), (300, 10), (15, 20), (2, 20)])
def test_lof_with_ragged_rows_equals_sklearn(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n)
    values = torch.randn(4, n, generator=g).exp()  # skewed, tie-free
    valid = torch.rand(4, n, generator=g) < 0.8
    valid[0] = True
    window = lof_outlier_mask(values, k, valid, backend="torch")
    for row in range(4):
        cols = valid[row].nonzero().flatten()
        if cols.numel() < 2:
            assert not window[row].any()
            continue
        kk = max(1, min(k, cols.numel() - 1))
        pred = LocalOutlierFactor(n_neighbors=kk).fit_predict(values[row, cols, None].numpy())
        assert torch.equal(window[row, cols], torch.from_numpy(pred == -1))


def test_counts_order_and_provenance() -> None:
    x = make_inputs(seed=2, batch=3)
    out = run(x, variant="paper")
    for i in range(3):
        got = out.sample(i)
        s = got.stats
        n_keep = int(s["n_visual"] + s["n_text"])
        m = int(s["n_centres"])
        assert int(got.lengths) == n_keep + m + int(s["n_summary"])
        assert int(s["n_summary"]) == int(m > 0)
        kept = got.source[0, :n_keep]
        assert torch.all(kept[1:] > kept[:-1])  # I_keep sorted, unique
        src = got.source[0][got.source[0] >= 0]
        assert src.unique().numel() == src.numel() and int(src.max()) < N
        # I_v = top-K_v attention; text picks are the top text scores outside I_v
        a, s_txt = x["attn"][i], x["text_sim"][i]
        k_v = int(s["n_visual"])
        roles = got.role[0, :n_keep]
        assert set(kept[roles == Role.ATTENTION].tolist()) == set(a.topk(k_v).indices.tolist())
        masked = s_txt.clone()
        masked[a.topk(k_v).indices] = -1.0
        expect_t = set(masked.topk(int(s["n_text"])).indices.tolist())
        assert set(kept[roles == Role.TEXT].tolist()) == expect_t
        # centres come in attention-descending order
        centres = got.source[0, n_keep : n_keep + m]
        assert torch.all(a[centres][1:] <= a[centres][:-1])


def test_batch_equals_per_sample() -> None:
    x = make_inputs(seed=7, batch=4)
    for variant in ("paper", "official"):
        out = run(x, variant=variant, lof_backend="torch")
        assert out.lengths.unique().numel() > 1  # ragged
        for i in range(4):
            alone = run(
                {k: v[i : i + 1] for k, v in x.items()}, variant=variant, lof_backend="torch"
            )
            got = out.sample(i)
            assert torch.equal(got.source, alone.source) and torch.equal(got.role, alone.role)
            assert torch.equal(got.members, alone.members)
            # equal up to fp32 rounding of the batched matrix product (GEMM blocking)
            torch.testing.assert_close(got.features, alone.features, atol=1e-5, rtol=0)
            pad = out.features[i, int(out.lengths[i]) :]
            assert not pad.any() and (out.role[i, int(out.lengths[i]) :] == Role.PAD).all()


def test_q6_text_lof_domain() -> None:
    x = make_inputs(seed=4, batch=2)
    for i in range(2):
        a, s = x["attn"][i], x["text_sim"][i]
        k_v = int(N * lof_ratio(a, 20))
        iv = a.topk(k_v).indices
        rest = torch.ones(N, dtype=torch.bool)
        rest[iv] = False
        masked = s.clone()
        masked[iv] = s.min()
        want = {
            "masked_all": int((N - k_v) * lof_ratio(masked, 20)),
            "remaining": int((N - k_v) * lof_ratio(s[rest], 20)),
        }
        for domain, k_t in want.items():
            out = run(x, variant="paper", text_lof_domain=domain)
            assert int(out.stats["n_text"][i]) == k_t
    # the two rules give different counts on these inputs
    a = run(x, variant="paper", text_lof_domain="masked_all").stats["n_text"]
    b = run(x, variant="paper", text_lof_domain="remaining").stats["n_text"]
    assert not torch.equal(a, b)


def _rest_ratio(out, x, i: int, k: int = 10) -> tuple[float, int]:
    kept = out.sample(i).source[0, : int(out.stats["n_visual"][i] + out.stats["n_text"][i])]
    kept = {int(v) for v in kept}
    rest = [j for j in range(x["attn"].shape[1]) if j not in kept]
    return lof_ratio(x["attn"][i, rest], k), len(rest)


def test_q7_center_count_base() -> None:
    x = make_inputs(seed=0, batch=3)
    width = run(x, center_count_base="width")
    rest = run(x, center_count_base="rest")
    for i in range(3):
        ratio, r = _rest_ratio(width, x, i)
        assert int(width.stats["n_centres"][i]) == min(int(C * ratio), r)
        assert int(rest.stats["n_centres"][i]) == int(r * ratio)
    assert (width.stats["n_centres"] >= rest.stats["n_centres"]).all()
    assert width.stats["n_centres"].sum() > rest.stats["n_centres"].sum()


def test_q9_key_index_changes_neighbours() -> None:
    x = make_inputs(seed=0, batch=1)
    grid = run(x, key_index="grid")
    assert_matches_oracle(grid, x, key_index="grid")
    release = run(x, key_index="rest_positions")
    assert torch.equal(grid.source, release.source)  # same centres
    assert not torch.equal(grid.members, release.members)  # different clusters


def test_q10_normalized_weights_are_weighted_means() -> None:
    x = make_inputs(seed=0, batch=1)
    out = run(x, merge_weights="normalized")
    a, f = x["attn"][0], x["features"][0]
    rows = ((out.role[0] == Role.MERGED) | (out.role[0] == Role.SUMMARY)).nonzero().flatten()
    assert rows.numel() > 1
    for row in rows.tolist():
        w = a * out.members[0, row]
        torch.testing.assert_close(out.features[0, row], (w / w.sum()) @ f, atol=1e-5, rtol=0)
    raw = run(x, merge_weights="raw")
    assert not torch.allclose(raw.features[0, rows], out.features[0, rows])


def _flat_rest_inputs() -> dict[str, torch.Tensor]:
    """Ten attention spikes over an evenly spaced floor: no centre outliers in the rest set."""
    x = make_inputs(seed=0, batch=1)
    attn = torch.linspace(1e-3, 1.2e-3, N)[None]
    attn[0, ::60] = torch.linspace(0.02, 0.05, 10)
    x["attn"] = attn
    return x


def test_q11_summary_token() -> None:
    x = _flat_rest_inputs()
    assert int(run(x).stats["n_centres"][0]) == 0
    for mode, has_summary in (("if_centres", False), ("always", True), ("never", False)):
        out = run(x, summary_token=mode)
        assert bool((out.role[0] == Role.SUMMARY).any()) == has_summary
    y = make_inputs(seed=0, batch=1)
    out = run(y, summary_token="never")
    assert int(out.stats["n_centres"][0]) > 0 and not (out.role == Role.SUMMARY).any()


def test_q5_upper_and_q14_iqr_counts() -> None:
    x = make_inputs(seed=1, batch=1)
    a = x["attn"][0]
    pred = LocalOutlierFactor(n_neighbors=20).fit_predict(a[:, None].numpy()) == -1
    upper = int((pred & (a.numpy() > np.median(a.numpy()))).sum())
    assert int(run(x, lof_count="upper").stats["n_visual"][0]) == int(N * (upper / N))
    out = run(x, center_rule="iqr")
    kept = out.source[0, : int(out.stats["n_visual"][0] + out.stats["n_text"][0])].tolist()
    a_r = np.delete(a.numpy(), kept).astype(np.float64)
    q1, q3 = np.percentile(a_r, [25, 75])
    frac = float(np.mean(a_r > q3 + 1.5 * (q3 - q1)))
    assert int(out.stats["n_centres"][0]) == min(int(C * frac), a_r.size)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_fixed_budget_hits_t_exactly(variant: str) -> None:
    x = make_inputs(seed=6, batch=2)
    for r in (1 / N, 2 / N, 0.05, 0.1, 0.3, 0.75):
        t = budget_from_ratio(r, N)
        out = run(x, variant=variant, retention=r, lof_backend="torch")
        assert out.features.shape[1] == t and (out.lengths == t).all()
        s = out.stats
        assert torch.equal(
            s["n_visual"] + s["n_text"] + s["n_centres"] + s["n_summary"], out.lengths
        )
        src = out.source[out.source >= 0]
        assert src.numel() == (out.source >= 0).sum()
    full = run(x, variant=variant, retention=1.0)
    assert torch.equal(full.features, x["features"])
    assert torch.equal(full.source, torch.arange(N).expand(2, N))


def test_fixed_budget_priority() -> None:
    x = make_inputs(seed=0, batch=1)
    adaptive = run(x, variant="paper")
    k_v, k_t = int(adaptive.stats["n_visual"]), int(adaptive.stats["n_text"])
    small = run(x, variant="paper", retention=(k_v - 3) / N)
    assert int(small.stats["n_visual"]) == k_v - 3 and int(small.stats["n_text"]) == 0
    mid = run(x, variant="paper", retention=(k_v + k_t + 1) / N)
    assert int(mid.stats["n_summary"]) == 1 and int(mid.stats["n_centres"]) == 0
    big = run(x, variant="paper", retention=(k_v + k_t + 9) / N)
    assert int(big.stats["n_centres"]) == 8 and int(big.stats["n_summary"]) == 1


def test_clamps_and_fallback_are_flagged() -> None:
    x = make_inputs(seed=0, batch=4, n=64, width=256)
    out = run(x)  # official: M = int(C * r) can exceed R; R - 1 < 32 neighbours
    for i in range(4):
        ratio, r = _rest_ratio(out, x, i)
        m_raw = int(256 * ratio)
        assert int(out.stats["n_centres"][i]) == min(m_raw, r)
        expect = m_raw > r or (min(m_raw, r) > 0 and r - 1 < 32)
        assert bool(out.stats["clamped"][i]) == expect
    assert out.stats["clamped"].any()
    flat = make_inputs(seed=0, batch=2)
    flat["attn"] = torch.full((2, N), 1.0 / N)
    flat["text_sim"] = torch.full((2, N), 0.01)
    out = run(flat)
    assert out.stats["fallback"].all() and (out.lengths == 1).all()
    assert (out.role[:, 0] == Role.ATTENTION).all()


def test_small_n_works() -> None:
    x = make_inputs(seed=0, batch=2, n=16, width=32)
    for variant in ("official", "paper"):
        out = run(x, variant=variant)
        assert (out.lengths >= 1).all()


def test_bad_input_and_options() -> None:
    x = make_inputs(seed=0, batch=1)
    bad = dict(x)
    bad["attn"] = x["attn"].clone()
    bad["attn"][0, 3] = float("nan")
    with pytest.raises(ValueError, match="cls_attn"):
        run(bad)
    no_text = {k: v for k, v in x.items() if k != "text_sim"}
    with pytest.raises(ValueError, match="text_sim"):
        run(no_text)
    out = run(no_text, text_source="none")
    assert int(out.stats["n_text"][0]) == 0 and (out.role != Role.TEXT).all()
    with pytest.raises(ValueError, match="valid options"):
        build_method("recomp", variant="paper", lof_neighbours=5)
    with pytest.raises(ValueError, match="variant"):
        build_method("recomp", variant="nope")
    with pytest.raises(ValueError, match="budget"):
        build_method("recomp", budget="fixed")
    with pytest.raises(ValueError):
        build_method("recomp", key_index="bogus")


def test_presets_and_spec() -> None:
    official = build_method("recomp", variant="official")
    paper = build_method("recomp", variant="paper")
    assert official.spec.text.source == "first_line" and official.spec.text.max_len == 20
    assert official.spec.text.pool == "last" and official.spec.vit_passes == 2
    assert paper.spec.text.source == "question" and paper.spec.text.max_len == 77
    assert paper.spec.text.pool == "eot" and paper.spec.vit_passes == 1
    assert official.spec.cls_attn == "concat_heads" and official.spec.keys == "full"
    cfg = make_config("official", key_index="grid")
    assert cfg.key_index == "grid" and cfg.center_count_base == "width"
    assert cfg.lof_backend == "sklearn" and make_config("paper").lof_backend == "torch"
    assert make_config("paper", retention=0.1).budget == "fixed"
    assert RCConfig().lof_k == (20, 20, 10)


def test_score_dtype_float32_on_fp16_signals() -> None:
    x = {k: v.half() for k, v in make_inputs(seed=2, batch=1).items()}
    out = run(x, variant="paper", score_dtype="float32")
    assert out.features.dtype == torch.float16
    ref = run({k: v.float() for k, v in x.items()}, variant="paper")
    assert torch.equal(out.source, ref.source)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_official_parity_sweep(backend: str) -> None:
    for seed in range(10, 40):
        x = make_inputs(seed=seed, batch=2)
        assert_matches_oracle(run(x, lof_backend=backend), x)
        y = {k: v.half().float() for k, v in x.items()}
        assert_matches_oracle(run(y, lof_backend="sklearn"), y)


def test_static_shapes_equal_tight() -> None:
    x = make_inputs(seed=8, batch=2)
    tight = run(x, variant="paper")
    static = run(x, variant="paper", shapes="static")
    assert static.features.shape[1] == N + 1
    w = tight.features.shape[1]
    assert torch.equal(static.lengths, tight.lengths)
    assert torch.equal(static.source[:, :w], tight.source)
    torch.testing.assert_close(static.features[:, :w], tight.features, atol=1e-5, rtol=0)


def test_method_config_file_builds_both_variants() -> None:
    import pathlib

    import yaml

    path = pathlib.Path(__file__).parents[1] / "configs" / "method" / "recomp.yaml"
    cfg = yaml.safe_load(path.read_text())
    name = cfg.pop("name")
    assert build_method(name, **cfg).config == build_method("recomp").config
    cfg["variant"] = "official"
    assert build_method(name, **cfg).config == build_method("recomp", variant="official").config


@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_text_share_reserves_room_for_text_recovered_tokens(share: float) -> None:
    x = make_inputs(seed=9, batch=3)
    t = budget_from_ratio(0.1, N)
    base = run(x, variant="paper", retention=0.1)
    more = run(x, variant="paper", retention=0.1, text_share=share)
    adaptive = run(x, variant="paper")  # the LOF counts before the budget
    reserve = round(share * t)
    for i in range(3):
        lof_v, lof_t = int(adaptive.stats["n_visual"][i]), int(adaptive.stats["n_text"][i])
        n_v, n_t = int(more.stats["n_visual"][i]), int(more.stats["n_text"][i])
        assert n_t == min(lof_t, max(reserve, t - min(lof_v, t)))  # reserve first, then leftovers
        assert n_v == min(lof_v, t - n_t)
        assert int(more.lengths[i]) == t == int(base.lengths[i])
        assert n_t >= int(base.stats["n_text"][i])
        roles = more.sample(i).role[0]
        assert int((roles == Role.TEXT).sum()) == n_t


def test_text_share_needs_a_fixed_budget() -> None:
    with pytest.raises(ValueError, match="fixed budget"):
        build_method("recomp", text_share=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_method("recomp", retention=0.1, text_share=1.5)
