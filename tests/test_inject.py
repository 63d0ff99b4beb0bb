"""Two-phase injection on the tiny LLaVA: parity with plain HF, batching, restoration, methods."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from recomp_eval.inject.context import compress
from recomp_eval.methods import METHODS, BuiltMethod, SignalSpec, build_method
from recomp_eval.methods.base import Role, selection_output
from recomp_eval.models.llava.adapter import expand_image_tokens
from recomp_eval.models.llava.tiny import load_tiny
from recomp_eval.pipeline import generate, prepare_batch

QUESTIONS = ["What is in the image?", "How many people are there?", "Is there a dog?", "yes or no"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def bundle():
    return load_tiny()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    sizes = [(70, 112), (112, 90), (112, 112), (50, 130)]  # (H, W): non-square on purpose
    return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in sizes]


def _seeded_topk(signals):
    """Test method: keep the top-k_i patches by CLS attention, k_i derived from the sample seed."""
    n = signals.num_patches
    k = 1 + signals.seeds % n  # [B]
    order = signals.cls_attn.argsort(dim=-1, descending=True)  # [B,N]
    kmax = int(k.max())
    top = order[:, :kmax]  # [B,Kmax]
    beyond = torch.arange(kmax)[None, :] >= k[:, None]  # [B,Kmax] ranks past k_i
    index = torch.where(beyond, torch.full_like(top, n), top).sort(dim=-1).values  # [B,Kmax]
    return selection_output(signals.features, index, Role.ATTENTION, lengths=k)


SEEDED = BuiltMethod(
    name="seeded_topk",
    spec=SignalSpec(cls_attn="mean_heads", cls_attn_layer=-2, needs_seeds=True),
    fn=_seeded_topk,
)


def test_none_matches_plain_hf_generate(bundle, images):
    texts = QUESTIONS[:3]
    res = generate(
        bundle,
        build_method("none"),
        images[:3],
        texts,
        texts,
        "llava15",
        ["a", "b", "c"],
        MAX_NEW,
        output_logits=True,
        return_dict_in_generate=True,
    )
    batch = prepare_batch(bundle, images[:3], texts, "llava15")
    bundle.processor.tokenizer.padding_side = "left"
    n = bundle.model.config.image_seq_length
    ids, mask = expand_image_tokens(
        batch.prompt_ids, [n] * 3, bundle.image_token_id, bundle.tokenizer.pad_token_id
    )
    # The processor's own <image> expansion (string level) gives the same ids.
    proc = bundle.processor(
        text=batch.prompts, images=images[:3], return_tensors="pt", padding=True
    )
    assert torch.equal(proc["input_ids"], ids) and torch.equal(proc["attention_mask"], mask)
    ref = bundle.model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=batch.pixel_values,
        do_sample=False,
        max_new_tokens=MAX_NEW,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ref_new = ref.sequences[:, ids.shape[1] :]
    for i, r in enumerate(res):
        assert r.new_token_ids == ref_new[i].tolist()
        ref_logits = torch.stack([x[i] for x in ref.logits])
        torch.testing.assert_close(r.logits, ref_logits, atol=1e-5, rtol=0)
        assert r.kept_tokens == n


def test_batch_mixed_counts_equals_one_by_one(bundle, images):
    ids = ["s0", "s1", "s2", "s3"]
    seen = []
    hook = bundle.model.model.register_forward_pre_hook(
        lambda _m, _a, kw: (
            seen.append(kw["input_ids"].clone()) if kw.get("mm_encoder_outputs") else None
        ),
        with_kwargs=True,
    )
    try:
        batched = generate(
            bundle,
            SEEDED,
            images,
            QUESTIONS,
            QUESTIONS,
            "llava15",
            ids,
            MAX_NEW,
            output_logits=True,
            return_dict_in_generate=True,
        )
    finally:
        hook.remove()
    kept = [r.kept_tokens for r in batched]
    assert len(set(kept)) > 1, "the test needs different kept counts"
    counts = (seen[0] == bundle.image_token_id).sum(dim=1).tolist()
    assert counts == [int(k) for k in kept]  # the LLM received exactly lengths[i] image tokens
    for i in range(4):
        (single,) = generate(
            bundle,
            SEEDED,
            images[i : i + 1],
            QUESTIONS[i : i + 1],
            QUESTIONS[i : i + 1],
            "llava15",
            ids[i : i + 1],
            MAX_NEW,
            output_logits=True,
            return_dict_in_generate=True,
        )
        assert single.kept_tokens == batched[i].kept_tokens
        assert (
            single.new_token_ids[: len(batched[i].new_token_ids)]
            == batched[i].new_token_ids[: len(single.new_token_ids)]
        )
        steps = min(len(single.logits), len(batched[i].logits))
        torch.testing.assert_close(
            batched[i].logits[:steps], single.logits[:steps], atol=1e-4, rtol=1e-4
        )


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_context_restores_model(bundle, images):
    model = bundle.model
    batch = prepare_batch(bundle, images[:1], QUESTIONS[:1], "llava15")
    n = model.config.image_seq_length
    ids, mask = expand_image_tokens(
        batch.prompt_ids, [n], bundle.image_token_id, bundle.tokenizer.pad_token_id
    )

    def logits():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, pixel_values=batch.pixel_values).logits

    before, hooks, impl = (
        logits(),
        _hook_count(model),
        model.config.text_config._attn_implementation,
    )
    method = build_method("none")
    method.spec = SignalSpec(cls_attn="concat_heads", keys="full", keys_layer=-2)
    with compress(model, method) as probe:
        assert _hook_count(model) > hooks
        logits()
        assert probe.vision.calls  # hooks fired
    assert _hook_count(model) == hooks
    with pytest.raises(RuntimeError, match="boom"), compress(model, method):
        raise RuntimeError("boom")
    assert _hook_count(model) == hooks
    assert model.config.text_config._attn_implementation == impl
    assert torch.equal(logits(), before)


def _available(name: str) -> bool:
    try:
        importlib.import_module(f"recomp_eval.methods.{METHODS[name]}")
    except ModuleNotFoundError:
        return False
    return True


def _build_any(name: str, **kwargs) -> BuiltMethod:
    try:
        return build_method(name, **kwargs)
    except (TypeError, ValueError):
        return build_method(name, retention=0.25, **kwargs)


FITTED = {"pdrop": {"layer_list": [1, 2], "ratios": [0.5, 0.25]}}  # the tiny LLM has 3 layers
CASES = [(name, FITTED.get(name, {})) for name in sorted(METHODS)] + [
    ("recomp", {"variant": "official"})
]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=lambda c: str(c))
def test_every_method_end_to_end(bundle, images, name, kwargs):
    if not _available(name):
        pytest.skip(f"recomp_eval.methods.{METHODS[name]} is not in the tree yet")
    method = _build_any(name, **kwargs)
    res = generate(
        bundle, method, images[:2], QUESTIONS[:2], QUESTIONS[:2], "lmms_eval", ["a", "b"], 3
    )
    n = bundle.model.config.image_seq_length
    for r in res:
        assert 0 < r.kept_tokens <= n
        assert len(r.new_token_ids) > 0
        assert set(r.timings) >= {"vision", "text", "compression", "prefill", "decode"}
        if method.llm is None:
            assert r.kept_tokens == r.compressed.lengths.item()


def test_fastv_mask_and_prune_agree(bundle, images):
    pytest.importorskip("recomp_eval.inject.llm_attention")
    if not _available("fastv"):
        pytest.skip("fastv method not in the tree yet")
    out = {}
    for variant in ("mask", "prune"):
        method = build_method("fastv", k_layer=1, ratio=0.5, variant=variant)
        out[variant] = generate(
            bundle,
            method,
            images[:2],
            QUESTIONS[:2],
            QUESTIONS[:2],
            "llava15",
            ["a", "b"],
            MAX_NEW,
            output_logits=True,
            return_dict_in_generate=True,
        )
    n = bundle.model.config.image_seq_length
    for m, p in zip(out["mask"], out["prune"]):
        assert m.new_token_ids == p.new_token_ids
        torch.testing.assert_close(m.logits, p.logits, atol=1e-4, rtol=1e-4)
        assert m.kept_tokens == p.kept_tokens < n
