"""TRIM against a loop port of the released selection (FreedomIntelligence/TRIM
``clip_encoder.py`` L66-146), written here: the release's score at batch 1, numpy percentiles on
the float32 scores, ``int(N * k)``, then plain-Python top-k, a kept list and a mean over the
rest. Inputs: N = 576 patches, C = 1024 feature channels, D = 768 joint-space channels; a few
"object" blocks of patches whose embedding points against the text (TRIM negates the dot
product, so those score highest) make the IQR outlier set non-trivial.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from recomp_eval.methods import build_method
from recomp_eval.methods.base import Role, VisionSignals, budget_from_ratio

N, C, D = 576, 1024, 768
SIDE = 24


def realistic(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features [B,N,C], patch_embeds [B,N,D] fp32 and text_embeds [B,1,D], unnormalised."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 1, D, generator=g) * 0.4  # norm ~ 11
    common = torch.randn(batch, 1, D, generator=g) * 0.5  # shared by every patch
    patches = common + 0.1 * torch.randn(batch, N, D, generator=g)  # dot spread ~ 1.1
    unit = text / text.norm(dim=-1, keepdim=True)  # [B,1,D]
    for b in range(batch):
        for _ in range(3):  # object blocks, 3..6 patches wide
            h, w = (int(v) for v in torch.randint(3, 7, (2,), generator=g))
            r0, c0 = (int(v) for v in torch.randint(0, SIDE - 6, (2,), generator=g))
            rows = torch.arange(r0, r0 + h)[:, None] * SIDE + torch.arange(c0, c0 + w)[None, :]
            strength = 0.25 + 0.25 * torch.rand(h * w, 1, generator=g)  # dot -2.8..-5.5
            patches[b, rows.flatten()] -= strength * unit[b]
    features = torch.randn(batch, N, C, generator=g)
    return features, patches, text


def loop_trim(x: torch.Tensor, p: torch.Tensor, t: torch.Tensor, k: float):
    """The release on one batch ``x`` [B,N,C], ``p`` [B,N,D], ``t`` [B,1,D] with ``TRIM:k``
    (``k = -1``: adaptive). Returns (keep, [kept patch lists], [mean rows float64])."""
    b, n, _ = x.shape
    sim = torch.matmul(p.float(), t.float().transpose(1, 2)).squeeze(2)  # release L86
    sim = torch.softmax(-sim, dim=-1)
    if k == -1:
        flat = sim.to(torch.float32).cpu().numpy().flatten()  # release L94-102
        q1, q3 = np.percentile(flat, 25), np.percentile(flat, 75)
        upper = q3 + 1.5 * (q3 - q1)
        k = len(np.where(flat > upper)[0]) / len(flat)
    keep = int(n * k)
    kept, means = [], []
    for row in range(b):
        values = sim[row].tolist()
        ranked = sorted(range(n), key=lambda j: -values[j])  # stable: lower index on ties
        chosen = sorted(ranked[:keep])
        rest = sorted(set(range(n)) - set(chosen))
        kept.append(chosen)
        means.append(x[row, rest].double().mean(dim=0) if rest else None)
    return keep, kept, means


def check_against(out, x, keeps, kept, means, mean_token: bool = True) -> None:
    """Per sample: kept rows, sources, roles, members, the mean token, padding."""
    fp16 = x.dtype == torch.float16
    for b in range(x.shape[0]):
        keep = keeps[b]
        assert int(out.lengths[b]) == keep + int(mean_token)
        src = out.source[b, :keep].tolist()
        assert src == kept[b] and len(set(src)) == keep  # unique, raster order
        assert torch.equal(out.features[b, :keep], x[b, kept[b]])
        assert (out.role[b, :keep] == int(Role.TEXT)).all()
        assert torch.equal(out.members[b, :keep].nonzero()[:, 1], torch.tensor(kept[b]))
        end = keep
        if mean_token:
            got, want = out.features[b, keep].double(), means[b]
            if fp16:  # the release averages in fp32 and casts to fp16: within one fp16 rounding
                torch.testing.assert_close(got, want.half().double(), atol=1e-5, rtol=2**-10)
            else:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert int(out.source[b, keep]) == -1 and int(out.role[b, keep]) == Role.SUMMARY
            members = set(out.members[b, keep].nonzero()[:, 0].tolist())
            assert members == set(range(N)) - set(kept[b])
            end += 1
        assert not out.features[b, end:].any() and (out.role[b, end:] == Role.PAD).all()
        assert (out.source[b, end:] == -1).all() and not out.members[b, end:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [None, 64, 128, 192])
def test_official_matches_the_loop_port_per_sample(dtype: torch.dtype, tokens: int | None):
    features, patches, text = realistic(3, seed=tokens or 1)
    features, text = features.to(dtype), text.to(dtype)  # text tower dtype; patch_embeds fp32
    retention = None if tokens is None else tokens / N
    method = build_method("trim", retention=retention)
    out = method(VisionSignals(features=features, patch_embeds=patches, text_embeds=text))
    keeps, kept, means = [], [], []
    for b in range(3):
        one = slice(b, b + 1)
        keep, chosen, mean = loop_trim(features[one], patches[one], text[one], retention or -1)
        keeps.append(keep)
        kept.append(chosen[0])
        means.append(mean[0])
        alone = method(VisionSignals(features=features[one], patch_embeds=patches[one],
                                     text_embeds=text[one]))  # fmt: skip
        assert alone.source[0, : keep + 1].tolist() == out.source[b, : keep + 1].tolist()
    check_against(out, features, keeps, kept, means)
    if tokens is None:
        assert len(set(keeps)) > 1 and all(20 <= k <= 144 for k in keeps), keeps  # non-trivial
        assert out.features.shape[1] == 145  # the static bound at N = 576
        assert out.stats["iqr_ratio"].tolist() == [k / N for k in keeps]
    else:
        assert keeps == [tokens] * 3 and out.features.shape == (3, tokens + 1, C)
    assert out.stats["n_tokens"].tolist() == [k + 1 for k in keeps]
    assert out.stats["n_selected"].tolist() == keeps and out.stats["n_summary"].tolist() == [1] * 3


def test_batch_global_iqr_is_the_release_on_the_whole_batch() -> None:
    features, patches, text = realistic(3, seed=11)
    out = build_method("trim", batch_global_iqr=True)(
        VisionSignals(features=features, patch_embeds=patches, text_embeds=text)
    )
    keep, kept, means = loop_trim(features, patches, text, -1)
    check_against(out, features, [keep] * 3, kept, means)
    alone = [loop_trim(features[b : b + 1], patches[b : b + 1], text[b : b + 1], -1)[0]
             for b in range(3)]  # fmt: skip
    assert any(a != keep for a in alone), (alone, keep)  # the batch changes the counts


@pytest.mark.parametrize("tokens", [64, 128, 192])
def test_fixed_variant_keeps_round_rn_minus_one_plus_the_mean(tokens: int) -> None:
    features, patches, text = realistic(2, seed=tokens + 1)
    out = build_method("trim", retention=tokens / N, variant="fixed")(
        VisionSignals(features=features, patch_embeds=patches, text_embeds=text)
    )
    keep, kept, means = loop_trim(features, patches, text, (tokens - 1) / N)
    assert keep == tokens - 1
    check_against(out, features, [keep] * 2, kept, means)


def test_fixed_variant_gives_exactly_round_rn_tokens() -> None:
    features, patches, text = realistic(2, seed=4)
    signals = VisionSignals(features=features, patch_embeds=patches, text_embeds=text)
    for retention in (1 / N, 0.05, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0):
        t = budget_from_ratio(retention, N)
        for mean_token in (True, False):
            out = build_method("trim", retention=retention, variant="fixed",
                               mean_token=mean_token)(signals)  # fmt: skip
            assert out.features.shape[1] == t and out.lengths.tolist() == [t, t], retention
            assert out.stats["n_requested"].tolist() == [t, t]
            for row in out.source:
                real = [s for s in row.tolist() if s >= 0]
                assert len(set(real)) == len(real) == t - int(mean_token)
    only_mean = build_method("trim", retention=1 / N, variant="fixed")(signals)
    torch.testing.assert_close(only_mean.features[:, 0], features.mean(dim=1))
    assert only_mean.members[:, 0].all()


def test_no_outlier_keeps_only_the_mean_token() -> None:
    """Uniform scores: IQR 0, nothing above the fence, keep = 0 (the release raises there)."""
    features, _, text = realistic(2, seed=2)
    flat = torch.ones(2, N, D)
    out = build_method("trim")(
        VisionSignals(features=features, patch_embeds=flat, text_embeds=text)
    )
    assert out.lengths.tolist() == [1, 1] and (out.role[:, 0] == Role.SUMMARY).all()
    torch.testing.assert_close(out.features[:, 0], features.mean(dim=1))
    assert out.stats["n_selected"].tolist() == [0, 0]


def test_mean_token_false_drops_the_mean() -> None:
    features, patches, text = realistic(2, seed=6)
    signals = VisionSignals(features=features, patch_embeds=patches, text_embeds=text)
    with_mean = build_method("trim")(signals)
    without = build_method("trim", mean_token=False)(signals)
    keeps = with_mean.stats["n_selected"].tolist()
    assert without.lengths.tolist() == keeps
    assert (without.role[without.valid] == Role.TEXT).all()
    for b, k in enumerate(keeps):
        assert torch.equal(without.source[b, :k], with_mean.source[b, :k])
    everything = build_method("trim", retention=1.0, mean_token=False)(signals)
    assert everything.source.tolist() == [list(range(N))] * 2


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"variant": "paper"}, "variant='paper'"),
        ({"mean_token": "yes"}, "mean_token must be true or false"),
        ({"batch_global_iqr": 1}, "batch_global_iqr must be true or false"),
        ({"batch_global_iqr": True, "retention": 0.25}, "adaptive budget only"),
        ({"retention": 1.0}, "variant=fixed"),
        ({"retention": 1.5}, "outside (0, 1]"),
        ({"mean_tokens": True}, "did you mean 'mean_token'"),
    ],
)
def test_bad_options_are_one_line(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        build_method("trim", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_or_misshapen_text_signal_is_named() -> None:
    features, patches, text = realistic(1)
    with pytest.raises(ValueError, match="patch_embeds"):
        build_method("trim")(VisionSignals(features=features, text_embeds=text))
    with pytest.raises(ValueError, match=r"\[B,1,D\]"):
        build_method("trim")(VisionSignals(features=features, patch_embeds=patches,
                                           text_embeds=text.expand(1, 2, D)))  # fmt: skip


def test_spec_asks_for_fp32_patch_embeds_and_the_user_turn() -> None:
    spec = build_method("trim").spec
    assert spec.patch_embeds == "fp32" and spec.text.source == "user_text"
    assert (spec.text.output, spec.text.pool, spec.text.max_len) == ("embeddings", "eot", 77)
    assert not spec.text.segments


def test_batched_speed_on_a_large_batch() -> None:
    features, patches, text = realistic(16, seed=3)
    method = build_method("trim")
    signals = VisionSignals(features=features, patch_embeds=patches, text_embeds=text)
    start = time.perf_counter()
    out = method(signals)
    assert time.perf_counter() - start < 2.0 and out.features.shape[0] == 16


def test_runs_on_the_tiny_model() -> None:
    """Through the real injection; skipped while the adapter does not fill the TRIM signals."""
    from tiny_pipeline import kept_on_tiny

    from recomp_eval.methods import BuiltMethod

    inner = build_method("trim", retention=0.25, variant="fixed")
    seen = {}

    def fn(signals: VisionSignals):
        seen["missing"] = [n for n in ("patch_embeds", "text_embeds")
                           if getattr(signals, n) is None]  # fmt: skip
        if seen["missing"]:
            raise LookupError("signal missing")
        return inner(signals)

    try:
        kept, n = kept_on_tiny(BuiltMethod(name="trim", spec=inner.spec, fn=fn))
    except LookupError:
        pytest.skip(f"the adapter does not fill {seen['missing']} yet (signals.X is None)")
    assert kept == [budget_from_ratio(0.25, n)] * 2
