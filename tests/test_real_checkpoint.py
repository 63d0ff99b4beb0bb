"""The pipeline on checkpoints in the real llava-hf layout (``tests/real_layout.py``).

Folders hold the hub's tokenizer, processor, template and config files (``tests/data/checkpoints``)
and random weights under the hub's tensor names; each test checks the project against an oracle
written here (LLaVA's ``tokenizer_image_token`` and ``expand2square``, numpy CLIP normalisation,
a stock ``processor`` + ``model`` forward, a direct ``CLIPTokenizer`` call) or against literal
values of the real checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from real_layout import (
    CLIP_HUB,
    LLAVA_HUB,
    NUM_SHARDS,
    RealLayouts,
    expected_names,
    hub_name,
)

from recomp_eval.methods import METHODS, build_method
from recomp_eval.models.llava.adapter import expand_image_tokens
from recomp_eval.models.llava.conversation import PromptTemplateError
from recomp_eval.models.llava.loader import load_clip_text, load_llava
from recomp_eval.pipeline import generate, prepare_batch
from recomp_eval.signals.text import encode_texts, select_texts

# LLaVA's conv_vicuna_v1 (llava/conversation.py), copied from the upstream source.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_ID = 32000  # llava-hf: "<image>"
PAD_ID = 32001
BOS_ID = 1
N_PATCHES = 576  # (336 / 14) ** 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's published normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QUESTIONS = ["What is the colour of the bus?", "How many people are there?"]
# LLaVA's tokenizer_image_token around the image of "USER: <image>\nWhat": ":", "▁" (the space
# before the image), <image>, "▁" (the prefix of the next chunk), "\n" (byte 0x0A), "What"
AROUND_IMAGE = [29901, 29871, IMAGE_ID, 29871, 13, 5618]


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
    built = RealLayouts(tmp_path_factory.mktemp("real_layout"))
    yield built
    for path in built.root.glob("real-*"):  # ~1.6 GB each; pytest keeps its last tmp folders
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def folder(layouts) -> Path:
    return layouts("json", "small")


@pytest.fixture(scope="module")
def bundle(folder):
    return load_llava(str(folder), dtype="float32")


def make_images() -> list[Image.Image]:
    """A wide noise image larger than 336 and a tall gradient one smaller (both resize paths)."""
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (380, 500, 3), dtype=np.uint8)  # (H, W)
    yy, xx = np.mgrid[0:200, 0:131]
    tall = np.stack([xx * 255 // 130, yy * 255 // 199, (xx + yy) % 256], -1).astype(np.uint8)
    return [Image.fromarray(wide), Image.fromarray(tall)]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return make_images()


# --------------------------------------------------------------------------- oracles


def tokenizer_image_token(prompt: str, encode) -> list[int]:
    """LLaVA's ``tokenizer_image_token`` (llava/mm_utils.py), rewritten from its description.

    Split the prompt on ``<image>``, tokenize each chunk on its own (each chunk starts with BOS),
    keep BOS once at the start, join the chunks (their BOS dropped) with the image id.
    """
    chunks = [encode(c) for c in prompt.split("<image>")]
    assert all(c[0] == BOS_ID for c in chunks)
    ids = [BOS_ID]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_ID)
        ids.extend(chunk[1:])
    return ids


def llava15_pixels(image: Image.Image) -> np.ndarray:
    """LLaVA-1.5 eval preprocessing: ``expand2square`` with the mean colour, bicubic 336, CLIP norm.

    Returns [3,336,336] float64.
    """
    background = tuple(int(x * 255) for x in CLIP_MEAN)
    width, height = image.size
    if width > height:
        square = Image.new(image.mode, (width, width), background)
        square.paste(image, (0, (width - height) // 2))
    elif height > width:
        square = Image.new(image.mode, (height, height), background)
        square.paste(image, ((height - width) // 2, 0))
    else:
        square = image
    arr = np.asarray(square.resize((336, 336), Image.BICUBIC), dtype=np.float64) / 255.0
    arr = (arr - np.array(CLIP_MEAN)) / np.array(CLIP_STD)  # [336,336,3]
    return arr.transpose(2, 0, 1)  # [3,336,336]


def structured(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def stock_last_logits(bundle, image: Image.Image, text: str) -> torch.Tensor:
    """lmms-eval's llava_hf path: processor template + processor(images, text) + model forward."""
    prompt = bundle.processor.apply_chat_template(structured(text), add_generation_prompt=True)
    inputs = bundle.processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        return bundle.model(**inputs).logits[0, -1]  # [V]


# --------------------------------------------------------------------------- the folder itself


def test_builder_writes_hub_tensor_names_in_shards(folder, bundle):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    cfg = bundle.model.config
    kept = (cfg.text_config.num_hidden_layers, cfg.vision_config.num_hidden_layers)
    assert kept == (2, 3)
    assert set(weight_map) == expected_names(*kept)  # hub names, less the dropped layers
    hub_index = json.loads((LLAVA_HUB / "model.safetensors.index.json").read_text())
    assert len(hub_index["weight_map"]) == 686
    shards = sorted(folder.glob("model-*.safetensors"))
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{NUM_SHARDS:05d}.safetensors" for i in range(1, NUM_SHARDS + 1)
    ]
    assert set(weight_map.values()) == {p.name for p in shards}
    from safetensors import safe_open

    total = 0
    loaded = bundle.model.state_dict()
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            names = set(f.keys())
            assert names == {k for k, v in weight_map.items() if v == shard.name}
            for name in names:
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.float16  # as the hub
                total += tensor.numel() * tensor.element_size()
    assert total == index["metadata"]["total_size"]
    # every parameter came from the files (none re-initialised by the loader)
    for name, value in loaded.items():
        file = folder / weight_map[hub_name(name)]
        with safe_open(str(file), "pt") as f:
            assert torch.equal(f.get_tensor(hub_name(name)).float(), value), name


def test_loads_like_a_download(folder, bundle):
    cfg = bundle.model.config
    vision, text = cfg.vision_config, cfg.text_config
    assert (vision.image_size, vision.patch_size) == (336, 14)
    assert cfg.image_seq_length == N_PATCHES  # filled in by transformers 5.x (not in the file)
    assert "image_seq_length" not in json.loads((folder / "config.json").read_text())
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == IMAGE_ID and cfg.projector_hidden_act == "gelu"
    assert text.vocab_size == 32064 and text.max_position_embeddings == 4096
    assert bundle.model.get_input_embeddings().weight.shape == (32064, text.hidden_size)
    gen = bundle.model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (BOS_ID, 2, PAD_ID)
    tok = bundle.tokenizer
    assert tok.padding_side == "left" and tok.pad_token_id == PAD_ID
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID
    assert tok("\n", add_special_tokens=False)["input_ids"] == [29871, 13]
    proc = bundle.processor
    assert proc.patch_size == 14 and proc.num_additional_image_tokens == 1
    ip = bundle.image_processor
    assert ip.crop_size == {"height": 336, "width": 336} and ip.resample == 3
    assert tuple(ip.image_mean) == CLIP_MEAN and tuple(ip.image_std) == CLIP_STD
    # only chat_template.json (as the hub folder): the processor has the template, the tokenizer not
    assert proc.chat_template and not tok.chat_template
    assert bundle.clip_text_id == str(folder / "clip")


def test_clip_vision_tower_is_llavas(folder, bundle):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(folder / "clip"))
    ours = bundle.model.model.vision_tower.state_dict()
    theirs = clip.vision_model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(theirs[name].float(), value), name
    assert clip.config.text_config.vocab_size == 49408
    assert clip.config.text_config.max_position_embeddings == 77
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (folder / "clip" / name).read_bytes() == (CLIP_HUB / name).read_bytes()
    # the loader's own pairing check agrees (exactly the same weights)
    paired = load_clip_text(bundle.clip_text_id, "float32", "cpu", llava_model=bundle.model)
    assert paired.pairing["matches"] and paired.pairing["max_rel_diff"] == 0.0


# --------------------------------------------------------------------------- prompts


def test_llava15_prompt_is_vicuna_v1_and_ids_match_tokenizer_image_token(folder, bundle, images):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))  # the hub's file, no transformers
    batch = prepare_batch(bundle, images[:1], QUESTIONS[:1], "llava15")
    prompt = batch.prompts[0]
    # conv_vicuna_v1.get_prompt(): system + " " + "USER: " + msg + " " + "ASSISTANT:"
    assert prompt == f"{VICUNA_SYSTEM} USER: <image>\n{QUESTIONS[0]} ASSISTANT:"
    ids = batch.prompt_ids[0]
    assert ids == tokenizer_image_token(prompt, lambda s: raw.encode(s).ids)
    at = ids.index(IMAGE_ID)
    assert ids[:3] == [BOS_ID, 319, 13563]  # <s> ▁A ▁chat
    assert ids.count(BOS_ID) == 1 and ids.count(IMAGE_ID) == 1
    assert ids[at - 2 : at + 4] == AROUND_IMAGE


# Who holds the template after loading (tokenizer, processor): with only chat_template.json
# the tokenizer has none, so the prompt must come from the processor.
HOLDERS = {"json": (False, True), "jinja": (True, True), "both": (True, True)}


@pytest.mark.parametrize("template", sorted(HOLDERS))
def test_lmms_eval_prompt_per_template_file(layouts, bundle, images, template):
    b = bundle if template == "json" else load_llava(str(layouts(template)), dtype="float32")
    assert (bool(b.tokenizer.chat_template), bool(b.processor.chat_template)) == HOLDERS[template]
    batch = prepare_batch(b, images[:1], QUESTIONS[:1], "lmms_eval")
    expected = f"USER: <image>\n{QUESTIONS[0]} ASSISTANT:"
    assert batch.prompts[0] == expected
    stock = b.processor.apply_chat_template(structured(QUESTIONS[0]), add_generation_prompt=True)
    assert stock == expected
    ids = batch.prompt_ids[0]
    assert ids[:4] == [BOS_ID, 3148, 1001, 29901]  # <s> ▁US ER :
    assert ids[3:7] == [29901, 29871, IMAGE_ID, 29871]


# Templates a checkpoint folder might ship that cannot serve lmms_eval's structured content.
BAD_TEMPLATES = {
    # renders plain string content only: structured content gives "USER:  ASSISTANT:"
    "plain_strings": (
        "chat_template.json",
        "{% for m in messages %}{{ m['role'].upper() }}: "
        "{% if m['content'] is string %}{{ m['content'] }}{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}",
        "0 '<image>' placeholders",
    ),
    # renders the text parts but no image part
    "no_image_part": (
        "chat_template.jinja",
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}",
        "0 '<image>' placeholders",
    ),
    # renders the image part and drops the text
    "no_text_part": (
        "chat_template.json",
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}",
        "empty user turn",
    ),
    "no_template_file": (None, None, "needs the checkpoint's chat template"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEMPLATES))
def test_bad_template_fails_before_any_vision_work(folder, tmp_path, monkeypatch, images, case):
    file, template, needle = BAD_TEMPLATES[case]
    ckpt = Path(shutil.copytree(folder, tmp_path / "ckpt"))
    (ckpt / "chat_template.json").unlink()
    if file == "chat_template.json":
        (ckpt / file).write_text(json.dumps({"chat_template": template}))
    elif file is not None:
        (ckpt / file).write_text(template)
    b = load_llava(str(ckpt), dtype="float32")

    def vision_work(*_args, **_kwargs):
        raise AssertionError("vision work ran before the template check")

    monkeypatch.setattr("recomp_eval.models.llava.adapter.LlavaAdapter.preprocess", vision_work)
    monkeypatch.setattr("recomp_eval.models.llava.adapter.LlavaAdapter.tower_pass", vision_work)
    hook = b.model.model.vision_tower.register_forward_pre_hook(vision_work)
    try:
        with pytest.raises(PromptTemplateError) as info:
            generate(
                b,
                build_method("none"),
                images[:1],
                QUESTIONS[:1],
                QUESTIONS[:1],
                "lmms_eval",
                ["a"],
                2,
            )
    finally:
        hook.remove()
    msg = str(info.value)
    assert "\n" not in msg and needle in msg, msg
    assert "protocol=llava15" in msg  # names the way out
    if case != "plain_strings":
        return
    # llava15 does not use the template: the same folder still runs
    monkeypatch.undo()
    (res,) = generate(
        b, build_method("none"), images[:1], QUESTIONS[:1], QUESTIONS[:1], "llava15", ["a"], 1
    )
    assert res.kept_tokens == N_PATCHES


# --------------------------------------------------------------------------- image tokens, pixels


def _captured_input_ids(bundle, method, imgs, texts, protocol) -> torch.Tensor:
    seen = []
    hook = bundle.model.model.register_forward_pre_hook(
        lambda _m, _a, kw: (
            seen.append(kw["input_ids"].clone()) if kw.get("mm_encoder_outputs") else None
        ),
        with_kwargs=True,
    )
    try:
        generate(
            bundle, method, imgs, texts, texts, protocol, [str(i) for i in range(len(imgs))], 1
        )
    finally:
        hook.remove()
    return seen[0]  # [B,L] prefill ids


@pytest.mark.parametrize("protocol", ["llava15", "lmms_eval"])
def test_576_image_tokens_match_processor_expansion(bundle, images, protocol):
    batch = prepare_batch(bundle, images[:1], QUESTIONS[:1], protocol)
    ids, mask = expand_image_tokens(batch.prompt_ids, [N_PATCHES], IMAGE_ID, PAD_ID)
    proc = bundle.processor(images=images[0], text=batch.prompts[0], return_tensors="pt")
    assert torch.equal(proc["input_ids"], ids) and bool(mask.all())
    assert int((ids == IMAGE_ID).sum()) == N_PATCHES
    row = ids[0].tolist()
    at = row.index(IMAGE_ID)
    assert row[at - 1] == 29871 and row[at + N_PATCHES : at + N_PATCHES + 2] == [29871, 13]
    assert len(row) == len(batch.prompt_ids[0]) - 1 + N_PATCHES
    # what generate() feeds the LLM with method none
    fed = _captured_input_ids(bundle, build_method("none"), images[:1], QUESTIONS[:1], protocol)
    assert torch.equal(fed, ids)


def test_llava15_pixels_match_expand2square_reference(bundle, images):
    assert tuple(int(x * 255) for x in bundle.image_processor.image_mean) == (122, 116, 104)
    pixels = prepare_batch(bundle, images, QUESTIONS, "llava15").pixel_values
    assert pixels.shape == (2, 3, 336, 336) and pixels.dtype == torch.float32
    for i, image in enumerate(images):
        ref = torch.from_numpy(llava15_pixels(image))
        diff = (pixels[i].double() - ref).abs().max().item()
        assert diff < 1e-5, f"image {i}: max |difference| {diff:.3g}"
    # the padding is there: the top rows of the wide image are (122, 116, 104), normalised
    # (slightly below 0: int() truncates the mean)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    background = (torch.tensor([122, 116, 104]) / 255 - mean) / std  # [3]
    rows = (500 - 380) // 2 * 336 // 500 - 3  # pad rows less the bicubic support
    torch.testing.assert_close(
        pixels[0, :, :rows], background[:, None, None].expand(3, rows, 336), atol=1e-6, rtol=0
    )


def test_lmms_eval_pixels_are_the_processors(bundle, images):
    pixels = prepare_batch(bundle, images, QUESTIONS, "lmms_eval").pixel_values
    for i, image in enumerate(images):
        stock = bundle.processor(images=image, text="<image>", return_tensors="pt")
        assert torch.equal(pixels[i : i + 1], stock["pixel_values"])
    # centre crop, not padding: the llava15 pixels differ
    assert not torch.allclose(
        pixels, prepare_batch(bundle, images, QUESTIONS, "llava15").pixel_values
    )


# --------------------------------------------------------------------------- RC text signal

# The released RC: first line of the decoded vicuna_v1 prompt (image token removed, specials
# kept): "<s>", the system sentence, "USER:" and the two "▁" pieces around the image token.
OFFICIAL_TEXT = f"<s> {VICUNA_SYSTEM} USER:  "
# openai/clip-vit-large-patch14-336 ids of OFFICIAL_TEXT at max_length 20 (truncated):
# <|startoftext|> < s > a chat between a curious user and an artificial intelligence
# assistant . the assistant gives <|endoftext|>
OFFICIAL_CLIP_IDS = [49406, 283, 338, 285, 320, 2402, 1957, 320, 9865, 7031, 537, 550, 12040,
                     6846, 6799, 269, 518, 6799, 3926, 49407]  # fmt: skip


def test_rc_official_text_signal_with_real_clip_tokenizer(folder, bundle, images, monkeypatch):
    from transformers import CLIPTokenizer

    method = build_method("recomp", variant="official")
    spec = method.spec.text
    assert (spec.source, spec.max_len, spec.pool) == ("first_line", 20, "last")
    batch = prepare_batch(bundle, images, QUESTIONS, "llava15")
    texts = select_texts(spec, QUESTIONS, batch.prompt_ids, bundle.tokenizer, IMAGE_ID)
    assert texts == [OFFICIAL_TEXT, OFFICIAL_TEXT]  # the question does not reach the signal

    clip_tok = CLIPTokenizer.from_pretrained(str(CLIP_HUB))  # the hub files, not the built folder
    ours = clip_tok(OFFICIAL_TEXT, max_length=20, truncation=True, padding="max_length")
    assert ours["input_ids"] == OFFICIAL_CLIP_IDS and all(ours["attention_mask"])
    # the release decodes with the slow Vicuna tokenizer, which writes "<s>A chat" (no space);
    # CLIP's pre-tokenizer splits "<", "s", ">" either way, so its ids are the same
    slow = clip_tok(OFFICIAL_TEXT.replace("<s> ", "<s>"), max_length=20, truncation=True)
    assert slow["input_ids"] == OFFICIAL_CLIP_IDS

    clip = load_clip_text(bundle.clip_text_id, "float32", "cpu")
    ids = torch.tensor([OFFICIAL_CLIP_IDS] * 2)
    with torch.no_grad():
        hidden = clip.model(input_ids=ids).last_hidden_state  # [B,20,D_text]
        expected = clip.model.text_projection(hidden[:, -1])  # [B,D] position 19 = EOT
    torch.testing.assert_close(encode_texts(clip, texts, spec), expected, atol=1e-6, rtol=0)

    # inside generate(): the text tower sees exactly these ids and its e_t is the one above
    seen_ids, seen_embeds = [], []
    hook = clip.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen_ids.append(kw["input_ids"].clone()), with_kwargs=True
    )
    import recomp_eval.models.clip_tower as adapter  # the CLIP-tower steps LLaVA uses

    real_add = adapter.add_text_signal

    def spy(tower_out, text_embeds, projection):
        seen_embeds.append(text_embeds.clone())
        return real_add(tower_out, text_embeds, projection)

    monkeypatch.setattr(adapter, "add_text_signal", spy)
    try:
        res = generate(bundle, method, images, QUESTIONS, QUESTIONS, "llava15", ["a", "b"], 1)
    finally:
        hook.remove()
    assert seen_ids[0].tolist() == [OFFICIAL_CLIP_IDS] * 2
    torch.testing.assert_close(seen_embeds[0], expected, atol=1e-6, rtol=0)
    assert all(0 < r.kept_tokens < N_PATCHES for r in res)


def test_rc_paper_text_signal_pools_the_first_eot(bundle):
    """``paper``: the question, padded to the longest, HF ``text_embeds`` = first EOT position
    (the CLIP config keeps the legacy ``eos_token_id`` 2, so HF finds it by argmax)."""
    from transformers import CLIPTokenizer

    spec = build_method("recomp").spec.text
    assert (spec.source, spec.max_len, spec.pool) == ("question", 77, "eot")
    clip = load_clip_text(bundle.clip_text_id, "float32", "cpu")
    tok = CLIPTokenizer.from_pretrained(str(CLIP_HUB))
    rows = [tok(q)["input_ids"] for q in QUESTIONS]
    assert all(r[0] == 49406 and r[-1] == 49407 for r in rows) and len({len(r) for r in rows}) == 2
    with torch.no_grad():
        expected = torch.cat(
            [
                clip.model.text_projection(
                    clip.model(input_ids=torch.tensor([r])).last_hidden_state[:, -1]
                )
                for r in rows
            ]
        )  # [B,D], each text alone: its last position is its EOT
    torch.testing.assert_close(encode_texts(clip, QUESTIONS, spec), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- logits, methods


def test_none_logits_match_stock_processor_forward(bundle, images):
    """Two-phase path at batch 2 (left padding) vs a stock forward of each sample alone."""
    res = generate(
        bundle,
        build_method("none"),
        images,
        QUESTIONS,
        QUESTIONS,
        "lmms_eval",
        ["a", "b"],
        1,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert len({len(r.prompt) for r in res}) == 2  # different lengths: the batch is padded
    for r, image, text in zip(res, images, QUESTIONS):
        stock = stock_last_logits(bundle, image, text)  # [V]
        assert stock.std() > 0.1  # logits spread enough for the tolerance to mean something
        torch.testing.assert_close(r.logits[0], stock, atol=1e-4, rtol=0)
        assert r.kept_tokens == N_PATCHES


def _build_any(name: str, **kwargs):
    try:
        return build_method(name, **kwargs)
    except (TypeError, ValueError):
        return build_method(name, retention=0.25, **kwargs)


# FastV's default K=2 needs a third decoder layer; the small LLM has two.
OPTIONS = {  # the in-LLM methods' stages fitted to the 2-layer LLM
    "fastv": {"k_layer": 1},
    "dart": {"k_layer": 1},
    "pdrop": {"layer_list": [1], "ratios": [0.5]},
}
CASES = [(name, OPTIONS.get(name, {})) for name in sorted(METHODS)] + [
    ("recomp", {"variant": "official"})
]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=lambda c: str(c))
def test_every_method_batch_1_and_2(bundle, images, name, kwargs):
    method = _build_any(name, **kwargs)
    pair = generate(bundle, method, images, QUESTIONS, QUESTIONS, "llava15", ["s0", "s1"], 1)
    # the second sample alone: a batch-1 assumption ([0] indexing) shows up there
    (alone,) = generate(
        bundle, method, images[1:], QUESTIONS[1:], QUESTIONS[1:], "llava15", ["s1"], 1
    )
    assert alone.kept_tokens == pair[1].kept_tokens
    for r in (*pair, alone):
        assert 0 < r.kept_tokens <= N_PATCHES
        assert len(r.new_token_ids) > 0
        if method.llm is None:
            assert r.kept_tokens == r.compressed.lengths.item()


# --------------------------------------------------------------------------- real widths (slow)


@pytest.fixture(scope="module")
def real_bundle(layouts):
    return load_llava(str(layouts("json", "real")), dtype="float32")


@pytest.mark.slow
def test_real_width_hub_names_and_shapes(layouts, real_bundle):
    folder = layouts("json", "real")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == expected_names(2, 3)
    assert len(set(weight_map.values())) == NUM_SHARDS
    cfg = real_bundle.model.config
    assert (cfg.text_config.hidden_size, cfg.text_config.intermediate_size) == (4096, 11008)
    assert cfg.text_config.num_attention_heads == 32
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_attention_heads) == (1024, 16)
    shapes = {hub_name(k): tuple(v.shape) for k, v in real_bundle.model.state_dict().items()}
    assert shapes["language_model.model.embed_tokens.weight"] == (32064, 4096)
    assert shapes["language_model.lm_head.weight"] == (32064, 4096)
    assert shapes["multi_modal_projector.linear_1.weight"] == (4096, 1024)
    assert shapes["multi_modal_projector.linear_2.weight"] == (4096, 4096)
    assert shapes["vision_tower.vision_model.embeddings.position_embedding.weight"] == (577, 1024)
    patch = shapes["vision_tower.vision_model.embeddings.patch_embedding.weight"]
    assert patch == (1024, 3, 14, 14)
    clip = load_clip_text(real_bundle.clip_text_id, "float32", "cpu")
    assert clip.visual_projection.weight.shape == (768, 1024)
    assert clip.model.text_projection.weight.shape == (768, 768)


@pytest.mark.slow
def test_real_width_none_logits_match_stock_forward(real_bundle, images):
    (res,) = generate(
        real_bundle,
        build_method("none"),
        images[:1],
        QUESTIONS[:1],
        QUESTIONS[:1],
        "lmms_eval",
        ["a"],
        1,
        output_logits=True,
        return_dict_in_generate=True,
    )
    stock = stock_last_logits(real_bundle, images[0], QUESTIONS[0])
    assert stock.std() > 1.0
    torch.testing.assert_close(res.logits[0], stock, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_real_width_rc_official_batch_1_and_2(real_bundle, images):
    method = build_method("recomp", variant="official")
    pair = generate(real_bundle, method, images, QUESTIONS, QUESTIONS, "llava15", ["s0", "s1"], 1)
    (alone,) = generate(
        real_bundle, method, images[1:], QUESTIONS[1:], QUESTIONS[1:], "llava15", ["s1"], 1
    )
    assert alone.kept_tokens == pair[1].kept_tokens
    assert all(0 < r.kept_tokens < N_PATCHES for r in pair)
