"""Chat-template steps every family shares: lmms-eval's structured user turn, which object holds
the checkpoint's template, and which file it came from (for the record)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recomp_eval.models.base import PromptTemplateError

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def structured_turn(text: str) -> list[dict[str, Any]]:
    """One user message with an image part and a text part, as lmms-eval builds it."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def template_holder(tokenizer: Any, processor: Any) -> Any:
    """The object whose chat template ``lmms_eval`` uses: the processor (as lmms-eval's chat
    wrapper), else the tokenizer with the same structured content."""
    for holder in (processor, tokenizer):
        if holder is not None and getattr(holder, "chat_template", None):
            return holder
    raise PromptTemplateError(
        "protocol=lmms_eval needs the checkpoint's chat template, but neither its processor nor "
        "its tokenizer has one (no chat_template.json or chat_template.jinja in the folder); add "
        "the checkpoint's template file or use protocol=llava15"
    )


def template_file(folder: str | None) -> str:
    """The first file of :data:`TEMPLATE_FILES` in ``folder`` (``chat_template`` when none)."""
    files = [name for name in TEMPLATE_FILES if folder and (Path(folder) / name).is_file()]
    return files[0] if files else "chat_template"


def holder_source(tokenizer: Any, processor: Any, folder: str | None) -> str:
    """``processor:<file>`` or ``tokenizer:<file>``: where the lmms_eval template comes from."""
    holder = template_holder(tokenizer, processor)
    kind = "processor" if holder is processor else "tokenizer"
    return f"{kind}:{template_file(folder)}"
