"""Stage 1 of ``scripts/train_tiny.py``: the CLIP-style vision and text towers and their
auxiliary losses (see that script's docstring for the recipe).

Imported by ``train_tiny.py`` (run that script); imports only ``train_tiny_common`` of its siblings.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from train_tiny_common import (
    DESCRIPTIONS,
    GRID,
    HEAD_WEIGHTS,
    IGNORE,
    N_PAIRS,
    PATCH_HEADS,
    build_scenes,
    clip_tokenizer,
    log,
    lr_at,
    normalise,
    resume_from,
    save_ckpt,
)

from recomp_eval.synth import scenes as S


def vision_config(args):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=args.vit_width,
        intermediate_size=4 * args.vit_width,
        num_hidden_layers=args.vit_layers,
        num_attention_heads=args.vit_heads,
        image_size=S.IMAGE_SIZE,
        patch_size=S.PATCH,
        projection_dim=args.proj_dim,
    )


def text_config(args, tok):
    from recomp_eval.models.llava.tiny import clip_text_config

    return clip_text_config(tok, args.text_width, args.proj_dim)


class Stage1(torch.nn.Module):
    """Vision tower + text tower + visual projection + discarded auxiliary heads."""

    def __init__(self, args, tok):
        super().__init__()
        from transformers import CLIPTextModelWithProjection, CLIPVisionModel

        self.vision = CLIPVisionModel(vision_config(args))
        self.text = CLIPTextModelWithProjection(text_config(args, tok))
        c = args.vit_width
        self.visual_projection = torch.nn.Linear(c, args.proj_dim, bias=False)
        self.head_norm = torch.nn.LayerNorm(c)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(c, n) for k, n in PATCH_HEADS.items()})
        self.cls_head = torch.nn.Linear(c, N_PAIRS)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))


def tower_states(vision, pixels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
    """Run the CLIP vision tower on a crop with its own position rows.

    Args:
        pixels: [B,3,h*P,w*P] normalised crop.
        rows, cols: [B] top-left patch of the crop in the 24 x 24 grid.
    Returns:
        hidden states list (embeddings after pre-LN, then each layer), each [B,1+h*w,C].
    """
    emb = vision.embeddings
    b = pixels.shape[0]
    patches = emb.patch_embedding(pixels)  # [B,C,h,w]
    h, w = patches.shape[-2:]
    x = patches.flatten(2).transpose(1, 2)  # [B,h*w,C]
    r = rows[:, None, None] + torch.arange(h)[None, :, None]  # [B,h,1]
    c = cols[:, None, None] + torch.arange(w)[None, None, :]  # [B,1,w]
    pos = (1 + r * GRID + c).reshape(b, -1)  # [B,h*w]
    x = x + emb.position_embedding(pos)
    cls = emb.class_embedding + emb.position_embedding.weight[0]  # [C]
    x = torch.cat([cls.expand(b, 1, -1), x], dim=1)  # [B,1+h*w,C]
    x = vision.pre_layrnorm(x)
    states = [x]
    for layer in vision.encoder.layers:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
        states.append(x)
    return states


def stage1_loss(model: Stage1, pixels, labels, rows, cols, text_ids, text_mask):
    """Auxiliary losses (see module docstring). labels: [B,n,5]. Returns (loss, metrics)."""
    states = tower_states(model.vision, pixels, rows, cols)
    feat = model.head_norm(states[-2][:, 1:])  # [B,n,C] layer -2 output
    metrics, loss = {}, 0.0
    for j, (name, head) in enumerate(model.heads.items()):
        target = labels[..., j].long()  # [B,n]
        if name == "char":  # only where an object is
            target = torch.where(labels[..., 1] == PATCH_HEADS["shape"] - 1, IGNORE, target)
        logits = head(feat)  # [B,n,K]
        is_obj = (labels[..., 1] >= 0) & (labels[..., 1] < PATCH_HEADS["shape"] - 1)
        weight = torch.where(is_obj, 1.0, 0.3)  # objects are ~20 % of patches
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none",
                             ignore_index=IGNORE)  # fmt: skip
        valid = (target.flatten() != IGNORE).float()
        wv = weight.flatten() * valid
        loss = loss + HEAD_WEIGHTS[name] * (ce * wv).sum() / wv.sum().clamp(min=1)
        ok = (logits.argmax(-1) == target) & is_obj & (target != IGNORE)
        metrics[f"{name}_obj_acc"] = (ok.sum() / (is_obj & (target != IGNORE)).sum()).item()
    # alignment: projected last-layer patch state vs description text embeddings
    text = model.text(input_ids=text_ids, attention_mask=text_mask).text_embeds  # [T,D]
    proj = model.visual_projection(states[-1][:, 1:])  # [B,n,D]
    sim = F.normalize(proj, dim=-1) @ F.normalize(text, dim=-1).T  # [B,n,T]
    logits = sim * model.logit_scale.exp()
    target = labels[..., 4].long()  # [B,n]
    is_obj = target < len(DESCRIPTIONS) - 1
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none",
                         ignore_index=IGNORE)  # fmt: skip
    w = torch.where(is_obj, 1.0, 0.3).flatten() * (target.flatten() != IGNORE).float()
    loss = loss + (ce * w).sum() / w.sum()
    metrics["align_obj_acc"] = ((logits.argmax(-1) == target) & is_obj).sum().item() / max(
        1, is_obj.sum().item()
    )
    # CLS multi-label: which (colour, shape) pairs are present
    pair = labels[..., 0].long() * len(S.SHAPES) + labels[..., 1].long()  # [B,n]
    obj_patch = (labels[..., 1] >= 0) & (labels[..., 1] < len(S.SHAPES))
    present = torch.zeros(pair.shape[0], N_PAIRS)
    present.scatter_add_(1, torch.where(obj_patch, pair, 0), obj_patch.float())
    present = (present >= 2).float()  # [B,24]
    cls = model.vision.post_layernorm(states[-1][:, 0])  # [B,C]
    cls_logits = model.cls_head(cls)
    loss = loss + F.binary_cross_entropy_with_logits(cls_logits, present)
    metrics["cls_acc"] = ((cls_logits > 0).float() == present).float().mean().item()
    return loss, metrics


def run_stage1(args, work: Path) -> None:
    torch.manual_seed(args.seed)
    tok = clip_tokenizer()
    data = build_scenes(args.seed, args.s1_scenes, work / "scenes.pt")
    log(f"stage 1: {args.s1_scenes} scenes ready")
    model = Stage1(args, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=args.s1_lr, weight_decay=0.05)
    ckpt = work / "stage1.pt"
    step = resume_from(ckpt, model, opt, args.resume, "1")
    text = tok(DESCRIPTIONS, padding=True, return_tensors="pt")
    total, crop = args.s1_steps, args.s1_crop
    full_from = int(total * (1 - args.s1_full_share))
    last_save, t0, hist, start = time.time(), time.time(), [], step
    model.train()
    while step < total:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        full = step >= full_from
        bs = args.s1_batch_full if full else args.s1_batch
        idx = torch.randint(0, data["pixels"].shape[0], (bs,), generator=g)
        side = GRID if full else crop
        rows = torch.randint(0, GRID - side + 1, (bs,), generator=g)
        cols = torch.randint(0, GRID - side + 1, (bs,), generator=g)
        pix = torch.stack([
            data["pixels"][i, :, r * S.PATCH:(r + side) * S.PATCH, c * S.PATCH:(c + side) * S.PATCH]
            for i, r, c in zip(idx.tolist(), rows.tolist(), cols.tolist())
        ])  # fmt: skip
        lab = torch.stack([
            data["labels"][i].view(GRID, GRID, 5)[r:r + side, c:c + side].reshape(-1, 5)
            for i, r, c in zip(idx.tolist(), rows.tolist(), cols.tolist())
        ])  # fmt: skip
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.s1_lr, args.s1_warmup)
        loss, m = stage1_loss(
            model, normalise(pix), lab, rows, cols, text["input_ids"], text["attention_mask"]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        hist.append({"loss": loss.item(), **m})
        if step % args.log_every == 0 or step == total:
            avg = {k: sum(h[k] for h in hist) / len(hist) for k in hist[0]}
            hist = []
            rate = (step - start) / max(1e-9, time.time() - t0)
            log(f"s1 step {step}/{total} full={full} " + " ".join(
                f"{k}={v:.3f}" for k, v in avg.items()) + f" ({rate:.2f} step/s)")  # fmt: skip
        if time.time() - last_save > args.save_every or step == total:
            save_ckpt(ckpt, model=model.state_dict(), opt=opt.state_dict(), step=step)
            last_save = time.time()
    log("stage 1 done")
