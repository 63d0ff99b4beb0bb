"""Stage 2 of ``scripts/train_tiny.py``: the LLaVA model on cached frozen features, and saving.

Imported by ``train_tiny.py`` (run that script); see its docstring for the recipe.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import train_tiny as T

from recomp_eval.benchmarks.prompts import MME_BUILTIN_SUFFIX
from recomp_eval.benchmarks.prompts import render_prompt as user_text
from recomp_eval.models.conversation import VICUNA_V1_SYSTEM
from recomp_eval.models.conversation import render_prompt as full_prompt
from recomp_eval.models.tiny import CHAT_TEMPLATE
from recomp_eval.synth import questions as Q
from recomp_eval.synth import scenes as S
from recomp_eval.synth.builders import ocr_tokens

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
PROTOCOL_SHARE = {"llava15": 0.7, "lmms_eval": 0.3}
STRATEGIES = ("random", "popular", "adversarial")
GATE_FAMILIES = ("colour", "shape", "exist", "relation", "ocr_ref")


def scene_questions(seed: int, index: int, scene: S.Scene) -> list[tuple[str, str, str]]:
    """(benchmark, question, answer) for every question the harness could ask about a scene."""
    rng = np.random.default_rng([seed, index, 2])
    out = [
        ("textvqa" if q.family in ("ocr", "ocr_ref") else "gqa", q.question, q.answer)
        for q in Q.questions_for_scene(scene, rng)
    ]
    strategy = STRATEGIES[index % len(STRATEGIES)]
    out += [("pope", q.question, q.answer) for q in Q.yes_no_questions(scene, rng, strategy, 6)]
    for yes, no in Q.mme_pairs(scene, rng).values():
        out += [("mme", yes.question, yes.answer), ("mme", no.question, no.answer)]
    return out


def family_of(question: str) -> str:
    q = question.lower()
    if q.startswith(("is there", "is the")):
        return "yesno" if "small or large" not in q and " or " not in q else "choice"
    return "open"


def build_vocab(seed: int, n_scenes: int) -> list[str]:
    texts = [VICUNA_V1_SYSTEM, "USER: ASSISTANT:", "Answer the question using a single word or "
             "phrase.", "Reference OCR token: , ", MME_BUILTIN_SUFFIX]  # fmt: skip
    texts += list(S.COLOURS) + list(S.SHAPES) + list(S.SIZES) + list(S.CHARACTERS)
    texts += list(Q.NUMBER_WORDS) + [" ".join(v) for v in Q._VARIANTS.values()]
    texts += [str(i) for i in range(20)] + ["yes no left right top bottom above below"]
    for i in range(n_scenes):
        scene = S.make_scene(seed, i)
        texts += [q for _, q, _ in scene_questions(seed, i, scene)]
    return T.words_of(texts)


def llava_tokenizer(seed: int):
    tok = T.word_tokenizer(build_vocab(seed, 300), LLAVA_SPECIALS, clip=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def encode_block(tok, protocol: str, bench: str, question: str, answer: str, scene: S.Scene):
    """Token ids (prefix, suffix, answer) of one question exactly as evaluation renders it."""
    meta = {"ocr_tokens": ocr_tokens(scene)} if bench == "textvqa" else None
    text = user_text(bench, question, protocol, meta)
    prompt = full_prompt(protocol, text, tok, None, "<image>")
    ids = tok(prompt)["input_ids"]
    k = ids.index(tok.convert_tokens_to_ids("<image>"))
    ans = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids[:k], ids[k + 1 :], ans


def make_example(tok, seed: int, index: int, visit: int, k: int):
    """One training sequence (image ``index``): prefix, image slot, ``k`` question blocks.

    Returns (ids [L], is_image [L], block [L] (-1 prefix), positions [L], labels [L]).
    """
    scene = S.make_scene(seed, index)
    rng = np.random.default_rng([seed, index, visit])
    protocol = "llava15" if rng.random() < PROTOCOL_SHARE["llava15"] else "lmms_eval"
    qs = scene_questions(seed, index * 1000 + visit, scene)
    gate = [q for q in qs if q[0] in ("pope", "mme") or family_of(q[1]) == "open"]
    order = list(rng.permutation(len(gate))) + [len(gate) + i for i in rng.permutation(len(qs))]
    pool = gate + qs
    picked = [pool[i] for i in order[:k]]
    ids, is_img, block, labels = [], [], [], []
    prefix = None
    for b, (bench, question, answer) in enumerate(picked):
        pre, suf, ans = encode_block(tok, protocol, bench, question, answer, scene)
        if prefix is None:
            prefix = pre
            ids += pre + [tok.pad_token_id] * T.N_PATCH
            is_img += [False] * len(pre) + [True] * T.N_PATCH
            block += [-1] * (len(pre) + T.N_PATCH)
            labels += [T.IGNORE] * (len(pre) + T.N_PATCH)
        assert pre == prefix, "prompt prefix differs between questions"
        ids += suf + ans
        is_img += [False] * (len(suf) + len(ans))
        block += [b] * (len(suf) + len(ans))
        # predict answer token j at the position before it; the final EOS position has no target
        labels += [T.IGNORE] * (len(suf) - 1) + ans + [T.IGNORE]
    base = len(prefix) + T.N_PATCH
    pos, offsets = [], {}
    for i, b in enumerate(block):
        if b < 0:
            pos.append(i)
        else:
            offsets.setdefault(b, i)
            pos.append(base + i - offsets[b])
    return ids, is_img, block, pos, labels


def collate(examples, pad_id: int):
    """Right-pad to the longest; block mask [B,1,L,L] (additive float)."""
    n = max(len(e[0]) for e in examples)
    out = {k: [] for k in ("ids", "img", "block", "pos", "labels")}
    for ids, img, block, pos, labels in examples:
        pad = n - len(ids)
        out["ids"].append(ids + [pad_id] * pad)
        out["img"].append(img + [False] * pad)
        out["block"].append(block + list(range(10_000, 10_000 + pad)))  # pads: own blocks
        out["pos"].append(pos + [0] * pad)
        out["labels"].append(labels + [T.IGNORE] * pad)
    t = {k: torch.tensor(v) for k, v in out.items()}
    blk = t["block"]  # [B,L]
    causal = torch.ones(n, n, dtype=torch.bool).tril()  # [L,L]
    same = (blk[:, :, None] == blk[:, None, :]) | (blk[:, None, :] < 0)  # [B,L,L]
    allowed = causal[None] & same
    t["mask"] = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )[:, None]  # [B,1,L,L]
    return t


def patch_word_targets(tok, labels: torch.Tensor) -> torch.Tensor:
    """Per-patch answer words [B,576,2] (colour word id, shape word id; IGNORE off objects).

    labels: [B,576,5] stage-1 patch labels (colour, shape, size, char, description).
    """
    colour_ids = torch.tensor(tok.convert_tokens_to_ids(list(T.COLOURS)))  # [6]
    shape_ids = torch.tensor(tok.convert_tokens_to_ids(list(S.SHAPES)))  # [4]
    c, s = labels[..., 0].long(), labels[..., 1].long()  # [B,576]
    on = (s >= 0) & (s < len(S.SHAPES))
    cw = torch.where(on, colour_ids[c.clamp(0, len(T.COLOURS) - 1)], T.IGNORE)
    sw = torch.where(on, shape_ids[s.clamp(0, len(S.SHAPES) - 1)], T.IGNORE)
    return torch.stack([cw, sw], dim=-1)


def stage2_loss(llava, feats_norm, batch, patch_words=None, aux_weight: float = 0.0):
    """Answer-token cross-entropy (+ optional auxiliary patch-word loss).

    feats_norm: [B,576,C] standardised layer -2 features. patch_words: [B,576,2] word ids the
    final state of each image token should predict through ``lm_head`` (its object's colour and
    shape words): an AUXILIARY loss that puts answer words into the visual tokens' states.
    """
    lm = llava.model.language_model
    emb = lm.embed_tokens(batch["ids"])  # [B,L,E]
    img = llava.model.multi_modal_projector(feats_norm)  # [B,576,E]
    emb = emb.masked_scatter(batch["img"][..., None], img.to(emb.dtype))
    hidden = lm(
        inputs_embeds=emb, attention_mask=batch["mask"], position_ids=batch["pos"]
    ).last_hidden_state  # [B,L,E]
    sel = batch["labels"] != T.IGNORE  # [B,L]
    logits = llava.lm_head(hidden[sel])  # [M,V]
    target = batch["labels"][sel]
    loss = F.cross_entropy(logits, target)
    if patch_words is not None and aux_weight > 0:
        h_img = hidden[batch["img"]]  # [B*576,E] raster order per sample
        words = patch_words.reshape(-1, 2)  # [B*576,2]
        keep = words[:, 0] != T.IGNORE
        img_logits = llava.lm_head(h_img[keep])  # [K,V]
        aux = F.cross_entropy(img_logits, words[keep, 0]) + F.cross_entropy(
            img_logits, words[keep, 1]
        )
        loss = loss + aux_weight * aux
    return loss, (logits.argmax(-1) == target).float().mean().item()


def lr_at(step, total, base, warmup, floor=0.05):
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(args, work: Path, llava, tok, feats, mean, std, labels) -> None:
    opt = torch.optim.AdamW(
        [p for n, p in llava.named_parameters() if "vision_tower" not in n],
        lr=args.s2_lr,
        weight_decay=0.01,
    )
    ckpt = work / "stage2.pt"
    step = 0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt)
        llava.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        T.log(f"resumed stage 2 at step {step}")
    n_img = feats.shape[0]
    total, bs = args.s2_steps, args.s2_batch
    last_save, t0, hist, start = time.time(), time.time(), [], step
    llava.train()
    while step < total:
        g = torch.Generator().manual_seed(args.seed * 7_000_003 + step)
        idx = torch.randint(0, n_img, (bs,), generator=g).tolist()
        ex = [make_example(tok, args.seed, i, step, args.s2_questions) for i in idx]
        batch = collate(ex, tok.pad_token_id)
        fn = (feats[idx].float() - mean) / std  # [B,576,C]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.s2_lr, args.s2_warmup)
        words = patch_word_targets(tok, labels[idx])
        loss, acc = stage2_loss(llava, fn, batch, words, args.s2_aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llava.parameters(), 1.0)
        opt.step()
        step += 1
        hist.append((loss.item(), acc))
        if step % args.log_every == 0 or step == total:
            ls, ac = np.mean([h[0] for h in hist]), np.mean([h[1] for h in hist])
            hist = []
            rate = (time.time() - t0) / max(1, step - start)
            T.log(f"s2 step {step}/{total} loss={ls:.3f} tok_acc={ac:.3f} ({rate:.2f} s/step)")
        if time.time() - last_save > args.save_every or step == total:
            T.save_ckpt(ckpt, model=llava.state_dict(), opt=opt.state_dict(), step=step)
            last_save = time.time()
    T.log("stage 2 done")
