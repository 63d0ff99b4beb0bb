"""VisPruner against a loop port of the released selection (Theia-4869/VisPruner
``llava_arch.py`` L140-186), written here with Python lists: per sample, per round, each A token's
best cosine to side B, a stable sort, the survivors then side B."""

from __future__ import annotations

import pytest
import torch

from recomp_eval.methods import build_method
from recomp_eval.methods.base import Role, VisionSignals, budget_from_ratio

N, C = 576, 1024


def realistic(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B,N,C] clustered around centres; peaky CLS attention [B,N] summing to < 1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, 30, C, generator=g)
    which = torch.randint(0, 30, (batch, N), generator=g)
    features = centres.gather(1, which[..., None].expand(-1, -1, C))
    features = features + 0.7 * torch.randn(batch, N, C, generator=g)
    logits = torch.randn(batch, N, generator=g) * 2.5
    attn = torch.softmax(logits, dim=1) * 0.6
    return features, attn


def loop_vispruner(x: torch.Tensor, a: torch.Tensor, t: int, ratio: float, step: int = 8):
    """The released algorithm for one sample (x [N,C], a [N]) -> (sorted kept, important)."""
    unit = x / x.norm(dim=-1, keepdim=True)
    values = a.tolist()
    order = sorted(range(len(values)), key=lambda i: -values[i])  # stable: lower index first
    t_imp = int(t * ratio)
    important, residual = order[:t_imp], order[t_imp:]
    while len(residual) > t - t_imp:
        r = min(step, len(residual) - (t - t_imp))
        side_a, side_b = residual[::2], residual[1::2]
        cos = (unit[side_a] @ unit[side_b].T).tolist()
        best = [max(row) for row in cos]
        ranked = sorted(range(len(side_a)), key=lambda i: -best[i])
        residual = [side_a[i] for i in ranked[r:]] + side_b
    return sorted(important + residual), set(important)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("tokens", "ratio"), [(64, 0.5), (128, 0.5), (64, 0.75), (192, 0.25)])
def test_official_matches_the_loop_port(dtype: torch.dtype, tokens: int, ratio: float) -> None:
    features, attn = realistic(3, seed=tokens)
    features, attn = features.to(dtype), attn.to(dtype)
    method = build_method("vispruner", retention=tokens / N, important_ratio=ratio,
                          variant="official")  # fmt: skip
    out = method(VisionSignals(features=features, cls_attn=attn))
    assert out.features.shape == (3, tokens, C)
    for b in range(3):
        kept, important = loop_vispruner(features[b], attn[b], tokens, ratio)
        got = out.source[b].tolist()
        assert got == kept, (b, dtype)
        roles = {s: int(r) for s, r in zip(got, out.role[b].tolist())}
        assert {s for s, r in roles.items() if r == Role.ATTENTION} == important
        assert torch.equal(out.features[b], features[b, kept])
        alone = method(VisionSignals(features=features[b : b + 1], cls_attn=attn[b : b + 1]))
        assert alone.source[0].tolist() == got  # batch = per sample
        fixed = build_method("vispruner", retention=tokens / N, important_ratio=ratio)
        assert fixed(VisionSignals(features=features, cls_attn=attn)).source[b].tolist() == got


def test_odd_residual_is_the_release_crash_in_official_and_handled_in_fixed() -> None:
    features, attn = realistic(2, seed=9)
    signals = VisionSignals(features=features, cls_attn=attn)
    with pytest.raises(ValueError) as err:  # T = 64, T_imp = 51: 525 residual tokens, odd
        build_method("vispruner", retention=64 / N, important_ratio=0.8, variant="official")(
            signals
        )
    assert "odd" in str(err.value) and "variant=fixed" in str(err.value)
    assert "\n" not in str(err.value)
    for retention, ratio in ((64 / N, 0.8), (100 / N, 0.25), (0.1, 0.5)):
        out = build_method("vispruner", retention=retention, important_ratio=ratio,
                           variant="fixed")(signals)  # fmt: skip
        t = budget_from_ratio(retention, N)
        assert out.features.shape[1] == t
        assert all(len(set(row.tolist())) == t for row in out.source)
        for b in range(2):
            assert out.source[b].tolist() == loop_vispruner(features[b], attn[b], t, ratio)[0]


@pytest.mark.parametrize(
    ("options", "needle"),
    [({"variant": "paper"}, "variant"), ({"important_ratio": 1.5}, "important_ratio"),
     ({"step": 0}, "step"), ({"k": 1}, "k")],
)  # fmt: skip
def test_bad_options_are_one_line(options: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        build_method("vispruner", **options)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_runs_on_the_tiny_model() -> None:
    from tiny_pipeline import kept_on_tiny

    kept, n = kept_on_tiny(build_method("vispruner", retention=0.25, variant="fixed"))
    assert kept == [budget_from_ratio(0.25, n)] * 2
