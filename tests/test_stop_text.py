"""Stop strings by decoding: the same text as generating on and cutting, on any tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recomp_eval.benchmarks.fixtures import sample_images
from recomp_eval.evaluate import load_model
from recomp_eval.methods import build_method
from recomp_eval.pipeline import generate
from recomp_eval.stop_text import StopOnText, cut_at_stop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle():
    return load_model({"id": "tiny", "dtype": "float32", "device": "cpu"})


def test_cut_at_stop() -> None:
    assert cut_at_stop("yes\n\nno", ["\n\n"]) == "yes"
    assert cut_at_stop("a ASSISTANT: b", ["ASSISTANT:", "b"]) == "a "
    assert cut_at_stop("plain", ["", "zz"]) == "plain"


def test_stopping_equals_generating_on_and_cutting(bundle) -> None:
    images = sample_images()[:3]
    texts = ["What is it?", "Describe the image.", "Is there a cat?"]
    method = build_method("none")
    args = (bundle, method, images, texts, texts, "llava15", ["a", "b", "c"])
    free = generate(*args, max_new_tokens=24)
    assert all(len(r.new_token_ids) > 6 for r in free)
    # a stop string from the middle of each free-running answer (some are cut, all agree)
    stops = [free[0].text[3:7], free[1].text[5:8]]
    stops = [s for s in stops if s.strip()]
    assert stops
    stopped = generate(*args, max_new_tokens=24, stop=tuple(stops))
    for a, b in zip(free, stopped, strict=True):
        assert b.text == cut_at_stop(a.text, stops).strip()
        assert len(b.new_token_ids) <= len(a.new_token_ids)
    assert any(len(b.new_token_ids) < len(a.new_token_ids) for a, b in zip(free, stopped))


def test_works_on_the_demo_tokenizer() -> None:
    """transformers' ``stop_strings`` crashes on this vocabulary ("substring not found")."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "synth-llava")
    ids = tok("a red circle", add_special_tokens=False)["input_ids"]
    prompt = [tok.bos_token_id or 0] * 3
    batch = torch.tensor([prompt + ids, prompt + ids[:1] + ids[:1] * (len(ids) - 1)])
    stopper = StopOnText(tok, ["circle", "\n\n"], prompt_length=len(prompt))
    done = stopper(batch, torch.zeros(2, 4))
    assert done.tolist() == [True, False]
    assert StopOnText(tok, [], prompt_length=3)(batch, torch.zeros(2, 4)).tolist() == [False, False]
