"""Render the full LLM prompt for one user turn of a LLaVA-NeXT checkpoint under a protocol.

The prompt depends on the checkpoint's base LLM (:func:`base_of`: ``vicuna`` for
``llava-hf/llava-v1.6-vicuna-7b-hf`` / ``-13b-hf``, ``mistral`` for ``llava-v1.6-mistral-7b-hf``).

``llava15`` (the model's own LLaVA evaluation prompts): the conversation LLaVA-NeXT's evaluation
uses for the base, rendered as LLaVA's ``Conversation.get_prompt`` renders one user turn
(``<image>\\n{text}``) followed by an empty assistant turn:

- vicuna: conv_mode ``vicuna_v1`` (the default ``conv_template`` of lmms-eval's ``llava`` model,
  ``lmms_eval/models/simple/llava.py``, which ran the v1.6 evaluations; as the llava family):
  ``{system} USER: <image>\\n{text} ASSISTANT:``.
- mistral: conv_mode ``mistral_instruct`` (``conv_template=mistral_instruct`` for
  ``liuhaotian/llava-v1.6-mistral-7b`` in lmms-eval's ``examples/models/llava_next.sh``; LLaVA's
  ``run_llava`` / ``cli`` pick it for any model name holding ``mistral``). In LLaVA's (and
  LLaVA-NeXT's) ``llava/conversation.py`` that conversation has ``system=""``,
  ``SeparatorStyle.LLAMA_2``, ``sep=""``, ``sep2="</s>"``; ``get_prompt`` wraps the first user
  message as ``[INST] {wrap_sys(system)}{message} [/INST]`` (``wrap_sys`` of an empty system is
  empty, so no ``<<SYS>>`` block), prefixes it with ``sep`` (empty), adds nothing for the empty
  assistant turn (``sep2`` only follows an answer) and strips a leading ``sep`` (a no-op): the
  prompt is ``[INST] <image>\\n{text} [/INST]``. It holds no ``<s>``: LLaVA's ``tokenizer_image_token``
  keeps the BOS the tokenizer adds to the first chunk, as llava-hf's tokenizer adds it when the
  prompt is tokenized, so writing one here would double it. The protocol's ``system_prompt`` is
  ``conv_vicuna_v1``'s and is not part of ``mistral_instruct``; it is not rendered.

``lmms_eval``: what lmms-eval 0.7.3's default ``llava_hf`` model (the chat class
``lmms_eval.models.chat.llava_hf.LlavaHf``) renders for these checkpoints too (its loader maps
``model_type`` ``llava_next`` to ``LlavaNextForConditionalGeneration``): the checkpoint's chat
template applied by the *processor* to structured content (``[{"type": "image"}, {"type":
"text", "text": ...}]``) with ``add_generation_prompt=True``, no system prompt. llava-hf's v1.6
templates render ``USER: <image>\\n{text} ASSISTANT:`` (vicuna) and ``[INST] <image>\\n{text}
[/INST]`` (mistral, no generation prompt of its own).
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
BASES = {"llama": "vicuna", "mistral": "mistral"}  # text_config.model_type -> base
CONV_MODES = {"vicuna": "vicuna_v1", "mistral": "mistral_instruct"}  # base -> LLaVA conv_mode


def base_of(config: Any) -> str:
    """The base LLM of a ``LlavaNextConfig``: ``vicuna`` (Llama text model) or ``mistral``."""
    model_type = getattr(getattr(config, "text_config", None), "model_type", None)
    if model_type not in BASES:
        raise ValueError(
            f"LLaVA-NeXT text model_type '{model_type}' is not supported; supported: "
            f"{', '.join(f'{k} ({v})' for k, v in BASES.items())}"
        )
    return BASES[model_type]


def _check_base(base: str) -> str:
    if base not in CONV_MODES:
        raise ValueError(
            f"unknown LLaVA-NeXT base '{base}'; expected one of {', '.join(CONV_MODES)}"
        )
    return base


def render_prompt(
    protocol: str, text: str, tokenizer: Any, processor: Any, image_token: str, base: str
) -> str:
    """Full prompt string with exactly one ``image_token``.

    Args:
        protocol: a protocol name (``configs/protocol/<name>.yaml``: its ``conversation`` and
            ``system_prompt`` choose the format).
        text: the user text (question plus any protocol suffix), without the image token.
        tokenizer: the checkpoint's tokenizer (holds the template when the processor does not).
        processor: the checkpoint's processor; its chat template serves ``lmms_eval``.
        image_token: the placeholder the processor expands (``<image>``).
        base: :func:`base_of` the checkpoint's config (``vicuna`` or ``mistral``).
    """
    from recomp_eval.benchmarks.specs import protocol_spec

    spec = protocol_spec(protocol)
    _check_base(base)
    user = f"{image_token}\n{text}"
    if spec.conversation == "llava15":
        if base == "mistral":  # mistral_instruct: LLAMA_2 style, empty system, no <s>
            return f"[INST] {user} [/INST]"
        system = f"{spec.system_prompt} " if spec.system_prompt else ""  # vicuna_v1
        return f"{system}USER: {user} ASSISTANT:"
    if spec.conversation == "lmms_eval":
        holder = template_holder(tokenizer, processor)
        return holder.apply_chat_template(
            structured_turn(text), tokenize=False, add_generation_prompt=True
        )
    raise ValueError(
        f"protocol '{protocol}' has conversation '{spec.conversation}'; the llava_next family "
        f"renders llava15 (LLaVA conv_mode {CONV_MODES[base]}) or lmms_eval (the checkpoint's "
        f"chat template)"
    )


def template_source(
    protocol: str, tokenizer: Any, processor: Any, folder: str | None, base: str
) -> str:
    """Where the prompt format comes from, for the record (e.g. ``processor:chat_template.json``
    or ``mistral_instruct (LLaVA conv_mistral_instruct, built in)``)."""
    from recomp_eval.benchmarks.specs import protocol_spec

    mode = CONV_MODES[_check_base(base)]
    if protocol_spec(protocol).conversation == "llava15":
        return f"{mode} (LLaVA conv_{mode}, built in)"
    return holder_source(tokenizer, processor, folder)


def follows(protocol: str, base: str) -> str:
    """The reference harness whose prompts the protocol reproduces for this base."""
    from recomp_eval.benchmarks.specs import protocol_spec

    mode = CONV_MODES[_check_base(base)]
    if protocol_spec(protocol).conversation == "lmms_eval":
        return LMMS_WRAPPER
    return f"LLaVA-NeXT eval (conv_mode {mode})"
