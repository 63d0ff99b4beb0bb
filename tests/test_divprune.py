"""DivPrune against a loop port of the released selection (vbdi/divprune ``llava_arch.py``
L146-171), written here: per sample, the min distance to the selected set recomputed from scratch
every step, ties broken by a Python scan. Inputs: N = 576 patches, D = 1024 projected channels,
tokens drawn around a few dozen centres (as real patch features cluster) plus noise.
"""

from __future__ import annotations

import pytest
import torch

from recomp_eval.methods import build_method
from recomp_eval.methods.base import VisionSignals, budget_from_ratio
from recomp_eval.methods.divprune import DivPruneConfig, budget

N, C, D = 576, 64, 1024


def realistic(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B,N,C] and projected [B,N,D]: clustered tokens with noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, 40, D, generator=g) * 2
    which = torch.randint(0, 40, (batch, N), generator=g)
    projected = centres.gather(1, which[..., None].expand(-1, -1, D))
    projected = projected + 0.8 * torch.randn(batch, N, D, generator=g)
    features = torch.randn(batch, N, C, generator=g)
    return features, projected


def loop_divprune(z: torch.Tensor, t: int) -> list[int]:
    """The released algorithm for one sample z [N,D], in its dtype, step by step."""
    unit = z / z.norm(dim=-1, keepdim=True)
    dist = (1 - unit @ unit.T).float().tolist()  # the values the released code compares
    n = len(dist)
    second = []
    for j in range(n):
        column = sorted(dist[i][j] for i in range(n))
        second.append(column[1])
    selected = [max(range(n), key=lambda j: second[j])]  # first index among equal maxima
    while len(selected) < t:
        nearest = [min(dist[s][j] for s in selected) for j in range(n)]
        selected.append(max(range(n), key=lambda j: nearest[j]))
    return sorted(selected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("retention", [0.098, 64 / 576])
def test_official_matches_the_loop_port_per_sample(dtype: torch.dtype, retention: float) -> None:
    features, projected = realistic(3, seed=int(retention * 1000))
    projected = projected.to(dtype)
    method = build_method("divprune", retention=retention, variant="official")
    out = method(VisionSignals(features=features, projected=projected))
    t = round(retention * N)
    assert out.features.shape == (3, t, C)
    for b in range(3):
        expected = loop_divprune(projected[b], t)
        got = out.source[b].tolist()
        assert got == expected, (b, dtype)
        assert len(set(got)) == t and got == sorted(got)  # unique, raster order
        assert torch.equal(out.features[b], features[b, expected])
        alone = method(VisionSignals(features=features[b : b + 1], projected=projected[b : b + 1]))
        assert alone.source[0].tolist() == got  # batch = per sample


def test_budgets_official_rounding_and_fixed_exact_counts() -> None:
    assert budget(DivPruneConfig(), N) == 56  # the released 0.098 gives 56, not 64
    half = 28.5 / N  # an exact .5 product: Python's round goes to even, ours half up
    assert budget(DivPruneConfig(retention=half), N) == 28
    assert budget(DivPruneConfig(retention=half, variant="fixed"), N) == 29
    features, projected = realistic(2, seed=5)
    for retention in (0.05, 0.1, 0.25, 0.5):
        out = build_method("divprune", retention=retention, variant="fixed")(
            VisionSignals(features=features, projected=projected)
        )
        t = budget_from_ratio(retention, N)
        assert out.features.shape[1] == t and out.stats["n_tokens"].tolist() == [t, t]
        assert all(len(set(row.tolist())) == t for row in out.source)


def test_fixed_variant_picks_unique_tokens_even_among_duplicates() -> None:
    features, projected = realistic(1, seed=3)
    projected[:, 100:] = projected[:, :1]  # 476 copies of one token
    out = build_method("divprune", retention=0.5, variant="fixed")(
        VisionSignals(features=features, projected=projected)
    )
    assert len(set(out.source[0].tolist())) == out.source.shape[1] == 288


def test_first_sample_for_batch_reproduces_the_released_batch_quirk() -> None:
    features, projected = realistic(3, seed=7)
    out = build_method("divprune", retention=0.1, first_sample_for_batch=True)(
        VisionSignals(features=features, projected=projected)
    )
    first = loop_divprune(projected[0], round(0.1 * N))
    assert all(row.tolist() == first for row in out.source)
    assert torch.equal(out.features[2], features[2, first])  # sample 0's indices, own features


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"variant": "paper"}, "variant='paper'"),
        ({"variant": "fixed", "first_sample_for_batch": True}, "official only"),
        ({"first_sample_for_batch": "yes"}, "true or false"),
        ({"k": 3}, "k"),
    ],
)
def test_bad_options_are_one_line(options: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        build_method("divprune", **options)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_projected_signal_is_named() -> None:
    features, _ = realistic(1)
    with pytest.raises(ValueError) as err:
        build_method("divprune")(VisionSignals(features=features))
    assert "projected" in str(err.value)


def test_runs_on_the_tiny_model_with_the_projector_signal() -> None:
    """Through the real injection: the adapter captures projector(features) for it."""
    from tiny_pipeline import kept_on_tiny

    kept, n = kept_on_tiny(build_method("divprune", retention=0.25, variant="fixed"))
    assert kept == [budget_from_ratio(0.25, n)] * 2
