"""Render the full LLM prompt for one user turn under a protocol.

``llava15``: LLaVA's ``vicuna_v1`` conversation, ``{system} USER: <image>\\n{text} ASSISTANT:``.
``lmms_eval``: the checkpoint's own chat template with no system prompt (llava-hf:
``USER: <image>\\n{text} ASSISTANT:``), as lmms-eval's ``llava_hf`` model renders it.
The tokenizer adds ``<s>`` when the prompt is tokenized.
"""

from __future__ import annotations

from typing import Any

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PROTOCOLS = ("llava15", "lmms_eval")


def render_prompt(
    protocol: str, text: str, tokenizer: Any, processor: Any = None, image_token: str = "<image>"
) -> str:
    """Full prompt string with exactly one ``image_token``.

    Args:
        protocol: ``llava15`` or ``lmms_eval``.
        text: the user text (question plus any protocol suffix), without the image token.
        tokenizer: the checkpoint's tokenizer (its ``chat_template`` serves ``lmms_eval``).
        processor: fallback holder of the chat template (llava-hf ships it with the processor).
    """
    if protocol == "llava15":
        return f"{VICUNA_V1_SYSTEM} USER: {image_token}\n{text} ASSISTANT:"
    if protocol == "lmms_eval":
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": f"{image_token}\n{text}"}]
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        if processor is not None and getattr(processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": text}]
            return processor.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        raise ValueError(
            "protocol 'lmms_eval' needs the checkpoint's chat template, but neither the tokenizer "
            "nor the processor has one"
        )
    raise ValueError(f"unknown protocol '{protocol}'; known: {', '.join(PROTOCOLS)}")
