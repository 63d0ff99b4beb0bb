"""Render the full LLM prompt for one user turn under a protocol, and check it before any work.

``llava15``: LLaVA's ``vicuna_v1`` conversation, ``{system} USER: <image>\\n{text} ASSISTANT:``.
``lmms_eval``: what lmms-eval 0.7.3's default ``llava_hf`` model (the chat class
``lmms_eval.models.chat.llava_hf.LlavaHf``, which its registry resolves ``llava_hf`` to)
renders: the checkpoint's chat template applied by the *processor* to structured content
(``[{"type": "image"}, {"type": "text", "text": ...}]``), no system prompt. llava-hf's template
renders ``USER: <image>\\n{text} ASSISTANT:``, whether the folder ships it as
``chat_template.json`` or ``chat_template.jinja``. (lmms-eval's *simple* wrapper, used only with
``force_simple``, applies the tokenizer's template to a plain string instead: with llava-hf's
template that renders an empty user turn, and without a tokenizer template it falls back to a
vicuna template with the system prompt; we do not copy that.)
The tokenizer adds ``<s>`` when the prompt is tokenized.
"""

from __future__ import annotations

from typing import Any

from recomp_eval.models.base import (  # noqa: F401 - re-exported for callers of this module
    PROBE_TEXT,
    PromptTemplateError,
    check_prompt,
)
from recomp_eval.models.chat_templates import (
    holder_source,
    structured_turn,
    template_holder,
)

LMMS_WRAPPER = "lmms_eval.models.chat.llava_hf.LlavaHf (lmms-eval 0.7.3, the default llava_hf)"


def render_prompt(
    protocol: str, text: str, tokenizer: Any, processor: Any = None, image_token: str = "<image>"
) -> str:
    """Full prompt string with exactly one ``image_token``.

    Args:
        protocol: a protocol name (``configs/protocol/<name>.yaml``: its ``conversation`` and
            ``system_prompt`` choose the format).
        text: the user text (question plus any protocol suffix), without the image token.
        tokenizer: the checkpoint's tokenizer (holds the template when the processor does not).
        processor: the checkpoint's processor; its chat template serves ``lmms_eval``.
    """
    from recomp_eval.benchmarks.specs import protocol_spec

    spec = protocol_spec(protocol)
    if spec.conversation == "llava15":  # vicuna_v1
        system = f"{spec.system_prompt} " if spec.system_prompt else ""
        return f"{system}USER: {image_token}\n{text} ASSISTANT:"
    if spec.conversation == "lmms_eval":
        holder = template_holder(tokenizer, processor)
        return holder.apply_chat_template(
            structured_turn(text), tokenize=False, add_generation_prompt=True
        )
    raise ValueError(
        f"protocol '{protocol}' has conversation '{spec.conversation}'; the llava family renders "
        f"llava15 (vicuna_v1) or lmms_eval (the checkpoint's chat template)"
    )


def template_source(protocol: str, tokenizer: Any, processor: Any, folder: str | None) -> str:
    """Where the prompt format comes from, for the record (e.g. ``processor:chat_template.jinja``)."""
    if protocol == "llava15":
        return "vicuna_v1 (LLaVA conv_vicuna_v1, built in)"
    return holder_source(tokenizer, processor, folder)
