"""The LLaVA-NeXT family on checkpoints in the llava-hf v1.6 layout (``tests/next_real_layout.py``).

Folders hold the v1.6 hub config, generation, preprocessor and chat-template files
(``tests/data/checkpoints/llava-v1.6-*-hf``), a LLaMA tokenizer (vicuna: llava-1.5's, adjusted to
v1.6-vicuna's added and pad tokens; mistral: a stand-in) and random float16 weights under the
hub's 4.x tensor names. Expectations come from stock transformers (``from_pretrained`` with its
loading report, the stock processor and ``generate``, ``modeling_llava_next``'s anyres helpers),
from the hub files themselves and from LLaVA's conversation rules, never from the project's output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from next_real_layout import (
    NEXT_HUB,
    PROCESSOR_FROM,
    RECORD,
    VARIANTS,
    NextRealLayouts,
    hub_config,
    next_hub_name,
)
from PIL import Image
from real_layout import CLIP_HUB, LLAVA_HUB, NUM_SHARDS, expected_names

from recomp_eval.methods import build_method
from recomp_eval.models import load_model
from recomp_eval.pipeline import generate, prepare_batch

IMAGE_ID = 32000
BOS_ID = 1
PAD_ID = {"vicuna": 0, "mistral": 32001}  # v1.6-vicuna pads with <unk>; mistral with <pad>
BASE = {"vicuna": "vicuna", "mistral": "mistral"}
N = 576  # (336 / 14) ** 2 patches per crop
# (height, width) of a 640x480 and a 672x672 image
WIDE, SQUARE = (480, 640), (672, 672)
# Stock packing of these sizes: both pick the 672x672 pinpoint (2 x 2 grid of 24 x 24 patches, a
# 48 x 48 map); the base crop's 576 patches, then the map unpadded to 480/640 of its height
# (36 rows; 576 patches of the margin dropped) or kept whole, each row closed by a newline.
TOKENS = {WIDE: 576 + 36 * (48 + 1), SQUARE: 576 + 48 * (48 + 1)}  # 2340, 2928
CROPS = 5  # base crop + 2 x 2
QUESTIONS = ["What is the colour of the bus?", "How many people are there?"]
MAX_NEW = 3
# LLaVA's conv_vicuna_v1 system message (llava/conversation.py)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# LLaVA's get_prompt() for one user turn "<image>\n{text}" and an empty assistant turn:
# conv_vicuna_v1 (SeparatorStyle.TWO, sep " ") and conv_mistral_instruct (LLAMA_2, empty system)
LLAVA15_PROMPT = {
    "vicuna": VICUNA_SYSTEM + " USER: <image>\n{} ASSISTANT:",
    "mistral": "[INST] <image>\n{} [/INST]",
}
# what the hub chat templates render (their SOURCES.md; checked against the stock processor)
LMMS_PROMPT = {"vicuna": "USER: <image>\n{} ASSISTANT:", "mistral": "[INST] <image>\n{} [/INST]"}
PROMPTS = {"llava15": LLAVA15_PROMPT, "lmms_eval": LMMS_PROMPT}


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
    built = NextRealLayouts(tmp_path_factory.mktemp("next_real_layout"))
    yield built
    for path in built.root.glob("real-*"):  # real widths: > 1 GB each
        shutil.rmtree(path, ignore_errors=True)


def _config(folder: Path, **options) -> dict:
    cfg = {"family": "llava_next", "id": str(folder), "dtype": "float32", "device": "cpu"}
    return {**cfg, "options": options} if options else cfg


@pytest.fixture(scope="module")
def bundles(layouts):
    return {v: load_model(_config(layouts(v))) for v in VARIANTS}


@pytest.fixture(scope="module")
def stock(layouts):
    """Per variant stock ``from_pretrained`` of the folder: (model, loading info, processor)."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    out = {}
    for v in VARIANTS:
        model, info = LlavaNextForConditionalGeneration.from_pretrained(
            str(layouts(v)), dtype=torch.float32, output_loading_info=True
        )
        processor = AutoProcessor.from_pretrained(str(layouts(v)), backend="pil")
        out[v] = (model.eval(), info, processor)
    return out


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_image(*WIDE, seed=0), _image(*SQUARE, seed=1)]


def _structured(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def stock_prompt(processor, variant: str, protocol: str, text: str) -> str:
    """llava15: LLaVA's conversation (literal); lmms_eval: the stock processor's chat template."""
    if protocol == "llava15":
        return LLAVA15_PROMPT[variant].format(text)
    return processor.apply_chat_template(_structured(text), add_generation_prompt=True)


# --------------------------------------------------------------------------- the folder itself


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_load_with_hub_names_and_nothing_missing(layouts, bundles, stock, variant):
    from safetensors import safe_open

    folder = layouts(variant)
    _, info, _ = stock[variant]
    assert {k: list(v) for k, v in info.items()} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []
    }  # fmt: skip
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    # llava-1.5's real tensor names (same LLM, projector and tower names) plus image_newline
    assert set(weight_map) == expected_names(2, 3) | {"image_newline"}
    assert all(not k.startswith("model.") for k in weight_map)  # 4.x names, not 5.x
    shards = sorted(folder.glob("model-*.safetensors"))
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{NUM_SHARDS:05d}.safetensors" for i in range(1, NUM_SHARDS + 1)
    ]
    # the project's load: every tensor of the files is a parameter and every parameter comes from
    # the files (nothing unexpected, nothing re-initialised)
    loaded = bundles[variant].model.state_dict()
    assert {next_hub_name(k) for k in loaded} == set(weight_map)
    total = 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            names = set(f.keys())
            assert names == {k for k, v in weight_map.items() if v == shard.name}
            for name in names:
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.float16
                total += tensor.numel() * tensor.element_size()
    assert total == index["metadata"]["total_size"]
    for name, value in loaded.items():
        with safe_open(str(folder / weight_map[next_hub_name(name)]), "pt") as f:
            assert torch.equal(f.get_tensor(next_hub_name(name)).float(), value), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_is_the_hub_file_with_widths_shrunk(layouts, bundles, variant):
    hub = hub_config(variant)
    ours = json.loads((layouts(variant) / "config.json").read_text())
    shrunk = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "projection_dim"}  # fmt: skip
    assert {k: v for k, v in ours.items() if k not in ("text_config", "vision_config")} == {
        k: v for k, v in hub.items() if k not in ("text_config", "vision_config")
    }
    for sub in ("text_config", "vision_config"):
        assert {k: v for k, v in ours[sub].items() if k not in shrunk} == {
            k: v for k, v in hub[sub].items() if k not in shrunk
        }
    cfg = bundles[variant].model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    assert cfg.image_grid_pinpoints == hub["image_grid_pinpoints"]
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == IMAGE_ID and cfg.text_config.vocab_size == 32064
    assert cfg.text_config.model_type == {"vicuna": "llama", "mistral": "mistral"}[variant]
    if variant == "mistral":  # grouped-query attention kept, as the hub's 32 / 8
        assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads


@pytest.mark.parametrize("variant", VARIANTS)
def test_hub_files_and_tokenizer_are_consistent(layouts, bundles, variant):
    folder, hub = layouts(variant), NEXT_HUB[variant]
    for name in ("generation_config.json", "chat_template.json"):
        assert (folder / name).read_bytes() == (hub / name).read_bytes(), name
    pre = folder / "preprocessor_config.json"
    assert pre.read_bytes() == (PROCESSOR_FROM / "preprocessor_config.json").read_bytes()
    assert (folder / "tokenizer.model").read_bytes() == (LLAVA_HUB / "tokenizer.model").read_bytes()
    record = json.loads((folder / RECORD).read_text())
    assert record["variant"] == variant and set(record["sources"]) >= {
        p.name for p in folder.iterdir() if p.is_file() and p.name != RECORD and
        not p.name.startswith("model")
    }  # fmt: skip

    b = bundles[variant]
    tok, cfg, gen = b.tokenizer, b.model.config, b.model.generation_config
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID == cfg.image_token_id
    assert tok("<image>", add_special_tokens=False)["input_ids"] == [IMAGE_ID]
    assert tok.padding_side == "left" and tok.pad_token_id == PAD_ID[variant]
    assert (tok.bos_token_id, tok.eos_token_id) == (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    added = json.loads((folder / "added_tokens.json").read_text())
    if variant == "vicuna":
        # v1.6-vicuna: only <image> added (23 B on the Hub), pad <unk> = text_config / generation
        assert (
            added == {"<image>": IMAGE_ID} and (folder / "added_tokens.json").stat().st_size == 23
        )
        assert len(tok) == 32001 and "<pad>" not in tok.get_vocab()
        assert tok.pad_token == "<unk>" and tok.pad_token_id == cfg.text_config.pad_token_id
        assert gen.pad_token_id == tok.pad_token_id
    else:  # the hub's added tokens; the vocabulary is the LLaMA stand-in's
        assert added == json.loads((hub / "added_tokens.json").read_text())
        assert tok.pad_token == "<pad>" and len(tok) == 32002
        assert gen.pad_token_id is None  # the hub file names none
    proc = b.processor
    assert type(proc).__name__ == "LlavaNextProcessor"
    assert (proc.patch_size, proc.vision_feature_select_strategy) == (14, "default")
    assert proc.num_additional_image_tokens == 1
    assert (
        proc.chat_template == json.loads((hub / "chat_template.json").read_text())["chat_template"]
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_loads_through_the_family_loader(layouts, bundles, variant):
    b = bundles[variant]
    assert type(b.adapter).__name__ == "LlavaNextAdapter"
    assert b.adapter.base == BASE[variant]
    assert (b.adapter.scope, b.adapter.newlines) == ("per_crop", "row")
    assert b.model.dtype == torch.float32 and not b.model.training
    ip = b.image_processor
    assert type(ip).__name__ == "LlavaNextImageProcessorPil"
    pinpoints = hub_config(variant)["image_grid_pinpoints"]
    assert [list(p) for p in ip.image_grid_pinpoints] == pinpoints
    pre = json.loads((PROCESSOR_FROM / "preprocessor_config.json").read_text())
    assert pre["image_grid_pinpoints"] == pinpoints
    assert ip.do_pad and ip.resample == 3 and ip.size.shortest_edge == 336
    assert (ip.crop_size.height, ip.crop_size.width) == (336, 336)
    assert b.clip_text_id == str(layouts(variant) / "clip")


def test_clip_vision_tower_is_the_llava_tower(layouts, bundles):
    from transformers import CLIPModel

    folder = layouts("vicuna")
    clip = CLIPModel.from_pretrained(str(folder / "clip"))
    ours = bundles["vicuna"].model.model.vision_tower.state_dict()
    theirs = clip.vision_model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(theirs[name].float(), value), name
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (folder / "clip" / name).read_bytes() == (CLIP_HUB / name).read_bytes()


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("protocol", ["llava15", "lmms_eval"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prompts_render_with_one_image_token(bundles, stock, images, variant, protocol):
    b = bundles[variant]
    batch = prepare_batch(b, images[:1], QUESTIONS[:1], protocol)
    prompt = batch.prompts[0]
    assert prompt == PROMPTS[protocol][variant].format(QUESTIONS[0])
    assert prompt == stock_prompt(stock[variant][2], variant, protocol, QUESTIONS[0])
    assert prompt.count("<image>") == 1
    ids = batch.prompt_ids[0]
    assert ids.count(IMAGE_ID) == 1
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1  # the tokenizer's BOS, not the prompt's
    assert stock[variant][2].tokenizer(prompt)["input_ids"] == ids


# --------------------------------------------------------------------------- none = stock

PARITY = [
    ("vicuna", "llava15"),
    ("mistral", "lmms_eval"),
    pytest.param("vicuna", "lmms_eval", marks=pytest.mark.slow),
    pytest.param("mistral", "llava15", marks=pytest.mark.slow),
]


def _stock_generate(model, processor, prompts, images, protocol, max_new):
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    kwargs = {}
    if protocol == "lmms_eval":  # lmms-eval's llava_hf: EOS and pad from the tokenizer
        eos = processor.tokenizer.eos_token_id
        kwargs = {"eos_token_id": eos, "pad_token_id": eos}
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new,
                             output_logits=True, return_dict_in_generate=True,
                             **kwargs)  # fmt: skip
    return inputs, out


@pytest.mark.parametrize(("variant", "protocol"), PARITY)
def test_none_equals_stock_processor_and_generate(bundles, stock, images, variant, protocol):
    """`none` through the project = stock processor + stock ``generate``, for a 640x480 image
    (5 crops, unpadded) and a 672x672 one (5 crops, no unpadding) in one left-padded batch."""
    model, _, processor = stock[variant]
    prompts = [stock_prompt(processor, variant, protocol, q) for q in QUESTIONS]
    inputs, ref = _stock_generate(model, processor, prompts, images, protocol, MAX_NEW)
    assert inputs["image_sizes"].tolist() == [list(WIDE), list(SQUARE)]
    assert tuple(inputs["pixel_values"].shape) == (2, CROPS, 3, 336, 336)
    counts = (inputs["input_ids"] == IMAGE_ID).sum(dim=1).tolist()
    assert counts == [TOKENS[WIDE], TOKENS[SQUARE]] == [2340, 2928]

    res = generate(bundles[variant], build_method("none"), images, QUESTIONS, QUESTIONS, protocol,
                   ["a", "b"], MAX_NEW, output_logits=True,
                   return_dict_in_generate=True)  # fmt: skip
    new = ref.sequences[:, inputs["input_ids"].shape[1] :]
    for i, r in enumerate(res):
        assert r.prompt == prompts[i]
        assert r.kept_tokens == counts[i] == r.image["image_tokens"]
        assert r.image["crops"] == CROPS and r.image["size"] == list((WIDE, SQUARE)[i])
        assert r.new_token_ids == new[i].tolist()
        stock_logits = torch.stack([x[i] for x in ref.logits])  # [new, V]
        assert stock_logits[0].std() > 0.1  # spread enough for the tolerance to mean something
        torch.testing.assert_close(r.logits[0], stock_logits[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(r.logits, stock_logits, atol=1e-4, rtol=0)
    assert res[0].image["margin_dropped"] == N and res[1].image["margin_dropped"] == 0


# --------------------------------------------------------------------------- budgets

RETENTION = 64 / 576


def test_per_crop_budget_at_real_shapes(bundles, images):
    """64 of 576 per crop: 5 x 64 patch tokens on the 672x672 image, plus the row newlines."""
    method = build_method("recomp", variant="paper", retention=RETENTION)
    (res,) = generate(bundles["vicuna"], method, images[1:], QUESTIONS[1:], QUESTIONS[1:],
                      "llava15", ["b"], 1)  # fmt: skip
    info = res.image
    assert info["crops"] == CROPS and info["scope"] == "per_crop"
    assert info["kept_per_crop"] == [64] * CROPS
    assert info["margin_dropped"] == 0 and info["summary_tokens"] == 0
    assert 0 < info["newlines"] <= 48  # a newline per map row that keeps a token
    assert res.kept_tokens == 64 * CROPS + info["newlines"]


def test_global_budget_is_one_budget_over_the_crops(layouts, images):
    """``scope: global``: one budget of round(64/576 * 5 * 576) = 320 over the five crops
    (``random``: exactly the budget, no summary token; RC is the per-crop test's)."""
    bundle = load_model(_config(layouts("vicuna"), scope="global"))
    assert bundle.adapter.scope == "global"
    method = build_method("random", retention=RETENTION)
    (res,) = generate(bundle, method, images[1:], QUESTIONS[1:], QUESTIONS[1:], "llava15",
                      ["b"], 1)  # fmt: skip
    info = res.image
    budget = round(RETENTION * CROPS * N)
    assert budget == 320
    assert info["crops"] == CROPS and info["scope"] == "global"
    assert info["margin_dropped"] == 0 and info["summary_tokens"] == 0  # no unpadding at 672
    assert sum(info["kept_per_crop"]) == budget
    assert len(set(info["kept_per_crop"])) > 1  # one budget: the crops' shares differ
    assert res.kept_tokens == budget + info["newlines"]


# --------------------------------------------------------------------------- settings refused

# settings a folder can carry with these weights (a list of feature layers would also change
# the projector's input width, which stock loading refuses before the adapter sees the config)
BAD = {"vision_feature_select_strategy": "full"}


@pytest.mark.parametrize("setting", sorted(BAD))
def test_unsupported_config_is_a_one_line_error(layouts, tmp_path, setting):
    src = layouts("vicuna")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for path in src.iterdir():  # the shards by link, the rest copied
        if path.name.endswith(".safetensors"):
            (folder / path.name).symlink_to(path)
        elif path.is_dir():
            shutil.copytree(path, folder / path.name)
        else:
            shutil.copyfile(path, folder / path.name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[setting] = BAD[setting]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    with pytest.raises(ValueError) as info:
        load_model(_config(folder))
    msg = str(info.value)
    assert "\n" not in msg and setting in msg, msg


# --------------------------------------------------------------------------- real widths (slow)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_real_width_none_first_logits_match_stock(layouts, images, variant):
    """The hub's widths (LLM 4096, vision 1024; depths cut): loading report, shapes, and the
    first-step logits of `none` against the stock processor + ``generate``."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    folder = layouts(variant, "real")
    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    inner = model.model
    assert tuple(inner.multi_modal_projector.linear_1.weight.shape) == (4096, 1024)
    assert tuple(inner.image_newline.shape) == (4096,)
    assert tuple(model.lm_head.weight.shape) == (32064, 4096)
    processor = AutoProcessor.from_pretrained(str(folder), backend="pil")
    prompts = [stock_prompt(processor, variant, "llava15", q) for q in QUESTIONS]
    inputs, ref = _stock_generate(model.eval(), processor, prompts, images, "llava15", 1)
    del model
    bundle = load_model(_config(folder))
    res = generate(bundle, build_method("none"), images, QUESTIONS, QUESTIONS, "llava15",
                   ["a", "b"], 1, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    counts = (inputs["input_ids"] == IMAGE_ID).sum(dim=1).tolist()
    for i, r in enumerate(res):
        assert r.kept_tokens == counts[i]
        assert ref.logits[0][i].std() > 1.0
        torch.testing.assert_close(r.logits[0], ref.logits[0][i], atol=1e-3, rtol=1e-4)
