"""One entry point: batched generation with any compression method on any registered family.

``generate(bundle, method, images, user_texts, questions, protocol, sample_ids, max_new_tokens)``
renders prompts per protocol, preprocesses images, runs the vision side inside
``compress(model, method)`` (tower pass(es) -> signals -> method -> projector), feeds exactly
``lengths[i]`` visual tokens per sample and decodes greedily. Every family-specific step is a
call on ``bundle.adapter`` (:class:`~recomp_eval.models.base.ModelAdapter`): this module knows
no family. Timings are the batch's stage times in ms (equal to the sample's own at batch size
1); ``batch_size`` is recorded with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteriaList

from recomp_eval.inject.context import compress
from recomp_eval.inject.tower_policy import vision_passes
from recomp_eval.inject.vision_cache import VisionCache
from recomp_eval.methods.base import Compressed
from recomp_eval.models.base import ModelBundle
from recomp_eval.signals.vision import sample_seeds
from recomp_eval.stop_text import StopOnText, cut_at_stop
from recomp_eval.timing import FirstTokenMark, StageTimer


@dataclass
class GenerationResult:
    """One sample's output.

    ``kept_tokens``: visual tokens the LLM received (pre-LLM methods: ``lengths[i]``; in-LLM
    methods: the average over decoder layers of the visual tokens at each layer's input).
    ``compressed``: the sample's :class:`Compressed` on CPU (source, role, members, stats; the
    features are dropped: shape [1,T,0]).
    """

    sample_id: str
    text: str
    kept_tokens: float
    timings: dict[str, float]
    batch_size: int
    prompt: str
    text_tokens: int = 0  # prompt tokens other than the image placeholder
    compressed: Compressed | None = None
    new_token_ids: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None  # [new, V], only with output_logits=True
    # in-LLM methods: [N] bool, the patches still in the sequence after the last pruning stage
    llm_kept: torch.Tensor | None = None
    # the family's facts about the image (LLaVA-NeXT: crops, kept per crop, newlines, ...)
    image: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedBatch:
    """Tokenized prompts and pixels for a batch (shared by ``generate`` and tests)."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    pixel_values: torch.Tensor  # [P,3,S,S] tower items (LLaVA-1.5: P = B images; NeXT: crops)
    layout: Any = None  # the family's BatchLayout: tower items per sample (and its own data)


def prepare_batch(
    bundle: ModelBundle, images: Sequence[Image.Image], user_texts: Sequence[str], protocol: str
) -> PreparedBatch:
    """Render and tokenize one prompt per sample (single image token) and preprocess images."""
    adapter = bundle.adapter
    prompts = [adapter.render_prompt(bundle, protocol, t) for t in user_texts]
    for prompt, text in zip(prompts, user_texts):  # before any vision work
        adapter.check_prompt(bundle, protocol, prompt, text)
    prompt_ids = [bundle.tokenizer(p)["input_ids"] for p in prompts]
    pixel_values = adapter.preprocess(bundle, images, protocol)
    layout = adapter.layout(bundle, images, pixel_values)
    return PreparedBatch(prompts, prompt_ids, pixel_values, layout)


def prompt_text_tokens(bundle: ModelBundle, user_text: str, protocol: str) -> int:
    """Tokens of the rendered prompt other than the image placeholder (before expansion)."""
    prompt = bundle.adapter.render_prompt(bundle, protocol, user_text)
    ids = bundle.tokenizer(prompt)["input_ids"]
    return sum(1 for t in ids if t != bundle.image_token_id)


@torch.no_grad()
def vision_side(
    bundle: ModelBundle,
    method: Any,
    probe: Any,
    pixel_values: torch.Tensor,
    timer: StageTimer,
    questions: Sequence[str] = (),
    prompt_ids: Sequence[Sequence[int]] = (),
    seeds: torch.Tensor | None = None,
    cache: VisionCache | None = None,
    cache_key: tuple | None = None,
    user_texts: Sequence[str] = (),
    layout: Any = None,
) -> tuple[Any, list[torch.Tensor]]:
    """Tower pass(es) -> signals (+ text signal) -> method -> projector, timed per stage.

    Must run inside ``compress(model, method)`` (``probe``). Returns the method's output (a
    :class:`Compressed` over the tower items; the family's own grouping of them where it runs
    the method per group) and the per-sample features [T_i, E] the LLM receives. ``layout``:
    the family's :class:`~recomp_eval.models.base.BatchLayout` (None: one tower item per sample). With ``cache`` (and ``cache_key``),
    a tower pass stored by an earlier run of the same batch is reused and its measured span is
    reported as this run's vision stage (:mod:`recomp_eval.inject.tower_policy`).
    """
    adapter, spec = bundle.adapter, method.spec
    done = vision_passes(adapter, bundle, probe, pixel_values, spec, timer, cache, cache_key,
                         layout)  # fmt: skip
    with timer.stage("vision"):
        tower_out = adapter.signals(bundle, done, spec, seeds, layout)
    if spec.text is not None:
        with timer.stage("text"):
            adapter.add_text_signal(bundle, tower_out, spec, questions, prompt_ids, user_texts)
    with timer.stage("compression"):
        compressed = adapter.apply(bundle, method, tower_out, layout)
        features = adapter.project(bundle, compressed, layout)  # B x [T_i, E]
    return compressed, features


@torch.no_grad()
def generate(
    bundle: ModelBundle,
    method: Any,
    images: Sequence[Image.Image],
    user_texts: Sequence[str],
    questions: Sequence[str],
    protocol: str,
    sample_ids: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    vision_cache: VisionCache | None = None,
    **generate_kwargs: Any,
) -> list[GenerationResult]:
    """Greedy generation for a batch with ``method`` applied.

    Args:
        bundle: from :func:`~recomp_eval.models.load_model` (its ``adapter`` drives every step).
        method: a :class:`~recomp_eval.methods.BuiltMethod`.
        images: B PIL images.
        user_texts: B user turns (question plus protocol suffix), without the image token.
        questions: B dataset questions (no suffix) for ``TextSpec.source == "question"``.
        protocol: ``llava15`` or ``lmms_eval``.
        sample_ids: B ids (seeds for seeded methods are a stable hash of these).
        max_new_tokens: decoding limit.
        stop: stop strings (generation stops there; the text is cut before them).
        vision_cache: share tower passes with other runs over the same batches (opt-in; see
            :mod:`recomp_eval.inject.vision_cache`).
        generate_kwargs: extra ``model.generate`` options (default greedy).
    """
    b = len(images)
    if not (len(user_texts) == len(questions) == len(sample_ids) == b):
        raise ValueError("images, user_texts, questions and sample_ids must have equal lengths")
    model, device, adapter = bundle.model, bundle.device, bundle.adapter
    batch = prepare_batch(bundle, images, user_texts, protocol)
    spec = method.spec
    timer = StageTimer(device)
    seeds = sample_seeds(sample_ids, device) if spec.needs_seeds else None
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
    if protocol == "lmms_eval":  # as lmms-eval's llava_hf: EOS (and pad) from the tokenizer
        kwargs.setdefault("eos_token_id", bundle.tokenizer.eos_token_id)
        kwargs.setdefault("pad_token_id", bundle.tokenizer.eos_token_id)
    with compress(model, method, bundle.image_token_id, adapter) as probe:
        compressed, features = vision_side(
            bundle,
            method,
            probe,
            batch.pixel_values,
            timer,
            questions=questions,
            prompt_ids=batch.prompt_ids,
            seeds=seeds,
            cache=vision_cache,
            cache_key=VisionCache.key(sample_ids, batch.pixel_values),
            user_texts=user_texts,
            layout=batch.layout,
        )
        lengths = [int(f.shape[0]) for f in features]  # what the LLM receives per sample
        # per sample: the LLM-order provenance on CPU (features dropped) and the family's facts
        provenance = adapter.provenance(bundle, compressed, batch.layout)
        # in-LLM methods prune rectangular batches: samples with different image-token counts
        # (LLaVA-NeXT's crops) go through the LLM as one sub-batch per count, in order
        groups = _llm_groups(lengths) if method.llm is not None else [list(range(b))]
        start = timer.mark()
        mark = FirstTokenMark(timer)
        llm_outs = []
        for group in groups:
            llm_outs.append(_llm_phase(bundle, batch, features, lengths, group, stop, mark,
                                       probe.llm, kwargs, provenance))  # fmt: skip
        end = timer.mark()
    timer.add("prefill", start, mark.first if mark.first is not None else end)
    timer.add("decode", mark.first if mark.first is not None else end, end)
    timings = timer.results_ms()
    per_sample: dict[int, dict[str, Any]] = {}
    for group, out in zip(groups, llm_outs):
        per_sample.update(zip(group, out))
    if probe.llm is not None:
        for group, out in zip(groups, llm_outs):
            for i, entry in zip(group, out):
                if entry.pop("keep") is not None:
                    entry["llm_kept"] = _patches_after_stages(
                        entry.pop("stage_masks"), provenance[i][0]
                    )
    return [
        GenerationResult(
            sample_id=str(sample_ids[i]),
            text=cut_at_stop(per_sample[i]["text"], stop).strip(),
            kept_tokens=per_sample[i]["kept"],
            timings=dict(timings),
            batch_size=b,
            prompt=batch.prompts[i],
            text_tokens=sum(1 for t in batch.prompt_ids[i] if t != bundle.image_token_id),
            compressed=provenance[i][0],
            image=provenance[i][1],
            new_token_ids=per_sample[i]["new_tokens"],
            logits=per_sample[i]["logits"],
            llm_kept=per_sample[i].get("llm_kept"),
        )
        for i in range(b)
    ]


def _llm_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Sample indices with equal visual-token counts, one list per count (first-seen order)."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(lengths):
        groups.setdefault(int(t), []).append(i)
    return list(groups.values())


def _llm_phase(bundle, batch, features, lengths, group, stop, mark, llm_probe, kwargs, provenance):
    """Prompt expansion and ``generate`` for the samples ``group`` of the batch; per sample its
    text, new token ids, logits, visual tokens seen and (in-LLM methods) the stage masks."""
    adapter = bundle.adapter
    prompt_ids = [batch.prompt_ids[i] for i in group]
    input_ids, attention_mask = adapter.expand_prompt(bundle, prompt_ids,
                                                      [lengths[i] for i in group])  # fmt: skip
    call = dict(kwargs)
    if stop:
        stopper = StopOnText(bundle.tokenizer, stop, prompt_length=input_ids.shape[1])
        call["stopping_criteria"] = StoppingCriteriaList([stopper])
    out = adapter.generate(bundle, input_ids, attention_mask, [features[i] for i in group],
                           logits_processor=[mark],
                           provenance=[provenance[i] for i in group], **call)  # fmt: skip
    sequences = out.sequences if hasattr(out, "sequences") else out  # [g, L + new]
    logits = getattr(out, "logits", None)  # new x [g,V] with output_logits=True
    new_tokens = sequences[:, input_ids.shape[1] :].cpu()
    texts = bundle.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    kept = [float(lengths[i]) for i in group]
    keep = masks = None
    if llm_probe is not None:  # this prefill's entries are the probe's newest
        kept = llm_probe.per_layer_counts[:, -len(group) :].double().mean(dim=0).tolist()
        if llm_probe.keep_masks:
            keep, masks = llm_probe.keep_masks[-1].cpu(), llm_probe.image_masks[-1].cpu()
    return [
        {
            "text": texts[j],
            "new_tokens": new_tokens[j].tolist(),
            "logits": None if logits is None else torch.stack([x[j] for x in logits]).cpu(),
            "kept": kept[j],
            "keep": keep,
            "stage_masks": None if keep is None else (keep[j], masks[j]),
        }
        for j in range(len(group))
    ]


def _patches_after_stages(stage_masks: tuple[torch.Tensor, torch.Tensor],
                          provenance: Compressed) -> torch.Tensor:  # fmt: skip
    """[N] bool: the patches whose image token survived the last in-LLM stage. ``stage_masks``:
    the sample's [Lp] kept and image positions; its image positions hold its tokens in LLM
    order, as ``provenance`` lists them (layout tokens such as newlines have no source)."""
    keep, image = stage_masks
    survived = keep[image]  # [T_i] over the sample's image tokens, in order
    src = provenance.source[0, : survived.shape[0]][survived]  # [K] patches of the kept tokens
    patches = torch.zeros(provenance.members.shape[-1], dtype=torch.bool)
    patches[src[src >= 0]] = True
    return patches
