"""Prompts of the LLaVA-NeXT family (``recomp_eval.models.llava_next.conversation``).

Expectations come from outside the module under test: LLaVA's ``Conversation.get_prompt`` rules
for ``conv_vicuna_v1`` (``SeparatorStyle.TWO``, ``sep`` " ") and ``conv_mistral_instruct``
(``SeparatorStyle.LLAMA_2``, empty system and ``sep``), the llava-hf v1.6 chat templates of
``tests/data/checkpoints/llava-v1.6-*-hf/`` (llava-hf's own ports of those conversations, applied
by a stock ``LlavaNextProcessor``), the llava family's renderer for the vicuna template (the same
template as llava-1.5's), and the installed lmms-eval sources. The tokenizer is llava-1.5's real
LLaMA tokenizer (the v1.6 tokenizers were not found; see the folders' SOURCES.md): for mistral it
stands in only to show that the prompt carries no BOS of its own.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from recomp_eval.benchmarks.specs import protocol_spec
from recomp_eval.models.base import PromptTemplateError, check_prompt
from recomp_eval.models.llava_next.conversation import (
    LMMS_WRAPPER,
    base_of,
    follows,
    render_prompt,
    template_source,
)

DATA = Path(__file__).parent / "data" / "checkpoints"
NEXT = {"vicuna": DATA / "llava-v1.6-vicuna-7b-hf", "mistral": DATA / "llava-v1.6-mistral-7b-hf"}
LLAVA15 = DATA / "llava-1.5-7b-hf"
BASES = tuple(NEXT)
PROTOCOLS = ("llava15", "lmms_eval")
TEXT = "What color is the bus?\nAnswer the question using a single word or phrase."
IMAGE = "<image>"


def _template(base: str) -> str:
    return json.loads((NEXT[base] / "chat_template.json").read_text())["chat_template"]


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAVA15)  # no chat template of its own


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def processors(tokenizer):
    """Per base a stock ``LlavaNextProcessor`` with the checkpoint's real chat template."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    image_processor = LlavaNextImageProcessorPil.from_pretrained(NEXT["mistral"])
    return {
        base: LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=_template(base),
        )
        for base in BASES
    }


def _render(protocol, base, tokenizer, processors):
    return render_prompt(protocol, TEXT, tokenizer, processors[base], IMAGE, base)


def _user_turn(text: str = TEXT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("base", BASES)
def test_base_of_real_configs(base) -> None:
    from transformers import LlavaNextConfig

    assert base_of(LlavaNextConfig.from_pretrained(NEXT[base])) == base


def test_base_of_other_text_model_is_one_line() -> None:
    config = SimpleNamespace(text_config=SimpleNamespace(model_type="qwen2"))
    with pytest.raises(ValueError) as err:
        base_of(config)
    message = str(err.value)
    assert "\n" not in message
    assert "qwen2" in message and "llama" in message and "mistral" in message


def test_llava15_vicuna_is_conv_vicuna_v1(tokenizer, processors) -> None:
    from recomp_eval.models.llava.conversation import render_prompt as llava_render

    system = protocol_spec("llava15").system_prompt
    prompt = _render("llava15", "vicuna", tokenizer, processors)
    # SeparatorStyle.TWO: system + sep + "USER: " + message + sep + "ASSISTANT:" (empty answer)
    assert prompt == f"{system} USER: <image>\n{TEXT} ASSISTANT:"
    # the llava family's vicuna_v1 (LLaVA-1.5 evaluation) renders the same string
    assert prompt == llava_render("llava15", TEXT, tokenizer, None, IMAGE)
    # llava-hf's v1.6-vicuna template with the system message gives it too
    system_turn = [{"role": "system", "content": [{"type": "text", "text": system}]}]
    ported = processors["vicuna"].apply_chat_template(
        system_turn + _user_turn(), tokenize=False, add_generation_prompt=True
    )
    assert prompt == ported


def test_llava15_mistral_is_conv_mistral_instruct(tokenizer, processors) -> None:
    prompt = _render("llava15", "mistral", tokenizer, processors)
    # LLAMA_2 style: "[INST] " + wrap_sys("") (empty) + message + " [/INST]"; sep "" and no answer
    assert prompt == f"[INST] <image>\n{TEXT} [/INST]"
    assert "<s>" not in prompt and "<<SYS>>" not in prompt
    assert protocol_spec("llava15").system_prompt not in prompt  # mistral_instruct's system is ""
    # llava-hf's v1.6-mistral template renders the same user turn
    ported = processors["mistral"].apply_chat_template(
        _user_turn(), tokenize=False, add_generation_prompt=True
    )
    assert prompt == ported


def test_lmms_eval_vicuna_is_the_llava_hf_template(tokenizer, processors) -> None:
    from transformers import AutoProcessor

    from recomp_eval.models.llava.conversation import render_prompt as llava_render

    prompt = _render("lmms_eval", "vicuna", tokenizer, processors)
    assert prompt == f"USER: <image>\n{TEXT} ASSISTANT:"
    # the same template as llava-1.5's hub file, rendered by the llava family's code
    llava_processor = AutoProcessor.from_pretrained(LLAVA15, backend="pil")
    assert prompt == llava_render("lmms_eval", TEXT, llava_processor.tokenizer, llava_processor)


def test_lmms_eval_mistral_is_the_llava_hf_template(tokenizer, processors) -> None:
    prompt = _render("lmms_eval", "mistral", tokenizer, processors)
    # the template's user branch: "[INST] " + "<image>\n" per image + texts + " [/INST]"; it has
    # no generation prompt of its own, so this is also LLaVA's mistral_instruct prompt
    assert prompt == f"[INST] <image>\n{TEXT} [/INST]"
    assert prompt == _render("llava15", "mistral", tokenizer, processors)


@pytest.mark.parametrize("base", BASES)
def test_lmms_eval_tokenizer_template_when_processor_has_none(base, tokenizer, processors) -> None:
    held = _tokenizer()
    held.chat_template = _template(base)
    expected = _render("lmms_eval", base, tokenizer, processors)
    assert render_prompt("lmms_eval", TEXT, held, None, IMAGE, base) == expected


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("base", BASES)
def test_exactly_one_image_token_and_one_bos(protocol, base, tokenizer, processors) -> None:
    prompt = _render(protocol, base, tokenizer, processors)
    assert prompt.count(IMAGE) == 1
    check_prompt(prompt, TEXT, IMAGE, protocol)
    ids = tokenizer(prompt).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE)) == 1
    # the tokenizer adds the BOS (as LLaVA's tokenizer_image_token keeps it): once, first
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] != tokenizer.eos_token_id  # "</s>" only ever follows an answer


@pytest.mark.parametrize("base", BASES)
def test_no_template_is_one_line_error(base) -> None:
    bare = SimpleNamespace(chat_template=None)
    for processor in (None, SimpleNamespace(chat_template=None)):
        with pytest.raises(PromptTemplateError) as err:
            render_prompt("lmms_eval", TEXT, bare, processor, IMAGE, base)
        assert "\n" not in str(err.value) and "protocol=llava15" in str(err.value)
        with pytest.raises(PromptTemplateError):
            template_source("lmms_eval", bare, processor, str(NEXT[base]), base)
    # llava15 needs no template
    assert render_prompt("llava15", TEXT, bare, None, IMAGE, base).count(IMAGE) == 1


def test_unknown_base_is_refused(tokenizer, processors) -> None:
    for call in (
        lambda: render_prompt("llava15", TEXT, tokenizer, processors["vicuna"], IMAGE, "yi"),
        lambda: template_source("llava15", tokenizer, None, None, "yi"),
        lambda: follows("llava15", "yi"),
    ):
        with pytest.raises(ValueError, match="yi"):
            call()


@pytest.mark.parametrize("base", BASES)
def test_template_source_and_follows(base, tokenizer, processors) -> None:
    from recomp_eval.models.llava.conversation import LMMS_WRAPPER as LLAVA_WRAPPER

    mode = {"vicuna": "vicuna_v1", "mistral": "mistral_instruct"}[base]  # LLaVA conv_templates
    assert template_source("llava15", tokenizer, processors[base], None, base) == (
        f"{mode} (LLaVA conv_{mode}, built in)"
    )
    source = template_source("lmms_eval", tokenizer, processors[base], str(NEXT[base]), base)
    assert source == "processor:chat_template.json"
    assert follows("llava15", base) == f"LLaVA-NeXT eval (conv_mode {mode})"
    assert follows("lmms_eval", base) == LMMS_WRAPPER == LLAVA_WRAPPER  # one wrapper for both


def _lmms_source(relative: str) -> str:
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lmms-eval is not installed (the optional `lmms` extra)")
    return (Path(next(iter(spec.submodule_search_locations))) / relative).read_text()


def test_lmms_eval_reference_matches_the_docstring() -> None:
    """The installed lmms-eval (read, not imported): its ``llava`` model defaults to vicuna_v1,
    its ``llava_hf`` loader takes llava_next checkpoints and the chat class applies the processor's
    chat template to the structured messages with the generation prompt."""
    from importlib.metadata import version

    assert f"lmms-eval {version('lmms_eval')}" in LMMS_WRAPPER
    assert 'conv_template="vicuna_v1"' in _lmms_source("models/simple/llava.py")
    assert '"llava_next": LlavaNextForConditionalGeneration' in _lmms_source(
        "models/simple/llava_hf.py"
    )
    chat = _lmms_source("models/chat/llava_hf.py")
    assert "class LlavaHf(" in chat
    assert (
        "self._image_processor.apply_chat_template(messages, tokenize=False, "
        "add_generation_prompt=True)" in chat
    )
