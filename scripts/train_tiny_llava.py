"""Stage 2 of ``scripts/train_tiny.py``: the LLaVA model on cached frozen features, and saving.

Imported by ``train_tiny.py`` (run that script); see its docstring for the recipe. Imports only
``train_tiny_common`` of its siblings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from train_tiny_common import (
    COLOURS,
    DESCRIPTIONS,
    IGNORE,
    N_PATCH,
    int_list,
    log,
    lr_at,
    resume_from,
    save_ckpt,
    word_tokenizer,
    words_of,
)

from recomp_eval.benchmarks.prompts import MME_BUILTIN_SUFFIX
from recomp_eval.benchmarks.prompts import render_prompt as user_text
from recomp_eval.benchmarks.specs import protocol_spec
from recomp_eval.models.llava.conversation import render_prompt as full_prompt
from recomp_eval.models.llava.tiny import CHAT_TEMPLATE
from recomp_eval.synth import questions as Q
from recomp_eval.synth import scenes as S
from recomp_eval.synth.builders import ocr_tokens

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
NAME_WORDS = {*S.COLOURS, *S.SHAPES, *S.SIZES}  # words that name an object in a question
PROTOCOL_SHARE = {"llava15": 0.7, "lmms_eval": 0.3}
STRATEGIES = ("random", "popular", "adversarial")


def scene_questions(seed: int, index: int, scene: S.Scene) -> list[tuple[str, str, str, str]]:
    """(benchmark, question, answer, target) for every question the harness could ask about a
    scene; ``target`` is the full description of the object the question is about ("" if none)."""
    rng = np.random.default_rng([seed, index, 2])
    out = [
        ("textvqa" if q.family in ("ocr", "ocr_ref") else "gqa", q.question, q.answer, q.target)
        for q in Q.questions_for_scene(scene, rng)
    ]
    strategy = STRATEGIES[index % len(STRATEGIES)]
    out += [("pope", q.question, q.answer, q.target)
            for q in Q.yes_no_questions(scene, rng, strategy, 6)]  # fmt: skip
    for pair in Q.mme_pairs(scene, rng).values():
        out += [("mme", q.question, q.answer, q.target) for q in pair]
    return [(b, q, a, t or "") for b, q, a, t in out]


def family_of(question: str) -> str:
    q = question.lower()
    if q.startswith(("is there", "is the")):
        return "yesno" if "small or large" not in q and " or " not in q else "choice"
    return "open"


def build_vocab(seed: int, n_scenes: int) -> list[str]:
    texts = [protocol_spec("llava15").system_prompt, "USER: ASSISTANT:", "Answer the question using a single word or "
             "phrase.", "Reference OCR token: , ", MME_BUILTIN_SUFFIX]  # fmt: skip
    texts += list(S.COLOURS) + list(S.SHAPES) + list(S.SIZES) + list(S.CHARACTERS)
    texts += list(Q.NUMBER_WORDS) + [" ".join(v) for v in Q._VARIANTS.values()]
    texts += [str(i) for i in range(20)] + ["yes no left right top bottom above below"]
    for i in range(n_scenes):
        scene = S.make_scene(seed, i)
        texts += [q for _, q, _, _ in scene_questions(seed, i, scene)]
    return words_of(texts)


def llava_tokenizer(seed: int):
    tok = word_tokenizer(build_vocab(seed, 300), LLAVA_SPECIALS, clip=False)
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

    Returns (ids [L], is_image [L], block [L] (-1 prefix), positions [L], labels [L],
    query rows [k] (position predicting each block's first answer token), targets [k]
    (``DESCRIPTIONS`` index of the object the block asks about, -1 if none), words [k] (positions
    of the question words naming that object, or of the colour/shape asked about in an
    existence question)).
    """
    scene = S.make_scene(seed, index)
    rng = np.random.default_rng([seed, index, visit])
    protocol = "llava15" if rng.random() < PROTOCOL_SHARE["llava15"] else "lmms_eval"
    qs = scene_questions(seed, index * 1000 + visit, scene)
    gate = [q for q in qs if q[0] in ("pope", "mme") or family_of(q[1]) == "open"]
    order = list(rng.permutation(len(gate))) + [len(gate) + i for i in rng.permutation(len(qs))]
    pool = gate + qs
    picked = [pool[i] for i in order[:k]]
    ids, is_img, block, labels, rows, targets, words = [], [], [], [], [], [], []
    prefix = None
    for b, (bench, question, answer, target) in enumerate(picked):
        pre, suf, ans = encode_block(tok, protocol, bench, question, answer, scene)
        if prefix is None:
            prefix = pre
            ids += pre + [tok.pad_token_id] * N_PATCH
            is_img += [False] * len(pre) + [True] * N_PATCH
            block += [-1] * (len(pre) + N_PATCH)
            labels += [IGNORE] * (len(pre) + N_PATCH)
        assert pre == prefix, "prompt prefix differs between questions"
        rows.append(len(ids) + len(suf) - 1)
        targets.append(DESCRIPTIONS.index(target) if target else -1)
        naming = set(target.split()) if target else set()
        if not naming and question.lower().startswith("is there"):
            naming = NAME_WORDS
        toks = tok.convert_ids_to_tokens(suf)
        words.append([len(ids) + j for j, w in enumerate(toks) if w in naming])
        ids += suf + ans
        is_img += [False] * (len(suf) + len(ans))
        block += [b] * (len(suf) + len(ans))
        # predict answer token j at the position before it; the final EOS position has no target
        labels += [IGNORE] * (len(suf) - 1) + ans + [IGNORE]
    base = len(prefix) + N_PATCH
    pos, offsets = [], {}
    for i, b in enumerate(block):
        if b < 0:
            pos.append(i)
        else:
            offsets.setdefault(b, i)
            pos.append(base + i - offsets[b])
    return ids, is_img, block, pos, labels, rows, targets, words


def collate(examples, pad_id: int):
    """Right-pad to the longest; block mask [B,1,L,L] (additive float)."""
    n = max(len(e[0]) for e in examples)
    out = {k: [] for k in ("ids", "img", "block", "pos", "labels")}
    k = max(len(e[5]) for e in examples)
    out["rows"] = [e[5] + [0] * (k - len(e[5])) for e in examples]  # [B,K]
    out["targets"] = [e[6] + [-1] * (k - len(e[6])) for e in examples]  # [B,K]
    g = max(1, max(len(w) for e in examples for w in e[7]))
    out["words"] = [
        [w + [-1] * (g - len(w)) for w in e[7]] + [[-1] * g] * (k - len(e[7])) for e in examples
    ]  # [B,K,G] fmt: skip
    for ids, img, block, pos, labels, *_ in examples:
        pad = n - len(ids)
        out["ids"].append(ids + [pad_id] * pad)
        out["img"].append(img + [False] * pad)
        out["block"].append(block + list(range(10_000, 10_000 + pad)))  # pads: own blocks
        out["pos"].append(pos + [0] * pad)
        out["labels"].append(labels + [IGNORE] * pad)
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
    colour_ids = torch.tensor(tok.convert_tokens_to_ids(list(COLOURS)))  # [6]
    shape_ids = torch.tensor(tok.convert_tokens_to_ids(list(S.SHAPES)))  # [4]
    c, s = labels[..., 0].long(), labels[..., 1].long()  # [B,576]
    on = (s >= 0) & (s < len(S.SHAPES))
    cw = torch.where(on, colour_ids[c.clamp(0, len(COLOURS) - 1)], IGNORE)
    sw = torch.where(on, shape_ids[s.clamp(0, len(S.SHAPES) - 1)], IGNORE)
    return torch.stack([cw, sw], dim=-1)


def attention_mass(attn, hidden, cos, sin, rows, mask, hit, head: int = 0):
    """log attention mass that ``head`` of ``attn`` puts on the ``hit`` keys at query ``rows``.

    hidden: [B,L,E] input of the attention module; cos, sin: [B,L,d] its rotary tables;
    rows: [B,K] query positions; mask: [B,1,L,L] additive; hit: [B,K,L] bool.
    Returns [B,K] (-inf where ``hit`` is empty).
    """
    from transformers.models.llama.modeling_llama import rotate_half

    d, (_, n, e) = attn.head_dim, hidden.shape
    cut = slice(head * d, (head + 1) * d)
    at_rows = rows[..., None]
    q = F.linear(hidden.gather(1, at_rows.expand(-1, -1, e)), attn.q_proj.weight[cut])  # [B,K,d]
    q = q * cos.gather(1, at_rows.expand(-1, -1, d)) + rotate_half(q) * sin.gather(
        1, at_rows.expand(-1, -1, d)
    )
    k = F.linear(hidden, attn.k_proj.weight[cut])  # [B,L,d] (LLaMA projections have no bias)
    k = k * cos + rotate_half(k) * sin
    logits = (q @ k.transpose(1, 2)) * attn.scaling  # [B,K,L]
    logp = (logits + mask[:, 0].gather(1, at_rows.expand(-1, -1, n))).log_softmax(-1)
    return logp.masked_fill(~hit, float("-inf")).logsumexp(-1)


def grounding_targets(batch, patch_desc) -> dict[str, torch.Tensor]:
    """Key masks [B,K,L] of the two AUXILIARY attention losses.

    ``patches``: image positions of the object each block asks about (``patch_desc`` [B,576]:
    ``DESCRIPTIONS`` index under each patch); ``words``: the question words naming it.
    """
    b, n = batch["ids"].shape
    where = torch.full((b, n), -2, dtype=torch.long)  # [B,L] description id per image position
    where[batch["img"]] = patch_desc.reshape(-1).long()
    patches = where[:, None, :] == batch["targets"][..., None]  # [B,K,L]
    pos = batch["words"]  # [B,K,G]
    words = torch.zeros(patches.shape, dtype=torch.long)
    words.scatter_add_(2, pos.clamp(min=0), (pos >= 0).long())
    return {"patches": patches, "words": words > 0}


def stage2_loss(llava, feats_norm, batch, patch_words=None, aux_weight: float = 0.0,
                grounding=None, patch_desc=None, attn_weight: float = 0.0):  # fmt: skip
    """Answer-token cross-entropy (+ optional auxiliary patch-word loss).

    feats_norm: [B,576,C] standardised layer -2 features. patch_words: [B,576,2] word ids the
    final state of each image token should predict through ``lm_head`` (its object's colour and
    shape words): an AUXILIARY loss that puts answer words into the visual tokens' states.
    grounding: {layer index: (attention module, captured inputs, target kind)} filled by the
    pre-hooks of :func:`train` during the forward pass; with ``patch_desc`` [B,576] it adds
    ``attn_weight`` x (-log attention mass of head 0 at each answer position on its target): the
    question words naming the object (kind ``words``) or the object's patches (``patches``).
    Returns (loss, answer-token accuracy, [mean attention mass on the words, on the patches]).
    """
    lm = llava.model.language_model
    emb = lm.embed_tokens(batch["ids"])  # [B,L,E]
    img = llava.model.multi_modal_projector(feats_norm)  # [B,576,E]
    emb = emb.masked_scatter(batch["img"][..., None], img.to(emb.dtype))
    hidden = lm(
        inputs_embeds=emb, attention_mask=batch["mask"], position_ids=batch["pos"]
    ).last_hidden_state  # [B,L,E]
    sel = batch["labels"] != IGNORE  # [B,L]
    logits = llava.lm_head(hidden[sel])  # [M,V]
    target = batch["labels"][sel]
    loss = F.cross_entropy(logits, target)
    if patch_words is not None and aux_weight > 0:
        h_img = hidden[batch["img"]]  # [B*576,E] raster order per sample
        words = patch_words.reshape(-1, 2)  # [B*576,2]
        keep = words[:, 0] != IGNORE
        img_logits = llava.lm_head(h_img[keep])  # [K,V]
        aux = F.cross_entropy(img_logits, words[keep, 0]) + F.cross_entropy(
            img_logits, words[keep, 1]
        )
        loss = loss + aux_weight * aux
    masses: dict[str, list[float]] = {"words": [], "patches": []}
    hits = grounding_targets(batch, patch_desc) if grounding else {}
    for attn, seen, kind in (grounding or {}).values():
        hit = hits[kind]
        valid = hit.any(-1)  # [B,K] blocks with a target
        if not valid.any():
            continue
        logm = attention_mass(attn, seen["hidden"], *seen["rope"], batch["rows"],
                              batch["mask"], hit)[valid]  # fmt: skip
        loss = loss - attn_weight * logm.mean()
        masses[kind].append(logm.exp().mean().item())
    mass = [float(np.mean(v)) if v else 0.0 for v in masses.values()]  # words, patches
    return loss, (logits.argmax(-1) == target).float().mean().item(), mass


@contextmanager
def attention_inputs(llava, kinds: dict[int, str]) -> Iterator[dict]:
    """Forward pre-hooks that keep the inputs (hidden states, rotary tables) of the attention
    modules of the decoder layers in ``kinds`` ({layer: "words" | "patches"}) for the grounding
    losses; removed on exit. Yields {layer: (attention module, captured inputs, kind)}."""
    layers = llava.model.language_model.layers
    grounding, handles = {}, []
    try:
        for i, kind in kinds.items():
            seen: dict = {}

            def capture(module, a, kw, seen=seen):
                seen["hidden"] = kw["hidden_states"] if "hidden_states" in kw else a[0]
                seen["rope"] = kw["position_embeddings"]

            attn = layers[i].self_attn
            handles.append(attn.register_forward_pre_hook(capture, with_kwargs=True))
            grounding[i] = (attn, seen, kind)
        yield grounding
    finally:
        for h in handles:
            h.remove()


def grounding_layers(args) -> dict[int, str]:
    """{decoder layer: target kind} from ``--s2-attn-layers`` and ``--s2-word-layers``."""
    kinds = dict.fromkeys(int_list(args.s2_attn_layers), "patches")
    kinds.update(dict.fromkeys(int_list(args.s2_word_layers), "words"))
    return kinds


def train(args, work: Path, llava, tok, feats, mean, std, labels) -> None:
    opt = torch.optim.AdamW(
        [p for n, p in llava.named_parameters() if "vision_tower" not in n],
        lr=args.s2_lr,
        weight_decay=0.01,
    )
    ckpt = work / "stage2.pt"
    step = resume_from(ckpt, llava, opt, args.resume, "2")
    n_img = feats.shape[0]
    total, bs = args.s2_steps, args.s2_batch
    last_save, t0, hist, start = time.time(), time.time(), [], step
    llava.train()
    with attention_inputs(llava, grounding_layers(args)) as grounding:
        while step < total:
            g = torch.Generator().manual_seed(args.seed * 7_000_003 + step)
            idx = torch.randint(0, n_img, (bs,), generator=g).tolist()
            ex = [make_example(tok, args.seed, i, step, args.s2_questions) for i in idx]
            batch = collate(ex, tok.pad_token_id)
            fn = (feats[idx].float() - mean) / std  # [B,576,C]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.s2_lr, args.s2_warmup)
            words = patch_word_targets(tok, labels[idx])
            loss, acc, mass = stage2_loss(
                llava, fn, batch, words, args.s2_aux, grounding, labels[idx][..., 4], args.s2_attn
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(llava.parameters(), 1.0)
            opt.step()
            step += 1
            hist.append((loss.item(), acc, *mass))
            if step % args.log_every == 0 or step == total:
                ls, ac, mw, mp = np.mean(hist, axis=0)
                hist = []
                rate = (time.time() - t0) / max(1, step - start)
                log(f"s2 step {step}/{total} loss={ls:.3f} tok_acc={ac:.3f} "
                      f"attn_words={mw:.2f} attn_patches={mp:.2f} ({rate:.2f} s/step)")  # fmt: skip
            if time.time() - last_save > args.save_every or step == total:
                save_ckpt(ckpt, model=llava.state_dict(), opt=opt.state_dict(), step=step)
                last_save = time.time()
    log("stage 2 done")
