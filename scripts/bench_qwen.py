"""Qwen2.5-VL costs: the score block's recompute against the tower, prefill at 10 % of the
merged tokens, and grouping by grid against one method call per image.

Random weights at Qwen2.5-VL-7B's shapes, read from
``tests/data/checkpoints/qwen2.5-vl-7b-instruct/config.json`` (tower: 32 blocks, width 1280,
16 heads, window 112 px, full attention at blocks [7, 15, 23, 31], merger to 3584; LLM: width
3584, 28 heads, 4 KV heads, FFN 18944). On CPU the depths are cut (default: the tower's first
8 blocks, i.e. 7 window blocks and full-attention block 7, one of the real tower's four identical
8-block segments; 2 decoder layers); the vocabulary is cut to 1,024 rows with the special ids
moved inside it (prefill runs on ``input_ids``, and the LM head sees one position per sample).
Image grids come from the 7B checkpoint's own image processor settings
(``preprocessor_config.json``). Measurement: :mod:`recomp_eval.efficiency.benchmark` (cases
interleaved in a shuffled order per round, warm-up rounds, medians, a repeated case as sanity
check).

1. ``tower``: per image size, the plain packed tower pass (``tower_pass(..., block=None)``)
   against the pass that also recomputes the score block's keys and received attention
   (``block`` = the last full-attention block), and the plain pass again under a second label
   (the sanity check; that second label also times every block through forward hooks)
   so that the full-depth share of the recompute is derived from measured per-block times.
2. ``prefill``: ``Qwen2_5_VLForConditionalGeneration`` forward of text + N merged tokens
   against text + ``budget_from_ratio(0.1, N)`` (and that case again: the sanity check), as the
   harness's prefill runs it: ``input_ids`` with the image placeholders, the features as
   ``mm_encoder_outputs``, M-RoPE ``position_ids`` [4,B,L] (the kept tokens at their source
   tokens' positions of the unpruned sequence, from stock ``get_rope_index``),
   ``logits_to_keep=1``; B in ``--batch-sizes``. Measured speed-up against the analytic
   :func:`~recomp_eval.efficiency.flops.prefill_flops` ratio of the text config's shape.
3. ``grouping``: a batch of 8 images on 4 grids; the adapter step (``QwenAdapter.signals``,
   ``apply``, ``project`` on one ``QwenTowerPass``) for ``divprune`` and ``prumerge`` at
   retention 0.1, grouped by grid (what the adapter does) against one call per image. The
   tower pass is synthetic (random merged tokens, keys and a softmax-shaped received
   attention at the real widths): both methods' work at a fixed budget does not depend on
   the values. A different N per sample in one call is not an option: ``VisionSignals`` holds
   one N per call (``features`` [B,N,C]) and no method takes a padding mask.

    python scripts/bench_qwen.py                      # CPU, about 10 minutes on 2 cores
    python scripts/bench_qwen.py --device cuda        # full depth, bf16, adds 1036 x 1036
    python scripts/bench_qwen.py --smoke              # the tiny checkpoint's shapes (tests)

Writes ``results/bench/qwen_<device>.json`` (raw timings, settings, machine) and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from recomp_eval.efficiency.benchmark import (
    REPO,
    agreement,
    machine_info,
    markdown_table,
    pin_threads,
    quiet_reps,
    summarize,
    sync,
    time_interleaved,
    write_results,
)
from recomp_eval.efficiency.flops import DecoderShape, prefill_flops
from recomp_eval.methods.base import budget_from_ratio

REAL_DIR = REPO / "tests" / "data" / "checkpoints" / "qwen2.5-vl-7b-instruct"
SCRIPT = "scripts/bench_qwen.py"
VOCAB = 1024  # cut vocabulary (real 152,064): prefill keeps one LM-head row per sample
RETENTION = 0.1
TEXT_BEFORE, TEXT_AFTER = 15, 25  # system turn + "<|vision_start|>"; question + assistant turn
# (W, H) in pixels: the images each part runs on
TOWER_SIZES = {"cpu": [(448, 448), (644, 476)], "cuda": [(448, 448), (644, 476), (1036, 1036)]}
MIX_SIZES = [(448, 448), (644, 476), (448, 448), (504, 336), (560, 420), (644, 476), (448, 448),
             (504, 336)]  # fmt: skip
SMOKE_TOWER_SIZES = [(112, 112), (168, 112)]
SMOKE_MIX_SIZES = [(112, 112), (168, 112), (112, 112), (224, 168), (196, 140), (168, 112),
                   (112, 112), (224, 168)]  # fmt: skip
METHODS = ("divprune", "prumerge")


# --- configs and model ---------------------------------------------------------------------


def real_config_dict() -> dict[str, Any]:
    return json.loads((REAL_DIR / "config.json").read_text())


def smoke_config_dict() -> dict[str, Any]:
    from recomp_eval.models.qwen2_5_vl.tiny import TinyQwenSpec, config_dict

    return config_dict(TinyQwenSpec())


def cut_config(raw: dict[str, Any], vision_depth: int, text_layers: int,
               vocab: int | None) -> dict[str, Any]:  # fmt: skip
    """``raw`` (a flat ``config.json``) with the tower's first ``vision_depth`` blocks (their
    full-attention indexes kept), ``text_layers`` decoder layers and, with ``vocab``, a cut
    vocabulary with the special ids moved to its end."""
    d = copy.deepcopy(raw)
    vc = d["vision_config"]
    full = [i for i in vc["fullatt_block_indexes"] if i < vision_depth]
    if not full:
        raise ValueError(
            f"--vision-depth {vision_depth} holds no full-attention block (the first is "
            f"{vc['fullatt_block_indexes'][0]}): the score block would not exist"
        )
    vc["depth"], vc["fullatt_block_indexes"] = vision_depth, full
    d["num_hidden_layers"] = text_layers
    d["max_window_layers"] = min(int(d.get("max_window_layers", text_layers)), text_layers)
    if vocab is not None:
        keys = ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id",
                "vision_token_id", "image_token_id", "video_token_id")  # fmt: skip
        for i, key in enumerate(keys):
            d[key] = vocab - len(keys) + i
        d["vocab_size"] = vocab
    d["torch_dtype"] = "float32"
    return d


def build_model(config_dict: dict[str, Any], dtype: torch.dtype, device: str):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(**config_dict)
    config._attn_implementation = "sdpa"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    return model.eval()


def image_processor(smoke: bool):
    """The 7B checkpoint's image processor (pil backend); the tiny one's with ``smoke``."""
    from transformers import AutoImageProcessor

    if not smoke:
        return AutoImageProcessor.from_pretrained(str(REAL_DIR), backend="pil")
    from recomp_eval.models.qwen2_5_vl.tiny import TinyQwenSpec, preprocessor_config_dict

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "preprocessor_config.json"
        path.write_text(json.dumps(preprocessor_config_dict(TinyQwenSpec())))
        return AutoImageProcessor.from_pretrained(tmp, backend="pil")


def images_of(sizes: Sequence[tuple[int, int]], seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def preprocess(proc, images) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Packed pixels and grids from the processor, checked against the adapter's grids."""
    from recomp_eval.models.qwen2_5_vl.adapter import image_grids

    out = proc(images=images, return_tensors="pt")
    grids = [tuple(int(v) for v in g) for g in out["image_grid_thw"].tolist()]
    if grids != [tuple(g) for g in image_grids(proc, images)]:
        raise RuntimeError(f"processor grids {grids} differ from the adapter's")
    return out["pixel_values"], grids


def label(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def ms_stats(ms: Sequence[float]) -> dict[str, float]:
    return summarize(ms)


# --- 1. the score block's recompute against the tower --------------------------------------


class BlockTimer:
    """Per-block wall time of a tower pass through forward pre/post hooks (CUDA events on a
    GPU, read after the pass)."""

    def __init__(self, blocks: torch.nn.ModuleList, device: str):
        self.cuda = str(device).startswith("cuda")
        self.enabled = True
        self.marks: dict[int, list[Any]] = {}
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._mark(i, 0)))
            self.handles.append(block.register_forward_hook(self._mark(i, 1)))

    def _mark(self, i: int, at: int) -> Callable:
        def hook(*_args):
            if not self.enabled:
                return None
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
            else:
                ev = time.perf_counter()
            self.marks.setdefault(i, [None, None])[at] = ev
            return None

        return hook

    def read(self) -> list[float]:
        out = []
        for i in sorted(self.marks):
            start, end = self.marks[i]
            out.append(start.elapsed_time(end) if self.cuda else (end - start) * 1e3)
        self.marks = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def recompute_flops(vc, patches: int, merge: int = 4) -> int:
    """Analytic FLOPs of the score block's signals at a full-attention block: the qkv projection
    again (``3 P C^2``), the scores ``q k^T`` (``P^2 C``) and the key average; softmax and the
    sums are not counted."""
    c, p = int(vc.hidden_size), int(patches)
    return 2 * (3 * p * c * c + p * p * c) + p * c


def recompute_case(model, pv, grids, block: int) -> Callable[[], Any]:
    """The recompute alone, on the score block's attention input captured once: what
    ``tower_pass(..., block)`` adds after the tower (window index, :func:`block_signals`, back
    to the original order)."""
    from transformers.vision_utils import get_vision_window_index

    from recomp_eval.models.qwen2_5_vl.vision import block_signals

    visual, vc = model.model.visual, model.config.vision_config
    captured: dict[str, Any] = {}

    def grab(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["cu_seqlens"] = kwargs["cu_seqlens"]
        captured["rope"] = kwargs["position_embeddings"]

    attn = visual.blocks[block].attn
    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    grid_thw = torch.tensor([list(g) for g in grids], dtype=torch.int64, device=pv.device)
    try:
        with torch.inference_mode():
            visual(pv.to(visual.device, next(visual.parameters()).dtype), grid_thw=grid_thw)
    finally:
        handle.remove()

    def run():
        window_index, _ = get_vision_window_index(grid_thw.cpu(), vc.spatial_merge_size,
                                                  vc.window_size, vc.patch_size)  # fmt: skip
        keys, received = block_signals(attn, captured, vc.spatial_merge_size**2)
        reverse = torch.argsort(window_index.to(keys.device))
        _ = (keys[reverse], received[reverse])  # the gathers the pass does

    return run


def quiet_stats(timed: dict[str, Any], device: str) -> dict[str, list[float]]:
    """Per case the reps in which this process had its cores to itself (CPU only; on a GPU
    every rep)."""
    if str(device).startswith("cuda"):
        return dict(timed["ms"])
    return quiet_reps(timed, torch.get_num_threads())


def quiet_index(timed: dict[str, Any], key: str, device: str, frac: float = 0.9) -> list[int]:
    """The reps of ``key`` that :func:`quiet_reps` keeps, by index."""
    if str(device).startswith("cuda"):
        return list(range(len(timed["ms"][key])))
    threads = torch.get_num_threads()
    return [i for i, (w, c) in enumerate(zip(timed["ms"][key], timed["cpu_ms"][key]))
            if c >= frac * threads * w]  # fmt: skip


def quiet_median(quiet: dict[str, list[float]], key: str) -> float | None:
    return statistics.median(quiet[key]) if quiet.get(key) else None


def quiet_agreement(quiet, a: str, b: str, tolerance: float) -> dict[str, Any] | None:
    """:func:`agreement` on the quiet reps of two cases; None where either has none."""
    return agreement(quiet[a], quiet[b], tolerance) if quiet.get(a) and quiet.get(b) else None


def bench_tower(model, proc, sizes, args, device: str) -> dict[str, Any]:
    from recomp_eval.models.qwen2_5_vl.flops import tower_flops
    from recomp_eval.models.qwen2_5_vl.vision import resolve_block, tower_pass

    block = resolve_block(model, None)
    inputs = {}
    for size in sizes:
        pv, grids = preprocess(proc, images_of([size]))
        inputs[label(size)] = (pv.to(device), grids)
    timer = BlockTimer(model.model.visual.blocks, device)
    timer.enabled = False

    def case(lab: str, with_block: bool, timed_blocks: bool = False) -> Callable[[], Any]:
        pv, grids = inputs[lab]

        def run() -> list[float] | None:
            timer.enabled = timed_blocks
            try:
                tower_pass(model, pv, grids, block if with_block else None)
            finally:
                timer.enabled = False
            if timed_blocks:
                sync(device)
                return timer.read()
            return None

        return run

    cases = {}
    for lab in inputs:
        cases[f"{lab}/plain"] = case(lab, False)
        # the same pass, its blocks timed by hooks (two clock reads a block: microseconds)
        cases[f"{lab}/plain_repeat"] = case(lab, False, timed_blocks=True)
        cases[f"{lab}/signals"] = case(lab, True)
        cases[f"{lab}/recompute_only"] = recompute_case(model, *inputs[lab], block)
    load_before = os.getloadavg()
    try:
        with torch.inference_mode():
            timed = time_interleaved(cases, args.warmup, args.reps, device, args.seed)
            # sanity of the signals: finite; received sums to 1 per image at a full block
            done = tower_pass(model, *inputs[next(iter(inputs))], block)
    finally:
        timer.remove()
    quiet = quiet_stats(timed, device)
    vc, real_vc = model.config.vision_config, SimpleNamespace(**real_config_dict()["vision_config"])
    real_vc.hidden_size, real_vc.intermediate_size = vc.hidden_size, vc.intermediate_size
    real_depth, real_full = int(real_vc.depth), len(real_vc.fullatt_block_indexes)
    if args.smoke:  # the tiny tower is its own full depth
        real_depth, real_full = int(vc.depth), len(vc.fullatt_block_indexes)
        real_vc = vc
    full_idx = set(vc.fullatt_block_indexes)
    rows, sanity, quiet_sanity = [], {}, {}
    for size in sizes:
        lab = label(size)
        pv, grids = inputs[lab]
        patches = int(np.prod(grids[0]))
        key = {c: f"{lab}/{c}" for c in ("plain", "plain_repeat", "signals", "recompute_only")}
        st = {c: ms_stats(timed["ms"][k]) for c, k in key.items()}
        qm = {c: quiet_median(quiet, k) for c, k in key.items()}
        sanity[lab] = agreement(timed["ms"][key["plain_repeat"]], timed["ms"][key["plain"]],
                                args.tolerance)  # fmt: skip
        quiet_sanity[lab] = quiet_agreement(quiet, key["plain_repeat"], key["plain"],
                                            args.tolerance)  # fmt: skip
        # per-block times: the plain_repeat reps that ran undisturbed (all reps if none did)
        reps_blocks = timed["extra"][key["plain_repeat"]]
        walls = timed["ms"][key["plain_repeat"]]
        use = quiet_index(timed, key["plain_repeat"], device) or list(range(len(walls)))
        blocks = [statistics.median(reps_blocks[i][j] for i in use) for j in range(int(vc.depth))]
        rest = statistics.median(walls[i] - sum(reps_blocks[i]) for i in use)
        window_ms = [t for i, t in enumerate(blocks) if i not in full_idx]
        full_ms = [t for i, t in enumerate(blocks) if i in full_idx]
        w_ms = statistics.fmean(window_ms) if window_ms else 0.0
        f_ms = statistics.fmean(full_ms)
        derived_full = rest + (real_depth - real_full) * w_ms + real_full * f_ms
        extra = st["signals"]["median"] - st["plain"]["median"]
        direct = st["recompute_only"]["median"]
        q_extra = qm["signals"] - qm["plain"] if qm["signals"] and qm["plain"] else None
        rec_flops = recompute_flops(vc, patches)
        rows.append({
            "size_wh": list(size), "grid_thw": list(grids[0]), "patches": patches,
            "merged_tokens": patches // 4, "cut_depth": int(vc.depth),
            "plain_ms": st["plain"], "plain_repeat_ms": st["plain_repeat"],
            "signals_ms": st["signals"], "recompute_only_ms": st["recompute_only"],
            "quiet_median_ms": qm,
            "quiet_n": {c: len(quiet.get(k, [])) for c, k in key.items()},
            "extra_ms": extra, "extra_ms_min_based": st["signals"]["min"] - st["plain"]["min"],
            "extra_pct_of_plain_cut": 100 * extra / st["plain"]["median"],
            "quiet_extra_ms": q_extra,
            "quiet_extra_pct_of_plain_cut": 100 * q_extra / qm["plain"] if q_extra is not None
            else None,
            "recompute_only_pct_of_plain_cut": 100 * direct / st["plain"]["median"],
            "block_ms": blocks, "rest_ms": rest, "block_reps_used": len(use),
            "window_block_ms": w_ms, "full_block_ms": f_ms,
            "full_depth": real_depth, "full_depth_fullatt_blocks": real_full,
            "plain_ms_full_depth_derived": derived_full,
            "extra_pct_of_plain_full_depth_derived": 100 * extra / derived_full,
            "recompute_only_pct_of_plain_full_depth_derived": 100 * direct / derived_full,
            "recompute_only_in_full_blocks": direct / f_ms,
            "analytic": {
                "tower_gflops_cut": tower_flops(vc, patches) / 1e9,
                "tower_gflops_full_depth": tower_flops(real_vc, patches) / 1e9,
                "recompute_gflops": rec_flops / 1e9,
                "recompute_pct_cut": 100 * rec_flops / tower_flops(vc, patches),
                "recompute_pct_full_depth": 100 * rec_flops / tower_flops(real_vc, patches),
            },
        })  # fmt: skip
        print(json.dumps({k: rows[-1][k] for k in ("size_wh", "grid_thw", "extra_ms",
                          "quiet_extra_ms", "recompute_only_pct_of_plain_cut",
                          "recompute_only_pct_of_plain_full_depth_derived")}),
              flush=True)  # fmt: skip
    g = merged_counts_of(inputs[next(iter(inputs))][1])
    checks = {
        "signals_finite": bool(torch.isfinite(done.keys).all() and torch.isfinite(done.received).all()),
        "received_sum_per_image": float(done.received[: g[0]].sum()),
        "merged_finite": bool(torch.isfinite(done.merged).all()),
    }  # fmt: skip
    return {"score_block": block, "rows": rows, "sanity": sanity, "quiet_sanity": quiet_sanity,
            "checks": checks, "loadavg_before": list(load_before), "raw": timed}  # fmt: skip


def merged_counts_of(grids) -> list[int]:
    from recomp_eval.models.qwen2_5_vl.vision import merged_counts

    return merged_counts(grids)


# --- 2. prefill at 10 % of the merged tokens -----------------------------------------------


def prompt_ids(vocab: int, image_id: int, seed: int) -> list[int]:
    """A prompt of ``TEXT_BEFORE + TEXT_AFTER`` text tokens around one image placeholder."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, vocab - 16, (TEXT_BEFORE + TEXT_AFTER,), generator=g).tolist()
    return [*text[:TEXT_BEFORE], image_id, *text[TEXT_BEFORE:]]


def prefill_inputs(model, grid, kept: int, batch: int, device: str, seed: int) -> dict[str, Any]:
    """``input_ids``, ``attention_mask``, M-RoPE ``position_ids`` [4,B,L] and the features of
    ``batch`` copies of one prompt whose image keeps ``kept`` of its N merged tokens (a fixed
    random subset in raster order, at their source positions of the unpruned sequence)."""
    from recomp_eval.models.llm_inputs import image_features_arg
    from recomp_eval.models.qwen2_5_vl.positions import full_positions

    cfg = model.config
    image_id, width = int(cfg.image_token_id), int(cfg.text_config.hidden_size)
    vocab = int(cfg.text_config.vocab_size)
    n = merged_counts_of([grid])[0]
    ids = prompt_ids(vocab, image_id, seed)
    positions, at, _ = full_positions(model, ids, image_id, n, grid)  # [3, L_full]
    g = torch.Generator().manual_seed(seed + 1)
    anchor = torch.randperm(n, generator=g)[:kept].sort().values
    after = len(ids) - at - 1
    index = torch.cat([torch.arange(at), at + anchor, at + n + torch.arange(after)])
    pos3 = positions[:, index]  # [3, L]
    length = pos3.shape[1]
    pos = torch.cat([torch.arange(length)[None], pos3]).unsqueeze(1).expand(4, batch, length)
    row = ids[:at] + [image_id] * kept + ids[at + 1 :]
    input_ids = torch.tensor([row] * batch, device=device)
    feats = [(torch.randn(kept, width, generator=g) * 0.02).to(device, model.dtype)
             for _ in range(batch)]  # fmt: skip
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "position_ids": pos.contiguous().to(device),
            "mm_encoder_outputs": image_features_arg(feats)}  # fmt: skip


def prefill_case(model, kw: dict[str, Any]) -> Callable[[], None]:
    def run() -> None:
        model(**kw, use_cache=True, logits_to_keep=1)

    return run


def bench_prefill(model, proc, sizes, args, device: str) -> dict[str, Any]:
    shape = DecoderShape.from_config(model.config.text_config)  # the per-layer ratio
    real = real_config_dict()
    shape_7b = DecoderShape(hidden=real["hidden_size"], intermediate=real["intermediate_size"],
                            layers=real["num_hidden_layers"],
                            kv_hidden=real["num_key_value_heads"] * real["hidden_size"]
                            // real["num_attention_heads"])  # fmt: skip
    text = TEXT_BEFORE + TEXT_AFTER
    grids = {label(s): preprocess(proc, images_of([s]))[1][0] for s in sizes}
    rows, sanity, quiet_sanity, raw, loads = [], {}, {}, [], {}
    for batch in args.batch_sizes:
        reps = args.reps if batch == 1 else args.big_batch_reps
        inputs, counts = {}, {}
        for lab, grid in grids.items():
            n = merged_counts_of([grid])[0]
            kept = budget_from_ratio(RETENTION, n)
            counts[lab] = (n, kept)
            inputs[f"{lab}/full"] = prefill_inputs(model, grid, n, batch, device, args.seed)
            inputs[f"{lab}/kept10"] = prefill_inputs(model, grid, kept, batch, device, args.seed)
            inputs[f"{lab}/kept10_repeat"] = inputs[f"{lab}/kept10"]

        loads[str(batch)] = list(os.getloadavg())
        cases = {k: prefill_case(model, kw) for k, kw in inputs.items()}
        with torch.inference_mode():
            timed = time_interleaved(cases, args.warmup, reps, device, args.seed)
        raw.append({"batch": batch, **timed})
        quiet = quiet_stats(timed, device)
        qm = {k: quiet_median(quiet, k) for k in quiet}
        for lab, (n, kept) in counts.items():
            full, cut = ms_stats(timed["ms"][f"{lab}/full"]), ms_stats(timed["ms"][f"{lab}/kept10"])
            analytic = prefill_flops(text + n, shape) / prefill_flops(text + kept, shape)
            speedup = full["median"] / cut["median"]
            q_full, q_cut = qm.get(f"{lab}/full"), qm.get(f"{lab}/kept10")
            quiet_sanity[f"{lab}/B{batch}"] = quiet_agreement(
                quiet, f"{lab}/kept10_repeat", f"{lab}/kept10", args.tolerance
            )
            sanity[f"{lab}/B{batch}"] = agreement(timed["ms"][f"{lab}/kept10_repeat"],
                                                  timed["ms"][f"{lab}/kept10"], args.tolerance)  # fmt: skip
            rows.append({
                "batch": batch, "size_wh": [int(v) for v in lab.split("x")],
                "grid_thw": list(grids[lab]), "image_tokens": n, "kept_tokens": kept,
                "seq_len_full": text + n, "seq_len_kept": text + kept,
                "full_ms": full, "kept10_ms": cut,
                "kept10_repeat_ms": ms_stats(timed["ms"][f"{lab}/kept10_repeat"]),
                "speedup": speedup, "speedup_min_based": full["min"] / cut["min"],
                "analytic_speedup": analytic, "efficiency": speedup / analytic,
                "quiet_median_ms": {"full": q_full, "kept10": q_cut},
                "quiet_speedup": q_full / q_cut if q_full and q_cut else None,
                "quiet_efficiency": q_full / q_cut / analytic if q_full and q_cut else None,
                "quiet_n": {k.split("/")[1]: len(v) for k, v in quiet.items()
                            if k.startswith(lab + "/")},
                "tflops_7b_full": batch * prefill_flops(text + n, shape_7b) / 1e12,
                "tflops_7b_kept": batch * prefill_flops(text + kept, shape_7b) / 1e12,
                "reps": reps,
            })  # fmt: skip
            print(json.dumps({k: rows[-1][k] for k in ("batch", "size_wh", "image_tokens",
                              "kept_tokens", "speedup", "analytic_speedup", "efficiency")}),
                  flush=True)  # fmt: skip
    return {"text_tokens": text, "retention": RETENTION, "layers": shape.layers,
            "decoder_shape": vars(shape), "rows": rows, "sanity": sanity,
            "quiet_sanity": quiet_sanity,
            "loadavg_before": loads, "raw": raw}  # fmt: skip


# --- 3. grouping by grid against one call per image ----------------------------------------


def synthetic_pass(grids, merged_width: int, key_width: int, dtype, device: str, seed: int):
    """A :class:`QwenTowerPass` with random merged tokens and keys and, per image, a
    softmax-shaped received attention summing to 1."""
    from recomp_eval.models.qwen2_5_vl.vision import QwenTowerPass

    g = torch.Generator().manual_seed(seed)
    counts = merged_counts_of(grids)
    total = sum(counts)
    merged = torch.randn(total, merged_width, generator=g).to(device, dtype)
    keys = torch.randn(total, key_width, generator=g).to(device, dtype)
    received = torch.cat([torch.softmax(2.0 * torch.randn(n, generator=g), 0) for n in counts])
    return QwenTowerPass(merged=merged, keys=keys, received=received.to(device), block=0)


def slice_pass(done, start: int, n: int):
    from recomp_eval.models.qwen2_5_vl.vision import QwenTowerPass

    return QwenTowerPass(merged=done.merged[start : start + n], keys=done.keys[start : start + n],
                         received=done.received[start : start + n], block=done.block)  # fmt: skip


def grouped_step(adapter, bundle, method, done, layout):
    """What the adapter does: signals grouped by grid, one method call per grid."""
    out = adapter.signals(bundle, done, method.spec, layout=layout)
    compressed = adapter.apply(bundle, method, out, layout)
    return compressed, adapter.project(bundle, compressed, layout)


def per_sample_step(adapter, bundle, method, done, layout):
    """One method call per image: each image's signals alone (its own one-image layout)."""
    from recomp_eval.models.base import BatchLayout
    from recomp_eval.models.base import TowerOutput as TO
    from recomp_eval.models.qwen2_5_vl.adapter import GroupedSignals

    counts = merged_counts_of(layout.data)
    start, groups = 0, []
    for i, (grid, n) in enumerate(zip(layout.data, counts)):
        one = BatchLayout(items=(1,), data=[grid])
        out = adapter.signals(bundle, slice_pass(done, start, n), method.spec, layout=one)
        groups.append(([i], out.signals.groups[0][1]))
        start += n
    tower_out = TO(signals=GroupedSignals(groups), last_hidden=done.merged, layout=layout)
    compressed = adapter.apply(bundle, method, tower_out, layout)
    return compressed, adapter.project(bundle, compressed, layout)


TIE = 0.05  # below this relative difference of medians (or twice the repeat's) no winner


def faster_of(grouped_ms: float, per_sample_ms: float, repeat_ratio: float) -> str:
    """``grouped``, ``per_sample`` or ``tie``: a tie where the medians differ by less than
    :data:`TIE` or than twice the grouped case's disagreement with its repeat."""
    margin = max(TIE, 2 * abs(repeat_ratio - 1))
    if abs(per_sample_ms / grouped_ms - 1) <= margin:
        return "tie"
    return "grouped" if grouped_ms < per_sample_ms else "per_sample"


def bench_grouping(model, proc, sizes, args, device: str) -> dict[str, Any]:
    from recomp_eval.methods import build_method
    from recomp_eval.models.base import BatchLayout
    from recomp_eval.models.qwen2_5_vl.adapter import QwenAdapter

    grids = [tuple(g) for g in (preprocess(proc, images_of([s]))[1][0] for s in sizes)]
    layout = BatchLayout(items=(1,) * len(grids), data=grids)
    adapter = QwenAdapter(cls_attn="received")
    bundle = SimpleNamespace(model=model, adapter=adapter)
    vc = model.config.vision_config
    done = synthetic_pass(grids, int(vc.out_hidden_size), int(vc.hidden_size), model.dtype,
                          device, args.seed)  # fmt: skip
    methods = {name: build_method(name, retention=RETENTION) for name in METHODS}
    cases, checks = {}, {}
    for name, method in methods.items():
        cases[f"{name}/grouped"] = lambda m=method: grouped_step(adapter, bundle, m, done, layout)
        cases[f"{name}/grouped_repeat"] = cases[f"{name}/grouped"]
        cases[f"{name}/per_sample"] = lambda m=method: per_sample_step(adapter, bundle, m, done,
                                                                       layout)  # fmt: skip
        _, a = grouped_step(adapter, bundle, method, done, layout)
        _, b = per_sample_step(adapter, bundle, method, done, layout)
        checks[name] = {
            "outputs_equal": all(x.shape == y.shape and bool(torch.equal(x, y))
                                 for x, y in zip(a, b)),
            "kept_per_sample": [int(x.shape[0]) for x in a],
        }  # fmt: skip
    load_before = os.getloadavg()
    with torch.inference_mode():
        timed = time_interleaved({k: (lambda f=f: (f(), None)[1]) for k, f in cases.items()},
                                 args.method_warmup, args.method_reps, device, args.seed)  # fmt: skip
    rows, sanity = [], {}
    for name in methods:
        grouped = ms_stats(timed["ms"][f"{name}/grouped"])
        per = ms_stats(timed["ms"][f"{name}/per_sample"])
        sanity[name] = agreement(timed["ms"][f"{name}/grouped_repeat"],
                                 timed["ms"][f"{name}/grouped"], args.tolerance)  # fmt: skip
        quiet = quiet_stats(timed, device)
        rows.append({
            "quiet_median_ms": {c: quiet_median(quiet, f"{name}/{c}")
                                for c in ("grouped", "grouped_repeat", "per_sample")},
            "method": name, "retention": RETENTION, "grouped_ms": grouped, "per_sample_ms": per,
            "grouped_repeat_ms": ms_stats(timed["ms"][f"{name}/grouped_repeat"]),
            "per_sample_over_grouped": per["median"] / grouped["median"],
            "faster": faster_of(grouped["median"], per["median"], sanity[name]["ratio"]),
            "calls_grouped": len(set(grids)), "calls_per_sample": len(grids),
        })  # fmt: skip
        print(json.dumps({k: rows[-1][k] for k in ("method", "per_sample_over_grouped",
                                                   "faster")}), flush=True)  # fmt: skip
    return {"sizes_wh": [list(s) for s in sizes], "grids_thw": [list(g) for g in grids],
            "merged_tokens": merged_counts_of(grids), "distinct_grids": len(set(grids)),
            "rows": rows, "sanity": sanity, "checks": checks, "loadavg_before": list(load_before),
            "raw": timed}  # fmt: skip


# --- report --------------------------------------------------------------------------------


def med(st: dict[str, float]) -> str:
    return f"{st['min']:.1f} / {st['median']:.1f} / {st['p90']:.1f}"


def size_of(r: dict[str, Any]) -> str:
    return f"{r['size_wh'][0]} x {r['size_wh'][1]}"


def sanity_line(what: str, sanity: dict[str, Any]) -> list[str]:
    return [f"Sanity ({what}):", *(f"- {k}: {v['message']}" for k, v in sanity.items()), ""]


def fmt(x: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def quiet_note(meta: dict[str, Any]) -> str:
    if str(meta["device"]).startswith("cuda"):
        return ""
    return (f"Quiet = the reps in which this process had its {meta['threads']} cores to itself "
            f"(CPU time >= 0.9 x threads x wall, `quiet_reps`), the contention-free estimate "
            f"where other processes shared the machine; n = how many.")  # fmt: skip


def tower_markdown(meta: dict[str, Any], tower: dict[str, Any]) -> list[str]:
    first = tower["rows"][0]
    depth, n_full = first["full_depth"], first["full_depth_fullatt_blocks"]
    lines = [
        "## 1. Score-block recompute against the tower pass",
        "",
        f"Score block {tower['score_block']}: the last full-attention block of the "
        f"{first['cut_depth']}-block tower (at full depth the last one is block "
        f"{meta['fullatt_full'][-1]}: the same computation on the same P patches). `plain` = "
        f"`tower_pass(..., block=None)`; `plain (repeat)` = the same pass under a second label, "
        f"its blocks timed by forward hooks; `with signals` = `block=` the score block (keys "
        f"and received attention recomputed from q/k); `recompute alone` = that addition timed "
        f"on its own on the block's captured input (window index, `block_signals`, reordering). "
        f"All interleaved, {meta['reps']} reps per case, one image per pass. {quiet_note(meta)}",
        "",
    ]
    header = ["image (W x H)", "grid (t,h,w)", "N", "plain", "plain (repeat)", "with signals",
              "recompute alone", "quiet medians: plain / with signals / alone (n)",
              "extra (pass difference): all / quiet", f"recompute alone % of plain "
              f"({first['cut_depth']} blocks)"]  # fmt: skip
    rows = []
    for r in tower["rows"]:
        q, qn = r["quiet_median_ms"], r["quiet_n"]
        rows.append([
            size_of(r), "x".join(map(str, r["grid_thw"])), r["merged_tokens"],
            med(r["plain_ms"]), med(r["plain_repeat_ms"]), med(r["signals_ms"]),
            med(r["recompute_only_ms"]),
            f"{fmt(q['plain'])} / {fmt(q['signals'])} / {fmt(q['recompute_only'])} "
            f"({qn['plain']}, {qn['signals']}, {qn['recompute_only']})",
            f"{r['extra_ms']:.1f} ms ({r['extra_pct_of_plain_cut']:.1f} %) / "
            f"{fmt(r['quiet_extra_ms'])} ms ({fmt(r['quiet_extra_pct_of_plain_cut'], '.1f')} %)",
            f"{r['recompute_only_pct_of_plain_cut']:.1f} %",
        ])  # fmt: skip
    lines += [markdown_table(header, rows)]
    lines += [
        f"Per-block times (hooks on `plain (repeat)`, medians over its quiet reps, all reps "
        f"where none was quiet; `rest` = patch embedding, rotary, window index, merger) and the "
        f"full-depth figures **derived** from them: plain at {depth} blocks = rest + "
        f"{depth - n_full} x window block + {n_full} x full block. The recompute is one block's "
        f"attention and does not grow with depth. Analytic: `qwen2_5_vl.flops.tower_flops` "
        f"against the recompute's 3 P C^2 + P^2 C MACs.",
        "",
    ]
    header = ["image", "window block ms", "full block ms", "rest ms", "reps used",
              "recompute alone / full block", f"plain ms at {depth} blocks (derived)",
              f"recompute alone % at {depth} (derived)", "analytic % cut",
              f"analytic % at {depth}"]  # fmt: skip
    rows = [[size_of(r), r["window_block_ms"], r["full_block_ms"], r["rest_ms"],
             r["block_reps_used"], r["recompute_only_in_full_blocks"],
             r["plain_ms_full_depth_derived"],
             f"{r['recompute_only_pct_of_plain_full_depth_derived']:.2f} %",
             f"{r['analytic']['recompute_pct_cut']:.2f} %",
             f"{r['analytic']['recompute_pct_full_depth']:.2f} %"] for r in tower["rows"]]  # fmt: skip
    lines += [markdown_table(header, rows)]
    lines += sanity_line("the plain pass timed twice, all reps", tower["sanity"])
    return lines + sanity_line("the same, quiet reps", {k: v or {"message": "no quiet reps"}
                                                        for k, v in tower["quiet_sanity"].items()})  # fmt: skip


def prefill_markdown(meta: dict[str, Any], prefill: dict[str, Any]) -> list[str]:
    lines = [
        "## 2. Prefill at 10 % of the merged tokens",
        "",
        f"`Qwen2_5_VLForConditionalGeneration` forward as the harness's prefill (input_ids with "
        f"the image placeholders, features as `mm_encoder_outputs`, M-RoPE position_ids [4,B,L] "
        f"with the kept tokens at their source positions, logits_to_keep=1) of "
        f"{prefill['text_tokens']} text tokens + N merged tokens against + round(0.1 N); "
        f"{prefill['layers']} decoder layer(s) at the {meta['shapes']} layer shape; B copies of "
        f"one image (no padding). Analytic = the `prefill_flops` ratio (SwiGLU, GQA) of "
        f"`DecoderShape.from_config(text_config)`. Reps: {meta['reps']} at B = 1, "
        f"{meta['big_batch_reps']} at B > 1. {quiet_note(meta)}",
        "",
    ]
    header = ["B", "image", "N", "kept", "full ms", "10 % ms", "10 % (repeat) ms",
              "speed-up (min-based)", "analytic", "measured / analytic",
              "quiet: full / 10 % ms (n), speed-up, / analytic"]  # fmt: skip
    rows = []
    for r in prefill["rows"]:
        q, qn = r["quiet_median_ms"], r["quiet_n"]
        rows.append([
            r["batch"], size_of(r), r["image_tokens"], r["kept_tokens"], med(r["full_ms"]),
            med(r["kept10_ms"]), med(r["kept10_repeat_ms"]),
            f"{r['speedup']:.2f}x ({r['speedup_min_based']:.2f}x)",
            f"{r['analytic_speedup']:.2f}x", r["efficiency"],
            f"{fmt(q['full'])} / {fmt(q['kept10'])} ({qn.get('full', 0)}, "
            f"{qn.get('kept10', 0)}), {fmt(r['quiet_speedup'], '.2f', 'x')}, "
            f"{fmt(r['quiet_efficiency'], '.2f')}",
        ])  # fmt: skip
    lines += [markdown_table(header, rows)]
    lines += sanity_line("the 10 % case timed twice, all reps", prefill["sanity"])
    return lines + sanity_line("the same, quiet reps", {k: v or {"message": "no quiet reps"}
                                                        for k, v in prefill["quiet_sanity"].items()})  # fmt: skip


def grouping_markdown(meta: dict[str, Any], grouping: dict[str, Any]) -> list[str]:
    grids = ", ".join("x".join(map(str, g[1:])) for g in grouping["grids_thw"])
    lines = [
        "## 3. Grouping by grid against one call per image",
        "",
        f"{len(grouping['grids_thw'])} images on {grouping['distinct_grids']} grids ({grids} "
        f"patches; N = {grouping['merged_tokens']}); the adapter step (`signals` + `apply` + "
        f"`project`) at retention 0.1 on a synthetic tower pass at the real widths, "
        f"{meta['method_reps']} reps after {meta['method_warmup']} warm-up rounds. A different N "
        f"per sample in one call is not supported: `VisionSignals` holds one N per call "
        f"(features [B,N,C]) and no method takes a padding mask.",
        "",
    ]
    header = ["method", f"grouped ({grouping['distinct_grids']} calls) ms", "grouped (repeat) ms",
              f"per image ({len(grouping['grids_thw'])} calls) ms", "per image / grouped",
              "faster", "same output"]  # fmt: skip
    rows = [[r["method"], med(r["grouped_ms"]), med(r["grouped_repeat_ms"]),
             med(r["per_sample_ms"]), f"{r['per_sample_over_grouped']:.2f}x", r["faster"],
             grouping["checks"][r["method"]]["outputs_equal"]] for r in grouping["rows"]]  # fmt: skip
    lines += [markdown_table(header, rows)]
    return lines + sanity_line("the grouped step timed twice", grouping["sanity"])


def markdown(record: dict[str, Any]) -> str:
    meta = record["meta"]
    commit = meta["commit"][:10] + " + uncommitted script changes" * bool(
        meta.get("scripts_modified")
    )
    lines = [
        f"# Qwen2.5-VL costs ({meta['device_name']}, {meta['cpu']}, {meta['threads']} threads)",
        "",
        f"Random weights at {meta['shapes']} shapes ({meta['config_source']}); tower cut to "
        f"{meta['vision_depth']} of {meta['full_vision_depth']} blocks (full attention at "
        f"{meta['fullatt_cut']}; full depth: {meta['fullatt_full']}), decoder to "
        f"{meta['text_layers']} of {meta['full_text_layers']} layers, vocabulary {meta['vocab']}; "
        f"{meta['dtype']}, sdpa. torch {meta['torch']}, transformers {meta['transformers']}, "
        f"commit {commit}. Load (1/5/15 min) before timing "
        f"{', '.join(f'{x:.2f}' for x in meta['loadavg'])}, at the end "
        f"{', '.join(f'{x:.2f}' for x in meta['loadavg_end'])}. Timings in ms: min / median / "
        f"p90; cases interleaved in a shuffled order per round after {meta['warmup']} warm-up "
        f"round(s); ratios from medians. All from one run ({meta['wall_s']:.0f} s). "
        f"Measurement {'valid' if record['measurement_valid'] else 'NOT valid (see sanity)'} "
        f"on all reps; on the quiet reps "
        f"{'valid' if record['measurement_valid_quiet_reps'] else 'NOT valid or missing'}.",
        "",
    ]
    if record["tower"]["rows"]:
        lines += tower_markdown(meta, record["tower"])
    if record["prefill"]["rows"]:
        lines += prefill_markdown(meta, record["prefill"])
    if record["grouping"]["rows"]:
        lines += grouping_markdown(meta, record["grouping"])
    lines += ["## Conclusions", ""] + [f"- {c}" for c in record["conclusions"]]
    return "\n".join(lines) + "\n"


def conclusions(tower, prefill, grouping, valid: bool) -> list[str]:
    out = []
    for r in tower["rows"]:
        quiet = (f"; quiet reps {r['quiet_extra_ms']:.0f} ms = "
                 f"{r['quiet_extra_pct_of_plain_cut']:.1f} %" if r["quiet_extra_ms"] is not None
                 else "")  # fmt: skip
        out.append(
            f"Tower {size_of(r)} (N = {r['merged_tokens']}): the recompute alone takes "
            f"{r['recompute_only_ms']['median']:.0f} ms = "
            f"{r['recompute_only_pct_of_plain_cut']:.1f} % of the {r['cut_depth']}-block plain "
            f"pass ({r['recompute_only_in_full_blocks']:.2f} of a full-attention block; pass "
            f"difference {r['extra_ms']:.0f} ms{quiet}), measured; at {r['full_depth']} blocks "
            f"{r['recompute_only_pct_of_plain_full_depth_derived']:.1f} % (derived from the "
            f"measured per-block times; analytic {r['analytic']['recompute_pct_full_depth']:.1f} %)."
        )
    for r in prefill["rows"]:
        quiet = (f"; quiet reps {r['quiet_speedup']:.2f}x, {r['quiet_efficiency']:.2f}"
                 if r["quiet_speedup"] else "")  # fmt: skip
        out.append(
            f"Prefill B = {r['batch']}, {size_of(r)}: {r['speedup']:.2f}x at {r['kept_tokens']} "
            f"of {r['image_tokens']} tokens against {r['analytic_speedup']:.2f}x analytic "
            f"({r['efficiency']:.2f} of it{quiet})."
        )
    for r in grouping["rows"]:
        verdict = {
            "grouped": "grouping by grid is faster",
            "per_sample": "one call per image is faster",
            "tie": f"no clear winner (within {TIE:.0%} or twice the repeat's spread)",
        }
        out.append(
            f"{r['method']}: {verdict[r['faster']]}; one call per image takes "
            f"{r['per_sample_over_grouped']:.2f}x the grouped time "
            f"({r['per_sample_ms']['median']:.1f} against {r['grouped_ms']['median']:.1f} ms; "
            f"{r['calls_per_sample']} calls against {r['calls_grouped']})."
        )  # fmt: skip
    if not valid:
        out.append("Measurement not valid on all reps: a repeated case disagreed beyond the "
                   "tolerance (see the sanity lines; the quiet-rep checks are listed next to "
                   "them).")  # fmt: skip
    return out


def wait_for_load(limit: float | None, most_s: float) -> float:
    """Sleep until the 1-minute load is below ``limit`` (at most ``most_s``); seconds waited."""
    start = time.perf_counter()
    while limit is not None and os.getloadavg()[0] >= limit:
        if time.perf_counter() - start >= most_s:
            print(f"load still {os.getloadavg()[0]:.2f} after {most_s:.0f} s: timing anyway",
                  flush=True)  # fmt: skip
            break
        time.sleep(5)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--smoke", action="store_true", help="the tiny checkpoint's shapes")
    parser.add_argument("--vision-depth", type=int, default=None,
                        help="tower blocks (default 8 on CPU, 32 on GPU)")  # fmt: skip
    parser.add_argument("--text-layers", type=int, default=None,
                        help="decoder layers (default 2 on CPU, 28 on GPU)")  # fmt: skip
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=None, help="tower and B = 1 (5 CPU, 10 GPU)")
    parser.add_argument("--big-batch-reps", type=int, default=None,
                        help="prefill at B > 1 (4 CPU, 10 GPU)")  # fmt: skip
    parser.add_argument("--method-warmup", type=int, default=3)
    parser.add_argument("--method-reps", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", default=["tower", "prefill", "grouping"],
                        choices=["tower", "prefill", "grouping"])  # fmt: skip
    parser.add_argument("--out-stem", default=None, help="default results/bench/qwen_<device>")
    parser.add_argument("--wait-load", type=float, default=None,
                        help="before timing, wait until the 1-minute load is below this")  # fmt: skip
    parser.add_argument("--wait-s", type=float, default=600, help="--wait-load: at most this long")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    kind = "cuda" if on_gpu else "cpu"
    args.reps = args.reps or (10 if on_gpu else 5)
    args.big_batch_reps = args.big_batch_reps or (10 if on_gpu else 4)
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    threads = pin_threads(args.threads)
    waited = wait_for_load(args.wait_load, args.wait_s)
    started = time.perf_counter()  # the run itself, after any wait
    info = machine_info(args.device, (SCRIPT,))  # load before any timing
    info["waited_for_load_s"] = waited
    if info["loadavg"] and info["loadavg"][0] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load {info['loadavg'][0]:.2f} on {os.cpu_count()} cores: other "
              f"processes share the CPU (recorded; see the quiet-rep figures)", flush=True)  # fmt: skip
    raw = smoke_config_dict() if args.smoke else real_config_dict()
    full_vision, full_text = int(raw["vision_config"]["depth"]), int(raw["num_hidden_layers"])
    vision_depth = args.vision_depth or (full_vision if args.smoke or on_gpu else 8)
    text_layers = args.text_layers or (full_text if args.smoke or on_gpu else 2)
    cfg = cut_config(raw, vision_depth, text_layers, None if args.smoke else VOCAB)
    model = build_model(cfg, dtype, args.device)
    proc = image_processor(args.smoke)
    tower_sizes = SMOKE_TOWER_SIZES if args.smoke else TOWER_SIZES[kind]
    mix_sizes = SMOKE_MIX_SIZES if args.smoke else MIX_SIZES
    print(f"built in {time.perf_counter() - started:.0f} s: tower {vision_depth}/{full_vision} "
          f"blocks, decoder {text_layers}/{full_text} layers, {dtype}, {threads} threads, load "
          f"{info['loadavg']}", flush=True)  # fmt: skip
    empty = {"rows": [], "sanity": {}}
    tower = (
        bench_tower(model, proc, tower_sizes, args, args.device) if "tower" in args.parts else empty
    )
    prefill = (bench_prefill(model, proc, tower_sizes, args, args.device)
               if "prefill" in args.parts else {**empty, "text_tokens": 0, "layers": 0})  # fmt: skip
    grouping = (bench_grouping(model, proc, mix_sizes, args, args.device)
                if "grouping" in args.parts else {**empty, "grids_thw": [], "merged_tokens": [],
                                                  "distinct_grids": 0, "checks": {}})  # fmt: skip
    sanity = {f"{part}:{k}": v for part, d in (("tower", tower), ("prefill", prefill),
              ("grouping", grouping)) for k, v in d["sanity"].items()}  # fmt: skip
    valid = all(v["valid"] for v in sanity.values())
    quiet_checks = {f"{part}:{k}": v for part, d in (("tower", tower), ("prefill", prefill))
                    for k, v in d.get("quiet_sanity", {}).items()}  # fmt: skip
    quiet_valid = all(v is not None and v["valid"] for v in quiet_checks.values())
    meta = {
        **info, "dtype": str(dtype).replace("torch.", ""), "smoke": args.smoke,
        "shapes": "tiny_qwen" if args.smoke else "Qwen2.5-VL-7B",
        "config_source": "recomp_eval.models.qwen2_5_vl.tiny.config_dict" if args.smoke
        else str(REAL_DIR.relative_to(REPO) / "config.json"),
        "vision_depth": vision_depth, "full_vision_depth": full_vision,
        "fullatt_cut": cfg["vision_config"]["fullatt_block_indexes"],
        "fullatt_full": raw["vision_config"]["fullatt_block_indexes"],
        "text_layers": text_layers, "full_text_layers": full_text, "vocab": cfg["vocab_size"],
        "attn_implementation": "sdpa", "warmup": args.warmup, "reps": args.reps,
        "big_batch_reps": args.big_batch_reps,
        "method_warmup": args.method_warmup, "method_reps": args.method_reps,
        "batch_sizes": args.batch_sizes, "tolerance": args.tolerance, "seed": args.seed,
        "threads_requested": args.threads, "order": "shuffled per round (time_interleaved)",
        "tower_sizes_wh": [list(s) for s in tower_sizes], "parts": args.parts,
        "measurement_valid": valid, "wall_s": time.perf_counter() - started,
        "loadavg_end": list(os.getloadavg()),
    }  # fmt: skip
    record = {"meta": meta, "tower": tower, "prefill": prefill, "grouping": grouping,
              "sanity": sanity, "measurement_valid": valid, "quiet_sanity": quiet_checks,
              "measurement_valid_quiet_reps": quiet_valid}  # fmt: skip
    record["conclusions"] = conclusions(tower, prefill, grouping, valid)
    stem = Path(args.out_stem) if args.out_stem else REPO / "results" / "bench" / f"qwen_{kind}"
    md = markdown(record)
    write_results(stem, record, md)
    print(md)
    return record


if __name__ == "__main__":
    main()
