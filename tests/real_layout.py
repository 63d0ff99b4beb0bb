"""Checkpoint folders in the real llava-hf layout: hub files, random weights, hub tensor names.

``build_real_layout(dest, template, size)`` writes a folder that loads through
:func:`recomp_eval.models.llava.loader.load_llava` exactly like a download of
``llava-hf/llava-1.5-7b-hf``:

- ``config.json``: the hub file (``tests/data/checkpoints/llava-1.5-7b-hf/config.json``) with only
  the widths and depths of :data:`SIZES` written over it; image 336, patch 14 (576 patches),
  ``vision_feature_layer`` -2, strategy ``default``, ``image_token_index`` 32000, pad 32001, vocab
  32064, ``max_position_embeddings`` 4096 and the gelu projector stay as the hub has them;
- the hub's tokenizer, processor and generation files, byte for byte; the chat template as
  ``chat_template.json`` (``template="json"``, as the hub folder), ``chat_template.jinja``
  (``"jinja"``) or both (``"both"``);
- seeded random weights in float16 under the hub's tensor names (``language_model.model.*``,
  ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``:
  the 4.x names; 5.x ``save_pretrained`` would drop the ``vision_model.`` level), in
  :data:`NUM_SHARDS` shards ``model-0000i-of-0000n.safetensors`` with
  ``model.safetensors.index.json``;
- ``clip/``: the CLIP tokenizer files of ``openai/clip-vit-large-patch14-336`` and a ``CLIPModel``
  whose vision tower holds the same weights as the LLaVA tower (LLaVA-1.5 froze it), so the text
  signal of RC pairs with LLaVA's patches as with the real towers.

``real_layout.json`` in the folder records the build (size, template, kept layers).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).parent / "data" / "checkpoints"
LLAVA_HUB = DATA / "llava-1.5-7b-hf"  # byte copies of the hub folder (no weights)
CLIP_HUB = DATA / "clip-vit-large-patch14-336"  # CLIP tokenizer files + reconstructed config
JINJA_HUB = DATA / "chat_template.jinja.llava-1.5-7b-hf"
TEMPLATES = ("json", "jinja", "both")
NUM_SHARDS = 3  # as the hub folder
SEED = 0
WEIGHT_SCALE = 3.0  # random LLMs give near-flat logits; scaling spreads them (see models/tiny.py)

# Files of the hub folder copied as they are (config.json is rewritten; weights are new).
LLAVA_FILES = (
    "added_tokens.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
)
CLIP_FILES = (
    "merges.txt",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "vocab.json",
)

# What is written over the hub configs. ``small``: every width shrunk (fast on CPU); ``real``: the
# hub's widths (LLM 4096 / 11008 / 32 heads = LlamaConfig's defaults, which the hub file relies
# on; vision 1024 / 4096 / 16 heads; CLIP text 768 / 3072 / 12 heads), only the depths cut.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "small": {
        "text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
        "vision": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "projection_dim": 32,
        },
        "clip_text": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 32,
        },
    },
    "real": {
        "text": {"num_hidden_layers": 2},
        "vision": {"num_hidden_layers": 3},
        "clip_text": {"num_hidden_layers": 2},
    },
}

# transformers 5.x module names -> the hub's tensor names (4.x layout).
_TO_HUB = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
_LAYER = re.compile(
    r"^(language_model\.model|vision_tower\.vision_model\.encoder)\.layers\.(\d+)\."
)


def hub_name(name: str) -> str:
    """The hub's tensor name for a ``LlavaForConditionalGeneration`` state-dict key (5.x)."""
    for new, old in _TO_HUB:
        if name.startswith(new):
            return old + name[len(new) :]
    raise KeyError(f"no hub name for '{name}'")


def hub_weight_map() -> dict[str, str]:
    """The real checkpoint's ``weight_map`` (686 tensors, 32 LLM and 24 vision layers)."""
    index = json.loads((LLAVA_HUB / "model.safetensors.index.json").read_text())
    return index["weight_map"]


def expected_names(text_layers: int, vision_layers: int) -> set[str]:
    """The hub's tensor names less the layers past ``text_layers`` / ``vision_layers``."""
    keep = {"language_model.model": text_layers, "vision_tower.vision_model.encoder": vision_layers}
    names = set()
    for name in hub_weight_map():
        m = _LAYER.match(name)
        if m is None or int(m.group(2)) < keep[m.group(1)]:
            names.add(name)
    return names


def llava_config(size: str) -> dict[str, Any]:
    """The hub ``config.json`` with :data:`SIZES` ``[size]`` written over its sub-configs."""
    cfg = json.loads((LLAVA_HUB / "config.json").read_text())
    cfg["text_config"].update(SIZES[size]["text"])
    cfg["vision_config"].update(SIZES[size]["vision"])
    return cfg


def clip_config(llava: dict[str, Any], size: str) -> dict[str, Any]:
    """The (reconstructed) CLIP ``config.json``: shrunk text tower, LLaVA's vision tower."""
    cfg = json.loads((CLIP_HUB / "config.json").read_text())
    cfg["text_config"].update(SIZES[size]["clip_text"])
    vision = {k: v for k, v in llava["vision_config"].items() if k != "vocab_size"}
    cfg["vision_config"].update(vision)
    cfg["projection_dim"] = cfg["text_config"]["projection_dim"] = vision["projection_dim"]
    return cfg


def _save_shards(state: dict[str, torch.Tensor], folder: Path, num_shards: int) -> None:
    """Write ``state`` (hub names) as ``num_shards`` safetensors files plus the hub-style index."""
    from safetensors.torch import save_file

    names = sorted(state)  # the hub index's order
    sizes = [state[k].numel() * state[k].element_size() for k in names]
    total = sum(sizes)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    start = 0
    for name, size in zip(names, sizes):  # shard = where the tensor starts, in total / num_shards
        shards[min(num_shards - 1, start * num_shards // total)][name] = state[name].contiguous()
        start += size
    if not all(shards):
        raise ValueError(f"cannot split {len(names)} tensors into {num_shards} non-empty shards")
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_weights(cfg: dict[str, Any], dest: Path) -> torch.nn.Module:
    """A seeded random ``LlavaForConditionalGeneration`` for ``cfg``, saved in float16 (as the
    hub's weights) under the hub's names."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(LlavaConfig.from_dict(copy.deepcopy(cfg))).eval()
    with torch.no_grad():
        for p in (*model.model.language_model.parameters(), model.lm_head.weight):
            if p.dim() > 1:
                p.mul_(WEIGHT_SCALE)
    model = model.half()
    _save_shards({hub_name(k): v for k, v in model.state_dict().items()}, dest, NUM_SHARDS)
    return model


def _write_clip(cfg: dict[str, Any], size: str, tower: torch.nn.Module, dest: Path) -> None:
    """``dest``: the CLIP tokenizer files and a ``CLIPModel`` whose vision half is ``tower``."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    dest.mkdir()
    clip_cfg = clip_config(cfg, size)
    torch.manual_seed(SEED + 1)
    clip = CLIPModel(CLIPConfig.from_dict(copy.deepcopy(clip_cfg))).eval().half()
    clip.vision_model.load_state_dict(tower.state_dict())
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    _write_json(dest / "config.json", clip_cfg)
    for name in CLIP_FILES:
        shutil.copyfile(CLIP_HUB / name, dest / name)


def build_real_layout(dest: Path, template: str = "json", size: str = "small") -> Path:
    """Write a real-layout checkpoint folder at ``dest`` (created; must not exist) and return it.

    Args:
        dest: the checkpoint folder to create.
        template: ``json`` (only ``chat_template.json``, as the hub folder), ``jinja`` (only
            ``chat_template.jinja``) or ``both``.
        size: ``small`` (all widths shrunk) or ``real`` (the hub's widths, depths cut).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template '{template}'; use one of {TEMPLATES}")
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}'; use one of {sorted(SIZES)}")
    dest = Path(dest)
    dest.mkdir(parents=True)
    cfg = llava_config(size)
    model = _write_weights(cfg, dest)
    _write_json(dest / "config.json", cfg)
    for name in LLAVA_FILES:
        shutil.copyfile(LLAVA_HUB / name, dest / name)
    if template in ("json", "both"):
        shutil.copyfile(LLAVA_HUB / "chat_template.json", dest / "chat_template.json")
    if template in ("jinja", "both"):
        shutil.copyfile(JINJA_HUB, dest / "chat_template.jinja")
    _write_clip(cfg, size, model.model.vision_tower, dest / "clip")
    record = {
        "size": size,
        "template": template,
        "seed": SEED,
        "text_layers": cfg["text_config"]["num_hidden_layers"],
        "vision_layers": cfg["vision_config"]["num_hidden_layers"],
    }
    _write_json(dest / "real_layout.json", record)
    return dest


class RealLayouts:
    """Builds each (template, size) once under ``root`` (one per test session)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._built: dict[tuple[str, str], Path] = {}

    def __call__(self, template: str = "json", size: str = "small") -> Path:
        key = (template, size)
        if key not in self._built:
            self._built[key] = build_real_layout(self.root / f"{size}-{template}", template, size)
        return self._built[key]
