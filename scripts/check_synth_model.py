"""Quality gates of the shipped ``synth-llava`` model, run through the harness pipeline.

Held-out SynthVQA scenes (seed 1_000_003), all 576 visual tokens (method ``none``):

- attribute questions (families ``colour`` and ``shape`` of ``questions_for_scene``): accuracy
  >= 0.80 overall; small and large objects reported separately;
- POPE-style existence questions (``yes_no_questions``, random/popular/adversarial in turn, exactly
  balanced): F1 >= 0.80, with accuracy and the yes-ratio next to it (always-"yes" scores F1 0.67).

Usage::

    python scripts/check_synth_model.py --model models/synth-llava --out results/synth_gates.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from recomp_eval.benchmarks.prompts import render_prompt as user_text
from recomp_eval.synth import questions as Q
from recomp_eval.synth.scenes import make_scene

HELDOUT_SEED = 1_000_003
ATTRIBUTE_GATE = 0.80
POPE_F1_GATE = 0.80
STRATEGIES = ("random", "popular", "adversarial")


def gate_questions(n_attr: int, n_pope: int, seed: int = HELDOUT_SEED):
    """Fixed lists of (scene, question, kind) for the attribute and POPE gates."""
    attr, pope, index = [], [], 0
    while len(attr) < n_attr or len(pope) < n_pope:
        scene = make_scene(seed, index)
        rng = np.random.default_rng([seed, index])
        if len(attr) < n_attr:
            qs = [q for q in Q.questions_for_scene(scene, rng) if q.family in ("colour", "shape")]
            for size in ("small", "large"):  # one per object size and scene, picked at random
                pick = [q for q in qs if q.size == size]
                if pick:
                    attr.append((scene, pick[int(rng.integers(len(pick)))]))
        if len(pope) < n_pope:
            strategy = STRATEGIES[index % len(STRATEGIES)]
            pope += [(scene, q) for q in Q.yes_no_questions(scene, rng, strategy, 2)]
        index += 1
    return attr[:n_attr], pope[: n_pope - n_pope % 2]


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def answer(bundle, method, items, benchmark: str, protocol: str, batch: int = 8) -> list[str]:
    from recomp_eval.pipeline import generate

    out = []
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        res = generate(
            bundle,
            method,
            images=[s.image for s, _ in chunk],
            user_texts=[user_text(benchmark, q.question, protocol) for _, q in chunk],
            questions=[q.question for _, q in chunk],
            protocol=protocol,
            sample_ids=[f"{s.scene_id}-{j}" for j, (s, _) in enumerate(chunk, start=i)],
            max_new_tokens=4,
        )
        out += [normalise(r.text) for r in res]
    return out


def attribute_metrics(items, preds) -> dict:
    ok = np.array([p == q.answer for (_, q), p in zip(items, preds, strict=True)])
    size = np.array([q.size for _, q in items])
    fam = np.array([q.family for _, q in items])
    m = {"n": len(ok), "accuracy": float(ok.mean())}
    for key, arr in (("size", size), ("family", fam)):
        for v in sorted(set(arr)):
            m[f"accuracy_{key}_{v}"] = float(ok[arr == v].mean())
            m[f"n_{key}_{v}"] = int((arr == v).sum())
    return m


def pope_metrics(items, preds) -> dict:
    truth = np.array([q.answer == "yes" for _, q in items])
    said = np.array([p.startswith("yes") for p in preds])
    tp = float((truth & said).sum())
    precision = tp / max(1.0, said.sum())
    recall = tp / max(1.0, truth.sum())
    f1 = 2 * precision * recall / max(1e-9, precision + recall)
    return {
        "n": len(truth),
        "f1": f1,
        "accuracy": float((truth == said).mean()),
        "precision": precision,
        "recall": recall,
        "yes_ratio": float(said.mean()),
        "true_yes_ratio": float(truth.mean()),
        "unparsed": int(sum(p not in ("yes", "no") for p in preds)),
    }


def run_gates(model: str, n_attr: int, n_pope: int, protocol: str = "llava15") -> dict:
    from recomp_eval.methods import build_method
    from recomp_eval.models.llava.loader import load_llava

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bundle = load_llava(model, dtype="float32")
    method = build_method("none")
    attr, pope = gate_questions(n_attr, n_pope)
    t0 = time.time()
    a = attribute_metrics(attr, answer(bundle, method, attr, "gqa", protocol))
    p = pope_metrics(pope, answer(bundle, method, pope, "pope", protocol))
    result = {
        "model": model,
        "protocol": protocol,
        "heldout_seed": HELDOUT_SEED,
        "attribute": a,
        "pope": p,
        "gates": {
            "attribute_accuracy>=0.80": bool(a["accuracy"] >= ATTRIBUTE_GATE),
            "pope_f1>=0.80": bool(p["f1"] >= POPE_F1_GATE),
        },
        "seconds": round(time.time() - t0, 1),
    }
    result["passed"] = all(result["gates"].values())
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/synth-llava")
    ap.add_argument("--attr", type=int, default=400, help="attribute questions")
    ap.add_argument("--pope", type=int, default=400, help="POPE questions (balanced)")
    ap.add_argument("--protocol", default="llava15", choices=["llava15", "lmms_eval"])
    ap.add_argument("--out", default="results/synth_gates.json")
    args = ap.parse_args(argv)
    result = run_gates(args.model, args.attr, args.pope, args.protocol)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
