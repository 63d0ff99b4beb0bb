"""Pixel differences between transformers' PIL and torchvision CLIP image processors, per protocol.

Loads one checkpoint's image-processor settings (``preprocessor_config.json``, default: the real
llava-1.5-7b-hf file under shared/checkpoints) into ``CLIPImageProcessorPil`` and, where
torchvision imports, ``CLIPImageProcessor`` (the ``TorchvisionBackend`` class, what
``AutoProcessor`` picks beside torchvision), runs seeded synthetic images of several sizes and
aspect ratios through both protocols of :mod:`recomp_eval.models.llava.images` (``llava15``: pad to a
square with the mean colour, then resize; ``lmms_eval``: resize the shortest edge, centre crop),
and writes JSON + a markdown table of max / mean absolute differences, in normalised units and in
8-bit levels (normalised difference x std x 255), with PIL as the reference.

    # both backends: a side environment that has torchvision (never the project's .venv)
    /tmp/tvenv/bin/python scripts/compare_image_processors.py
    # one backend (the project's .venv has no torchvision): writes *_pil_only.* files
    .venv/bin/python scripts/compare_image_processors.py

Only torch, numpy, Pillow and transformers are needed (the repo root is put on ``sys.path``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recomp_eval.benchmarks.specs import protocol_names  # noqa: E402
from recomp_eval.models.llava.images import preprocess_images  # noqa: E402

# shared/ beside the repo: the real llava-hf files without weights
DEFAULT_FOLDER = REPO.parent / "shared" / "checkpoints" / "llava-1.5-7b-hf"
# (width, height): landscape, portrait, square at / below / above the crop size, extreme ratios.
SIZES = (
    (640, 480),
    (480, 640),
    (500, 375),
    (1024, 768),
    (1920, 1080),
    (336, 336),
    (224, 224),
    (800, 800),
    (300, 1200),
    (2000, 500),
    (120, 90),
)
KINDS = ("photo_like", "noise")
_LEVELS = 255


def synthetic_image(kind: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A seeded RGB image: ``photo_like`` (smooth gradients + hard-edged shapes + mild noise),
    ``noise`` (uniform per-pixel noise, the worst case for any resampler)."""
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * np.pi)
        base[..., c] = 127 + 100 * np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + phase)
    for _ in range(12):  # hard edges: filled rectangles of random colour
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = min(width, x0 + int(rng.integers(4, max(5, width // 3))))
        y1 = min(height, y0 + int(rng.integers(4, max(5, height // 3))))
        base[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).round().astype(np.uint8))


def load_backends(folder: Path) -> tuple[dict[str, object], dict[str, str]]:
    """The image processors to compare (``pil`` always) and why any backend is missing."""
    from transformers import CLIPImageProcessorPil
    from transformers.utils import is_torchvision_available

    processors: dict[str, object] = {"pil": CLIPImageProcessorPil.from_pretrained(str(folder))}
    missing: dict[str, str] = {}
    if is_torchvision_available():
        from transformers.models.clip.image_processing_clip import CLIPImageProcessor

        processors["torchvision"] = CLIPImageProcessor.from_pretrained(str(folder))
    else:
        missing["torchvision"] = "torchvision is not installed in this environment"
    return processors, missing


def auto_choice(folder: Path) -> str:
    """The class ``AutoImageProcessor.from_pretrained(folder)`` picks in this environment."""
    from transformers import AutoImageProcessor

    return type(AutoImageProcessor.from_pretrained(str(folder))).__name__


def diff_stats(ref: torch.Tensor, other: torch.Tensor, std: torch.Tensor) -> dict[str, float]:
    """Differences of ``other`` from ``ref`` ([3,S,S] normalised pixels); ``std`` [3]."""
    d = (other.double() - ref.double()).abs()  # [3,S,S]
    levels = d * std.double().view(3, 1, 1) * _LEVELS  # [3,S,S] in 8-bit levels
    return {
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "max_levels": float(levels.max()),
        "mean_levels": float(levels.mean()),
        "share_off_by_1_level_or_more": float((levels > 0.5).double().mean()),
    }


def compare(folder: Path, seed: int) -> dict:
    processors, missing = load_backends(folder)
    pil = processors["pil"]
    std = torch.tensor(pil.image_std)
    rng = np.random.default_rng(seed)
    images = [(kind, w, h, synthetic_image(kind, w, h, rng)) for kind in KINDS for (w, h) in SIZES]
    rows = []
    for protocol in protocol_names():
        pixels = {
            name: preprocess_images([im for *_, im in images], proc, protocol)
            for name, proc in processors.items()
        }  # name -> [B,3,S,S]
        for i, (kind, w, h, _) in enumerate(images):
            row = {"protocol": protocol, "kind": kind, "width": w, "height": h}
            for name in processors:
                if name != "pil":
                    row[name] = diff_stats(pixels["pil"][i], pixels[name][i], std)
            rows.append(row)
    summary = {}
    for protocol in protocol_names():
        for name in processors:
            if name == "pil":
                continue
            sel = [r[name] for r in rows if r["protocol"] == protocol]
            summary[f"{protocol}/{name}"] = {
                "max_abs": max(s["max_abs"] for s in sel),
                "mean_abs": float(np.mean([s["mean_abs"] for s in sel])),
                "max_levels": max(s["max_levels"] for s in sel),
                "mean_levels": float(np.mean([s["mean_levels"] for s in sel])),
                "share_off_by_1_level_or_more": float(
                    np.mean([s["share_off_by_1_level_or_more"] for s in sel])
                ),
            }
    return {
        "folder": str(folder),
        "settings": {
            k: pil.to_dict().get(k)
            for k in ("size", "crop_size", "resample", "image_mean", "image_std")
        },
        "seed": seed,
        "reference": "pil",
        "backends": {name: type(p).__name__ for name, p in processors.items()},
        "missing_backends": missing,
        "auto_image_processor_class": auto_choice(folder),
        "device": "cpu (the processors' default: no device argument)",
        "versions": versions(),
        "summary": summary,
        "rows": rows,
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "transformers", "pillow", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    if out["torchvision"] != "not installed":
        import torchvision
        import torchvision.extension

        out["torchvision"] = torchvision.__version__  # with its build tag (+cpu, +cu130)
        # False where its compiled ops (nms, roi_align, decoders) did not load; the transforms
        # the image processor uses are Python + torch ops and do not need them.
        out["torchvision_compiled_ops"] = str(torchvision.extension._has_ops())
    return out


def markdown(result: dict) -> str:
    v = result["versions"]
    lines = [
        "# PIL vs torchvision CLIP image processor (transformers "
        f"{v['transformers']}, torch {v['torch']}, torchvision {v['torchvision']}, "
        f"Pillow {v['pillow']})",
        "",
        f"Settings from `{result['folder']}`: `{json.dumps(result['settings'])}`. "
        f"Reference: `{result['backends']['pil']}`. `AutoImageProcessor` picks "
        f"`{result['auto_image_processor_class']}` in this environment. "
        f"{len(result['rows']) // max(1, len(protocol_names()))} seeded images per protocol "
        f"(seed {result['seed']}), processing on {result['device']}. "
        "Normalised units are the model's input; 8-bit levels = normalised difference x std x 255.",
        "",
    ]
    if v.get("torchvision_compiled_ops") == "False":
        lines += [
            "torchvision's compiled ops (nms, roi_align, decoders) did not load here; the "
            "transforms compared (resize, crop, normalise) are Python + torch ops and do not use "
            "them.",
            "",
        ]
    if result["missing_backends"]:
        for name, why in result["missing_backends"].items():
            lines.append(f"- `{name}` not compared: {why}.")
        lines.append("")
        return "\n".join(lines)
    lines += [
        "| protocol | backend | max abs (norm.) | mean abs (norm.) | max (8-bit levels) "
        "| mean (8-bit levels) | values off by >= 1 level |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, s in result["summary"].items():
        protocol, name = key.split("/")
        lines.append(
            f"| {protocol} | {name} | {s['max_abs']:.4f} | {s['mean_abs']:.5f} | "
            f"{s['max_levels']:.2f} | {s['mean_levels']:.3f} | "
            f"{100 * s['share_off_by_1_level_or_more']:.1f}% |"
        )
    lines += [
        "",
        "Per image (max abs normalised / max 8-bit levels / mean 8-bit levels):",
        "",
        "| protocol | image | size (w x h) | "
        + " | ".join(n for n in result["backends"] if n != "pil")
        + " |",
        "| --- | --- | --- | " + " | ".join("---" for n in result["backends"] if n != "pil") + " |",
    ]
    for r in result["rows"]:
        cells = [
            f"{r[n]['max_abs']:.4f} / {r[n]['max_levels']:.2f} / {r[n]['mean_levels']:.3f}"
            for n in result["backends"]
            if n != "pil"
        ]
        lines.append(
            f"| {r['protocol']} | {r['kind']} | {r['width']} x {r['height']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="checkpoint folder")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench", help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = compare(args.folder, args.seed)
    stem = "image_processors" + ("_pil_only" if result["missing_backends"] else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result).split("\n\nPer image")[0])
    print(f"wrote {args.out / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
