"""Train the offline demo model ``synth-llava`` on CPU: a CLIP-style pair, then a small LLaVA.

Usage (2 CPU cores; see the README for the measured time)::

    python scripts/train_tiny.py                 # all stages, work files under results/train_tiny/
    python scripts/train_tiny.py --resume        # continue from the last checkpoint
    python scripts/train_tiny.py --stage 2       # only the LLaVA stage (needs stage 1's output)

Stage 1 (vision): a ``CLIPVisionModel`` (CLS token, 192 px, 8 px patches -> 24 x 24 grid) and a
``CLIPTextModelWithProjection`` + ``visual_projection`` on SynthVQA scenes (seed 0). The main
training signal comes from AUXILIARY losses, documented here because they shape what compression
methods read:

- per-patch heads on the layer -2 output (LLaVA's feature layer): colour, shape, size, character
  of the object under the patch, or background (``PATCH_HEADS``); the heads are discarded;
- alignment: ``visual_projection`` of each last-layer patch state (before ``post_layernorm``, the
  ``P`` of RC) is classified against the text-tower embeddings of all object descriptions
  ("small red triangle", ..., "background") with a cosine-softmax (CLIP-style, per patch);
- CLS multi-label: ``post_layernorm(CLS)`` predicts which colour/shape pairs are present (a
  discarded linear head), so the last layer's CLS token attends to objects.

Most stage-1 steps run on 12 x 12-patch crops (their own position-embedding rows), 16x cheaper
attention than the full grid; the last steps run on full images.

Stage 2 (LLaVA): ``LlavaForConditionalGeneration`` with that tower frozen, a 2-layer GELU MLP
projector and a small Llama decoder, trained on questions from ``recomp_eval.synth.questions``
with loss on answer tokens, plus AUXILIARY losses (weights ``--s2-aux``, ``--s2-attn``):

- patch words: the final state of each image token predicts, through ``lm_head``, the colour and
  shape words of the object under it;
- grounding: at the position that predicts the answer, attention head 0 of decoder layer 0 is
  pulled onto the question words that name the object (``--s2-word-layers``) and head 0 of
  layers 1 and 2 onto that object's image tokens (``--s2-attn-layers``; -log attention mass).
  Without them a decoder this small did not learn to look up the object in 576 tokens (answer
  accuracy plateaued; existence collapsed to "no"); other heads stay free. Questions with no
  object (counts, absent objects) add no grounding term.

The decoder uses a long rotary period (``--llm-rope-theta``) so that most query/key dimensions
match by content across the image's ~600 positions. Prompts are rendered by the harness's own
``render_prompt`` (protocols ``llava15`` and ``lmms_eval``) with ``user_prompt``-style text. The
frozen features (layer -2, CLS dropped) are cached once. One image carries several questions in
one sequence: each question block attends to the shared prefix (system text + image tokens) and
causally to itself, with position ids continuing the prefix, so every block sees exactly the
single-question prompt of evaluation time.

Reproducible (fixed seeds, deterministic data by index), checkpointed every few minutes and
resumable. Output: ``models/synth-llava/`` (+ ``clip/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import train_tiny_clip as C
import train_tiny_llava as L
from train_tiny_common import (
    DESCRIPTIONS,  # noqa: F401  (re-exported, with IGNORE and patch_labels: the tests read them)
    IGNORE,  # noqa: F401
    N_PATCH,
    build_scenes,
    clip_tokenizer,
    int_list,
    log,
    normalise,
    patch_labels,  # noqa: F401
)

from recomp_eval.synth import scenes as S


# ----------------------------------------------------------------------------- stage 2 + save
def load_stage1(work: Path) -> tuple[torch.nn.Module, argparse.Namespace, object]:
    s1 = argparse.Namespace(**json.loads((work / "s1_args.json").read_text()))
    tok = clip_tokenizer()
    model = C.Stage1(s1, tok)
    model.load_state_dict(torch.load(work / "stage1.pt")["model"])
    return model.eval(), s1, tok


def build_llava(args, s1, tok, stage1: torch.nn.Module):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(args.seed)
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.llm_width,
        intermediate_size=4 * args.llm_width,
        num_hidden_layers=args.llm_layers,
        num_attention_heads=args.llm_heads,
        num_key_value_heads=args.llm_heads,
        max_position_embeddings=2048,
        # a long rotary period keeps most of the 32 query/key dims position-invariant across the
        # ~600 image positions, so a question token can match patches by content alone
        rope_parameters={"rope_type": "default", "rope_theta": args.llm_rope_theta},
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=C.vision_config(s1),
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        image_seq_length=N_PATCH,
    )
    llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower.load_state_dict(stage1.vision.state_dict())
    for p in llava.model.vision_tower.parameters():
        p.requires_grad_(False)
    return llava


@torch.no_grad()
def cache_features(llava, data, count: int, path: Path) -> torch.Tensor:
    """Frozen layer -2 features, CLS dropped: [count,576,C] float16 (cached on disk)."""
    if path.exists():
        feats = torch.load(path)
        if feats.shape[0] >= count:
            return feats[:count]
    tower = llava.model.vision_tower.eval()
    out = []
    for i in range(0, count, 32):
        pix = normalise(data["pixels"][i : min(count, i + 32)])
        hs = tower(pixel_values=pix, output_hidden_states=True).hidden_states
        out.append(hs[llava.config.vision_feature_layer][:, 1:].half())  # [b,576,C]
    feats = torch.cat(out)
    torch.save(feats, path)
    return feats


def fold_normalisation(llava, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make the projector take raw features: linear_1(x') with x' = (x - mean) / std."""
    lin = llava.model.multi_modal_projector.linear_1
    with torch.no_grad():
        w = lin.weight / std[None, :]  # [E,C]
        lin.bias.sub_(w @ mean)
        lin.weight.copy_(w)


def save_model(args, llava, tok, stage1: torch.nn.Module, clip_tok, s1, out: Path) -> None:
    from transformers import (
        CLIPConfig,
        CLIPModel,
    )

    out.mkdir(parents=True, exist_ok=True)
    llava.generation_config.pad_token_id = tok.pad_token_id
    llava.generation_config.eos_token_id = tok.eos_token_id
    llava.eval().save_pretrained(out)
    tok.save_pretrained(out)
    from recomp_eval.models.llava.tiny import build_processor

    processor = build_processor(tok, S.IMAGE_SIZE, S.PATCH)
    processor.save_pretrained(out)
    cfg = CLIPConfig(
        text_config=stage1.text.config.to_dict(),
        vision_config=C.vision_config(s1).to_dict(),
        projection_dim=s1.proj_dim,
    )
    clip = CLIPModel(cfg).eval()
    clip.text_model.load_state_dict(stage1.text.text_model.state_dict())
    clip.text_projection.load_state_dict(stage1.text.text_projection.state_dict())
    clip.vision_model.load_state_dict(stage1.vision.state_dict())
    clip.visual_projection.load_state_dict(stage1.visual_projection.state_dict())
    clip.save_pretrained(out / "clip")
    clip_tok.save_pretrained(out / "clip")
    log(f"saved {out}")


def run_stage2(args, work: Path) -> None:
    stage1, s1, clip_tok = load_stage1(work)
    tok = L.llava_tokenizer(args.seed)
    llava = build_llava(args, s1, tok, stage1)
    data = build_scenes(args.seed, args.s2_images, work / "scenes.pt")
    feats = cache_features(llava, data, args.s2_images, work / "features.pt")
    flat = feats.float().flatten(0, 1)  # [n*576,C]
    mean, std = flat.mean(0), flat.std(0).clamp(min=1e-4)
    log(f"stage 2: {feats.shape[0]} feature maps cached; vocab {len(tok)}")
    if args.stage == "save":  # export the latest stage-2 checkpoint as it is
        llava.load_state_dict(torch.load(work / "stage2.pt")["model"])
    else:
        L.train(args, work, llava, tok, feats, mean, std, data["labels"])
    fold_normalisation(llava, mean, std)
    save_model(args, llava, tok, stage1, clip_tok, s1, Path(args.out))


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="results/train_tiny")
    p.add_argument("--out", default="models/synth-llava")
    p.add_argument("--stage", default="all", choices=["all", "1", "2", "save"])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=float, default=180.0, help="seconds between checkpoints")
    p.add_argument("--log-every", type=int, default=25)
    # stage 1
    p.add_argument("--vit-width", type=int, default=128)
    p.add_argument("--vit-layers", type=int, default=5)
    p.add_argument("--vit-heads", type=int, default=4)
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument("--proj-dim", type=int, default=64)
    p.add_argument("--s1-scenes", type=int, default=6000)
    p.add_argument("--s1-steps", type=int, default=2000)
    p.add_argument("--s1-batch", type=int, default=32)
    p.add_argument("--s1-batch-full", type=int, default=8)
    p.add_argument("--s1-crop", type=int, default=10, help="crop side in patches")
    p.add_argument("--s1-full-share", type=float, default=0.1)
    p.add_argument("--s1-lr", type=float, default=2e-3)
    p.add_argument("--s1-warmup", type=int, default=100)
    # stage 2
    p.add_argument("--llm-width", type=int, default=128)
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--llm-heads", type=int, default=4)
    p.add_argument("--llm-rope-theta", type=float, default=1e6)
    p.add_argument("--s2-images", type=int, default=3000)
    p.add_argument("--s2-steps", type=int, default=3000)
    p.add_argument("--s2-batch", type=int, default=2)
    p.add_argument("--s2-questions", type=int, default=40, help="question blocks per image")
    p.add_argument("--s2-lr", type=float, default=2e-3)
    p.add_argument("--s2-warmup", type=int, default=30)
    p.add_argument("--s2-aux", type=float, default=0.5, help="patch-word auxiliary loss weight")
    p.add_argument("--s2-attn", type=float, default=1.0, help="grounding auxiliary loss weight")
    p.add_argument("--s2-attn-layers", default="1,2", help="decoder layers whose head 0 is "
                   "supervised to attend to the asked-about object")  # fmt: skip
    p.add_argument("--s2-word-layers", default="0", help="decoder layers whose head 0 is "
                   "supervised to attend to the question words naming the object")  # fmt: skip
    return p.parse_args(argv)


def check_args(args) -> None:
    """One-line errors (SystemExit) for arguments that would fail deep inside a stage."""
    work = Path(args.work)
    if args.stage in ("2", "save") and not (work / "stage1.pt").exists():
        sys.exit(f"train_tiny: no stage-1 output in {work}; run --stage 1 (or --stage all) first, "
                 f"or pass the --work folder that holds stage1.pt")  # fmt: skip
    if args.stage == "save" and not (work / "stage2.pt").exists():
        sys.exit(f"train_tiny: no stage-2 checkpoint in {work} to save; run --stage 2 first")
    try:
        layers = int_list(args.s2_attn_layers) + int_list(args.s2_word_layers)
    except ValueError:
        layers = [-1]
    if len(set(layers)) < len(layers) or any(not 0 <= i < args.llm_layers for i in layers):
        sys.exit(f"train_tiny: --s2-attn-layers {args.s2_attn_layers!r} and --s2-word-layers "
                 f"{args.s2_word_layers!r} must be distinct decoder layers in "
                 f"0..{args.llm_layers - 1}, comma-separated")  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / ".gitignore").write_text("*\n")
    (work / "args.json").write_text(json.dumps(vars(args), indent=1))
    if args.stage in ("all", "1") and not (args.resume and (work / "s1_args.json").exists()):
        (work / "s1_args.json").write_text(json.dumps(vars(args), indent=1))
    if args.stage in ("all", "1"):
        C.run_stage1(args, work)
    if args.stage in ("all", "2", "save"):
        run_stage2(args, work)


if __name__ == "__main__":
    main()
