"""CDPruner against a loop port of the released selection (Theia-4869/CDPruner ``llava_arch.py``
L140-186), written here: one sample at a time, relevance as a Python list, the greedy MAP with
each Cholesky entry accumulated term by term and the argmax found by a Python scan.

Inputs: N = 576 patches, C = 1024 tower channels, projected width E = 1024, CLIP joint width
D = 768; tokens cluster around a few dozen centres, and a handful of "object" patches align with
the text direction (as real patch embeddings do).
"""

from __future__ import annotations

import math

import pytest
import torch

from recomp_eval.methods import build_method
from recomp_eval.methods.base import VisionSignals, budget_from_ratio

N, C, E, D = 576, 1024, 1024, 768


def realistic(batch: int, segments: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """features [B,N,C], projected [B,N,E], patch_embeds [B,N,D] fp32, text_embeds [B,M,D]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, 40, E, generator=g) * 2
    which = torch.randint(0, 40, (batch, N), generator=g)
    projected = centres.gather(1, which[..., None].expand(-1, -1, E))  # [B,N,E]
    projected = projected + 0.8 * torch.randn(batch, N, E, generator=g)
    text = torch.randn(batch, segments, D, generator=g)  # [B,M,D]
    patch = torch.randn(batch, N, D, generator=g)  # [B,N,D]
    objects = torch.randint(0, N, (batch, 12), generator=g)  # a few text-aligned patches
    for b in range(batch):
        patch[b, objects[b]] += 3 * text[b, 0]
    return {
        "features": torch.randn(batch, N, C, generator=g),
        "projected": projected,
        "patch_embeds": patch,
        "text_embeds": text,
    }


def loop_relevance(p: torch.Tensor, t: torch.Tensor, low=None, high=None) -> list[float]:
    """-cos averaged over segments, min-max scaled as released (per sample unless given)."""
    p = (p / p.norm(dim=-1, keepdim=True)).tolist()
    t = (t / t.norm(dim=-1, keepdim=True)).float().tolist()
    raw = []
    for row in p:
        sims = [sum(a * b for a, b in zip(row, seg)) for seg in t]
        raw.append(-sum(sims) / len(sims))
    low = min(raw) if low is None else low
    high = max(raw) if high is None else high
    return [(r - low + 1e-6) / (high - low) for r in raw]


def loop_cdpruner(z: torch.Tensor, rel: list[float], t: int) -> list[int]:
    """The released greedy MAP for one sample: z [N,E] projected tokens (their dtype)."""
    unit = (z / z.norm(dim=-1, keepdim=True)).float()
    sim = (unit @ unit.T).double()  # the fp32 similarities, accumulated in double below
    r = torch.tensor(rel, dtype=torch.float64)
    kernel = r[:, None] * sim * r[None, :]  # [N,N]
    n = kernel.shape[0]
    gains = [float(kernel[i, i]) for i in range(n)]
    rows: list[torch.Tensor] = []
    picks: list[int] = []
    for _ in range(t):
        j = 0
        for i in range(1, n):  # first index among equal maxima
            if gains[i] > gains[j]:
                j = i
        picks.append(j)
        acc = kernel[j].clone()
        for c in rows:  # one Cholesky row at a time
            acc -= c[j] * c
        e = acc / math.sqrt(gains[j])
        rows.append(e)
        gains = [g - v * v for g, v in zip(gains, e.tolist())]
        gains[j] = -math.inf
    return sorted(picks)


def signals_of(x: dict[str, torch.Tensor], dtype: torch.dtype, mask=None) -> VisionSignals:
    return VisionSignals(
        features=x["features"].to(dtype),
        projected=x["projected"].to(dtype),
        patch_embeds=x["patch_embeds"],
        text_embeds=x["text_embeds"].to(dtype),
        text_mask=mask,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [64, 128])
def test_official_matches_the_loop_port_per_sample(dtype: torch.dtype, tokens: int) -> None:
    x = realistic(2, segments=2, seed=tokens)
    out = build_method("cdpruner", retention=tokens / N)(signals_of(x, dtype))
    for b in range(2):
        rel = loop_relevance(x["patch_embeds"][b], x["text_embeds"][b].to(dtype))
        expected = loop_cdpruner(x["projected"][b].to(dtype), rel, tokens)
        got = out.source[b, : out.lengths[b]].tolist()
        assert got == expected
        torch.testing.assert_close(
            out.features[b], x["features"][b].to(dtype)[expected], atol=1e-5, rtol=0
        )
    assert out.lengths.tolist() == [tokens, tokens]


def test_relevance_and_kernel_match_the_loop_values() -> None:
    from recomp_eval.methods.cdpruner import relevance

    x = realistic(1, segments=3, seed=5)
    got = relevance(x["patch_embeds"], x["text_embeds"], torch.ones(1, 3, dtype=torch.bool), False)
    expected = torch.tensor(loop_relevance(x["patch_embeds"][0], x["text_embeds"][0]))
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)
    assert got.min() > 0 and got.max() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("variant", ["official", "fixed"])
def test_batch_equals_each_sample_alone(variant: str) -> None:
    x = realistic(3, seed=7)
    method = build_method("cdpruner", retention=0.1, variant=variant)
    batch = method(signals_of(x, torch.float32))
    for b in range(3):
        alone = method(signals_of({k: v[b : b + 1] for k, v in x.items()}, torch.float32))
        assert batch.source[b].tolist() == alone.source[0].tolist()
        torch.testing.assert_close(batch.features[b], alone.features[0], atol=0, rtol=0)


def test_batch_global_norm_reproduces_the_released_batch_line() -> None:
    x = realistic(2, seed=11)
    out = build_method("cdpruner", retention=64 / N, batch_global_norm=True)(
        signals_of(x, torch.float32)
    )
    raw = [loop_relevance(x["patch_embeds"][b], x["text_embeds"][b], 0.0, 1.0) for b in range(2)]
    # the loop relevance at (low, high) = (0, 1) is raw + 1e-6: undo it, then scale batch-wide
    raw = [[r - 1e-6 for r in row] for row in raw]
    low = min(min(row) for row in raw)
    high = max(max(row) for row in raw)
    for b in range(2):
        rel = [(r - low + 1e-6) / (high - low) for r in raw[b]]
        assert out.source[b].tolist() == loop_cdpruner(x["projected"][b], rel, 64)
    from recomp_eval.methods.cdpruner import relevance

    args = (x["patch_embeds"], x["text_embeds"], torch.ones(2, 1, dtype=torch.bool))
    assert not torch.allclose(relevance(*args, True), relevance(*args, False))  # B > 1 differs


def test_segments_average_over_a_samples_own_segments_only() -> None:
    x = realistic(2, segments=2, seed=13)
    mask = torch.tensor([[True, True], [True, False]])
    method = build_method("cdpruner", retention=0.1)
    out = method(signals_of(x, torch.float32, mask))
    one = {k: v[1:] for k, v in x.items()}
    one["text_embeds"] = x["text_embeds"][1:, :1]
    alone = method(signals_of(one, torch.float32))
    assert out.source[1].tolist() == alone.source[0].tolist()


@pytest.mark.parametrize("retention", [0.05, 0.1, 0.25, 0.5])
def test_exact_budget_unique_sources_in_raster_order(retention: float) -> None:
    x = realistic(2, seed=17)
    out = build_method("cdpruner", retention=retention, variant="fixed")(
        signals_of(x, torch.float32)
    )
    t = budget_from_ratio(retention, N)
    assert out.lengths.tolist() == [t, t]
    for b in range(2):
        src = out.source[b].tolist()
        assert src == sorted(set(src)) and len(src) == t


def test_fixed_variant_survives_duplicate_tokens() -> None:
    x = realistic(1, seed=19)
    x["projected"][:, 1:] = x["projected"][:, :1]  # every token the same: gains reach zero
    out = build_method("cdpruner", retention=0.1, variant="fixed")(signals_of(x, torch.float32))
    src = out.source[0].tolist()
    assert len(set(src)) == len(src) == budget_from_ratio(0.1, N)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"variant": "paper"}, "variant"),
        ({"batch_global_norm": "yes"}, "batch_global_norm"),
        ({"variant": "fixed", "batch_global_norm": True}, "official only"),
        ({"segment": True}, "unknown options"),
    ],
)
def test_bad_options_are_one_line(options: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as err:
        build_method("cdpruner", **options)
    assert "\n" not in str(err.value)


def test_missing_signals_are_named() -> None:
    x = realistic(1)
    with pytest.raises(ValueError, match="text_embeds"):
        build_method("cdpruner")(VisionSignals(features=x["features"], projected=x["projected"],
                                               patch_embeds=x["patch_embeds"]))  # fmt: skip


def test_runs_on_the_tiny_model_with_its_text_and_projector_signals() -> None:
    from tiny_pipeline import kept_on_tiny

    kept, n = kept_on_tiny(build_method("cdpruner", retention=0.25))
    assert kept == [budget_from_ratio(0.25, n)] * 2
