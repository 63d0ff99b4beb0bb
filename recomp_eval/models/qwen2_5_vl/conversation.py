"""Prompts of the Qwen2.5-VL family: the checkpoint's chat template on an image and a text part.

``llava15`` (the model's own format): the checkpoint's chat template, applied by the processor to
one user message ``[{"type": "image"}, {"type": "text", "text": ...}]`` with
``add_generation_prompt=True``. The Qwen2.5-VL template adds its default system turn
("You are a helpful assistant.") when the conversation has none, and renders the image as
``<|vision_start|><|image_pad|><|vision_end|>``.
``lmms_eval``: what lmms-eval 0.7.3's ``qwen2_5_vl`` wrapper
(``lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL``) renders: an explicit system message with its
default ``system_prompt`` ("You are a helpful assistant."), then the user turn with the image
before the text, through the processor's ``apply_chat_template(..., add_generation_prompt=True)``.
With the stock template both render the same string; they differ for a checkpoint whose template
has another default system turn.
"""

from __future__ import annotations

from typing import Any

from recomp_eval.models.base import PromptTemplateError
from recomp_eval.models.chat_templates import template_file

LMMS_WRAPPER = "lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL (lmms-eval 0.7.3, qwen2_5_vl)"
LMMS_SYSTEM_PROMPT = "You are a helpful assistant."  # the wrapper's default system_prompt


def messages(protocol: str, text: str) -> list[dict[str, Any]]:
    """The chat messages of one user turn under ``protocol``."""
    from recomp_eval.benchmarks.specs import protocol_spec

    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    conversation = protocol_spec(protocol).conversation
    if conversation == "lmms_eval":
        return [{"role": "system", "content": [{"type": "text", "text": LMMS_SYSTEM_PROMPT}]}, user]
    if conversation == "llava15":
        return [user]
    raise ValueError(
        f"protocol '{protocol}' has conversation '{conversation}'; the qwen2_5_vl family renders "
        f"llava15 (the checkpoint's chat template) or lmms_eval (lmms-eval's qwen2_5_vl wrapper)"
    )


def render_prompt(protocol: str, text: str, processor: Any) -> str:
    """The full prompt (one image placeholder, before its expansion to the merged tokens)."""
    holder = processor if getattr(processor, "chat_template", None) else processor.tokenizer
    if not getattr(holder, "chat_template", None):
        raise PromptTemplateError(
            "the Qwen2.5-VL checkpoint has no chat template (chat_template.json or "
            "chat_template.jinja); add the checkpoint's template file"
        )
    return holder.apply_chat_template(messages(protocol, text), tokenize=False,
                                      add_generation_prompt=True)  # fmt: skip


def template_source(protocol: str, processor: Any, folder: str | None) -> str:
    where = template_file(folder)
    system = "lmms-eval system prompt" if protocol == "lmms_eval" else "template default system"
    return f"processor:{where} ({system})"


def follows(protocol: str) -> str:
    if protocol == "lmms_eval":
        return LMMS_WRAPPER
    return "the checkpoint's chat template (Qwen2.5-VL's own format)"
