"""What the two stages of ``scripts/train_tiny.py`` and its CLI share: the patch-label
vocabulary, scene data, word-level tokenizers, the lr schedule, checkpoints and logging.

Imports no other ``train_tiny*`` module: ``train_tiny_clip`` (stage 1) and ``train_tiny_llava``
(stage 2) import only this module (and ``recomp_eval``); ``train_tiny`` (the CLI) imports all three.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from recomp_eval.models.llava.tiny import CLIP_MEAN, CLIP_STD
from recomp_eval.synth import scenes as S

GRID = S.IMAGE_SIZE // S.PATCH  # 24
N_PATCH = GRID * GRID  # 576
COLOURS = tuple(S.COLOURS)
SIZES = tuple(S.SIZES)
CHARS = S.CHARACTERS
IGNORE = -100
MIN_COVER = 0.2  # a patch belongs to an object when the object covers >= 20 % of it
DESCRIPTIONS = [f"{z} {c} {s}" for z in SIZES for c in COLOURS for s in S.SHAPES] + ["background"]
# label columns per patch: colour, shape, size, char, description (background = last class)
PATCH_HEADS = {
    "colour": len(COLOURS) + 1,
    "shape": len(S.SHAPES) + 1,
    "size": len(SIZES) + 1,
    "char": len(CHARS) + 1,
}
HEAD_WEIGHTS = {"colour": 1.0, "shape": 2.0, "size": 1.0, "char": 0.5}
N_PAIRS = len(COLOURS) * len(S.SHAPES)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data
def patch_labels(scene: S.Scene) -> np.ndarray:
    """Per-patch labels [576, 5] int16: colour, shape, size, char, description (IGNORE = unsure)."""
    n_bg = [PATCH_HEADS[k] - 1 for k in PATCH_HEADS] + [len(DESCRIPTIONS) - 1]
    labels = np.tile(np.array(n_bg, dtype=np.int16), (N_PATCH, 1))  # [N,5]
    for obj in scene.objects:
        mask = Image.new("L", (S.IMAGE_SIZE, S.IMAGE_SIZE), 0)
        S._draw_shape(ImageDraw.Draw(mask), obj, 255)
        m = np.asarray(mask, dtype=np.float32) / 255.0  # [S,S]
        cover = m.reshape(GRID, S.PATCH, GRID, S.PATCH).mean(axis=(1, 3)).reshape(-1)  # [N]
        ci, si, zi = COLOURS.index(obj.colour), S.SHAPES.index(obj.shape), SIZES.index(obj.size)
        hi = CHARS.index(obj.char) if obj.char else len(CHARS)
        di = DESCRIPTIONS.index(obj.describe())
        labels[cover >= MIN_COVER] = (ci, si, zi, hi, di)
        labels[(cover > 0) & (cover < MIN_COVER)] = IGNORE
    return labels


def build_scenes(seed: int, count: int, path: Path) -> dict[str, torch.Tensor]:
    """Pixels [n,3,S,S] uint8 and patch labels [n,576,5] for scenes 0..count-1 (cached)."""
    if path.exists():
        data = torch.load(path)
        if data["pixels"].shape[0] >= count:
            return {k: v[:count] for k, v in data.items()}
    pixels = np.zeros((count, 3, S.IMAGE_SIZE, S.IMAGE_SIZE), dtype=np.uint8)
    labels = np.zeros((count, N_PATCH, 5), dtype=np.int16)
    for i in range(count):
        scene = S.make_scene(seed, i)
        pixels[i] = np.asarray(scene.image.convert("RGB")).transpose(2, 0, 1)
        labels[i] = patch_labels(scene)
    data = {"pixels": torch.from_numpy(pixels), "labels": torch.from_numpy(labels)}
    torch.save(data, path)
    return data


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,S,S] -> CLIP-normalised float [B,3,S,S] (what the image processor outputs)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


# ----------------------------------------------------------------------------- tokenizers
def word_tokenizer(words: list[str], specials: list[str], clip: bool):
    """Word-level ``PreTrainedTokenizerFast`` (lower-cased, split on spaces and punctuation).

    LLaVA side: ``<s> text``, left padding, ``<image>`` one special token. CLIP side: ``<s> text
    </s>``, right padding, 77 positions, EOS id != 2 (HF's legacy argmax pooling is for id 2).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    bos, eos = vocab["<s>"], vocab["</s>"]
    if clip:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos)]
        )
    kwargs = {"extra_special_tokens": {"image_token": "<image>"}} if not clip else {}
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="right" if clip else "left",
        model_max_length=77 if clip else 4096,
        **kwargs,
    )
    return out


def words_of(texts) -> list[str]:
    import re

    seen: dict[str, None] = {}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]+", t.lower()):
            seen.setdefault(w, None)
    return list(seen)


CLIP_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]  # EOS id 3
CLIP_EXTRA_WORDS = (
    "a an the of is there what which colour color shape size object in image picture photo "
    "letter digit character on left right top bottom above below how many yes no"
)


def clip_tokenizer():
    words = words_of([*DESCRIPTIONS, CLIP_EXTRA_WORDS, *CHARS])
    return word_tokenizer(words, CLIP_SPECIALS, clip=True)


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def resume_from(path: Path, model, opt, resume: bool, stage: str) -> int:
    """Load model + optimiser state from ``path`` when resuming; the step to continue from."""
    if not (resume and path.exists()):
        return 0
    state = torch.load(path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    log(f"resumed stage {stage} at step {state['step']}")
    return state["step"]


def save_ckpt(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def int_list(text) -> list[int]:
    """``"1,2"`` -> [1, 2] (empty entries ignored)."""
    return [int(x) for x in str(text).split(",") if x.strip()]
