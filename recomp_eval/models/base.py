"""What the pipeline needs from a model family: the :class:`ModelAdapter` interface.

The pipeline, the runner and the evaluation know no family. They hold a :class:`ModelBundle`
(model, tokenizer, processor, device, dtype and its ``adapter``) and ask the adapter for every
step that differs between families: prompt rendering per protocol, image preprocessing, the
vision tower's hook points, a tower pass, the vision signals (with the grid from the config),
the text signal, projection into the LLM, the prompt with ``T_i`` visual tokens per sample,
generation, and the shapes FLOPs and keep maps need. A family that cannot supply a signal
leaves it out of ``supported_signals``; a method needing it stops with one line
(:func:`check_signals`).

Families live in packages ``recomp_eval/models/<family>/`` and are found through the lazy
registry of :mod:`recomp_eval.models`.

Letters: B batch, N patches, C tower width, D CLIP joint width, E LLM width, T_i kept tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from recomp_eval.efficiency.flops import DecoderShape
from recomp_eval.methods.base import Compressed, VisionSignals

PROBE_TEXT = "What is shown here?"  # a user turn used to check a template before any work


class PromptTemplateError(ValueError):
    """A chat template that cannot render this protocol's prompt (message: one line)."""


def check_prompt(prompt: str, text: str, image_token: str, protocol: str) -> None:
    """One line naming the template problem when a rendered prompt lacks the user turn or does
    not hold exactly one image placeholder (checked before any vision work)."""
    count = prompt.count(image_token)
    if count != 1:
        raise PromptTemplateError(
            f"protocol={protocol} renders {count} '{image_token}' placeholders instead of one "
            f"({prompt[:80]!r}); the checkpoint's chat template does not render the image part "
            f"of structured content: fix the template or use protocol=llava15"
        )
    if text.strip() and text.strip() not in prompt:
        raise PromptTemplateError(
            f"protocol={protocol} renders an empty user turn ({prompt[:80]!r}): the chat "
            f"template drops the text; fix the template or use protocol=llava15"
        )


# The signals a family can supply to pre-LLM methods (names of VisionSignals fields).
SIGNALS = (
    "features", "cls_attn", "keys", "cls_feature", "text_sim", "seeds", "projected",
    "patch_embeds", "text_embeds",
)  # fmt: skip


@dataclass(frozen=True)
class ModelShapes:
    """Sizes read from the config: visual tokens, their grid, the decoder, one tower pass."""

    patches: int  # N visual tokens of one image before compression
    grid: tuple[int, int]  # (rows, cols) of the patch grid, for keep maps
    decoder: DecoderShape  # LLM sizes for prefill FLOPs
    vision_flops: int  # FLOPs of one vision-tower pass over one image
    context_length: int  # the LLM's max_position_embeddings
    # one patch grid for every image (targets and keep maps on ``grid``); False where the patches
    # an image has vary (LLaVA-NeXT's crops: keep maps cover each image's own crops)
    fixed_grid: bool = True


@dataclass(frozen=True)
class HookPoints:
    """Where the q/k captures attach: the tower, its depth and its layer-``i`` attention."""

    tower: torch.nn.Module
    num_layers: int
    num_heads: int
    # layer index -> module with q_proj / k_proj; None: the family's tower pass captures what the
    # method needs itself (Qwen2.5-VL's fused qkv under window attention)
    attention: Callable[[int], torch.nn.Module] | None


@dataclass
class TowerOutput:
    """What one vision-side run produced (before the text signal and the method)."""

    signals: VisionSignals
    last_hidden: torch.Tensor  # [B,N+1,C] the tower's last hidden state (RC's Z)
    layout: Any = None  # the batch's BatchLayout (the text signal repeats texts per item)


@dataclass(frozen=True)
class BatchLayout:
    """How a batch's tower items map to its samples.

    ``items[i]``: tower items of sample ``i`` (LLaVA-1.5: one image each; LLaVA-NeXT: its
    crops), in order; ``data``: what else the family needs later (LLaVA-NeXT: image sizes).
    """

    items: tuple[int, ...]
    data: Any = None

    @classmethod
    def one_each(cls, batch: int) -> BatchLayout:
        return cls(items=(1,) * batch)

    def item_sample(self) -> list[int]:
        """The sample of every tower item, [P]."""
        return [i for i, k in enumerate(self.items) for _ in range(k)]

    def repeat(self, values: Sequence[Any]) -> list[Any]:
        """Per-sample ``values`` repeated for each of the sample's tower items."""
        return [values[i] for i in self.item_sample()]


@dataclass
class ModelBundle:
    """A loaded checkpoint, its preprocessing and the family adapter that drives it.

    ``clip_text_id`` names the CLIP checkpoint text-guided methods use (families with a CLIP
    text tower); ``auto_image_processor_class`` is what ``AutoProcessor`` would have picked on
    this machine (the family may pin another class).
    """

    model: Any
    tokenizer: Any
    processor: Any
    model_id: str
    dtype: torch.dtype
    device: torch.device
    clip_text_id: str = ""
    adapter: Any = None
    auto_image_processor_class: str | None = field(default=None, compare=False)

    @property
    def image_processor(self) -> Any:
        return self.processor.image_processor

    @property
    def image_processor_class(self) -> str:
        """Name of the image-processor class the pixels come from (recorded in results)."""
        return type(self.processor.image_processor).__name__

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def image_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)


@runtime_checkable
class ModelAdapter(Protocol):
    """One model family. Methods take the bundle; tensors keep the model's device and dtype."""

    family: str
    supported_signals: frozenset[str]

    def resolve(self, model_id: str) -> str:
        """The folder or hub id a configured ``model.id`` loads from (special ids built here)."""

    def load(
        self,
        model_id: str,
        dtype: str | torch.dtype,
        device: str | torch.device,
        attn_implementation: str,
        clip_text_id: str | None,
        device_map: str | dict[str, Any] | None = None,  # `auto`: one model over several GPUs
    ) -> ModelBundle: ...

    def render_prompt(self, bundle: ModelBundle, protocol: str, user_text: str) -> str:
        """The full prompt with exactly one image placeholder."""

    def check_prompt(self, bundle: ModelBundle, protocol: str, prompt: str, text: str) -> None:
        """One-line error when a rendered prompt cannot work (before any vision work)."""

    def template_source(self, bundle: ModelBundle, protocol: str) -> str:
        """Where the prompt format comes from, for the record."""

    def follows(self, protocol: str) -> str:
        """The reference harness whose prompts and generation the protocol reproduces."""

    def text_tower_path(self, checkpoint: str, clip_text_id: str | None) -> str:
        """Where a text-guided method's text tower loads from (fingerprinted with the run)."""

    def text_pairing(self, bundle: ModelBundle) -> dict[str, Any]:
        """Whether the text tower's checkpoint pairs with the model's vision tower (recorded)."""

    def preprocess(self, bundle: ModelBundle, images: Sequence[Any], protocol: str) -> torch.Tensor:
        """``pixel_values`` [P,3,S,S]: the batch's tower items for the protocol's image handling
        (one per image, or several: LLaVA-NeXT's crops)."""

    def layout(
        self, bundle: ModelBundle, images: Sequence[Any], pixel_values: torch.Tensor
    ) -> BatchLayout:
        """Which tower items belong to which sample (and the family's data for later steps)."""

    def hook_points(self, model: Any) -> HookPoints: ...

    def tower_pass(
        self,
        bundle: ModelBundle,
        pixel_values: torch.Tensor,
        probe: Any,
        extra_q: Sequence[int] = (),
        extra_k: Sequence[int] = (),
        layout: BatchLayout | None = None,
    ) -> Any:
        """One tower pass under ``probe``'s hooks, as a :class:`~recomp_eval.inject.vision_cache.TowerPass`."""

    def last_hidden(self, bundle: ModelBundle, pixel_values: torch.Tensor,
                    layout: BatchLayout | None = None) -> torch.Tensor:  # fmt: skip
        """A plain tower pass's last hidden state [B,N+1,C] (RC ``official``'s repeated pass)."""

    def check_method(self, method: Any) -> None:
        """One line when the family cannot run ``method`` as configured (beyond its signals)."""

    def signals(
        self,
        bundle: ModelBundle,
        done: Any,
        spec: Any,
        seeds: torch.Tensor | None,
        layout: BatchLayout | None = None,
    ) -> TowerOutput:
        """The vision signals ``spec`` asks for, from a tower pass ``done`` (one row per tower
        item; ``seeds`` [B] per sample)."""

    def apply(
        self, bundle: ModelBundle, method: Any, tower_out: TowerOutput, layout: BatchLayout | None
    ) -> Any:
        """Run ``method`` on the signals: on the tower items, or grouped as the family's
        compression scope asks (the output goes to :meth:`project` and :meth:`provenance`)."""

    def add_text_signal(
        self,
        bundle: ModelBundle,
        tower_out: TowerOutput,
        spec: Any,
        questions: Sequence[str],
        prompt_ids: Sequence[Sequence[int]],
        user_texts: Sequence[str] = (),
    ) -> None:
        """Set ``tower_out.signals.text_sim`` [B,N] (``spec.text.output == "similarity"``) or
        ``text_embeds`` [B,M,D] and ``text_mask`` [B,M] (``"embeddings"``) for a text-guided
        method; ``user_texts`` are the user turns (question plus protocol suffix)."""

    def project(
        self, bundle: ModelBundle, compressed: Any, layout: BatchLayout | None = None
    ) -> list[torch.Tensor]:
        """B x [T_i, E] LLM inputs per sample, in the order the LLM sees them."""

    def provenance(
        self, bundle: ModelBundle, compressed: Any, layout: BatchLayout | None
    ) -> list[tuple[Compressed, dict[str, Any]]]:
        """Per sample: a CPU :class:`Compressed` [1,T_i] whose rows are the LLM's visual tokens
        in order (features dropped; patches indexed over the whole image), and the family's
        facts about the image for the row (``{}`` when there are none)."""

    def expand_prompt(
        self, bundle: ModelBundle, prompt_ids: Sequence[Sequence[int]], lengths: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` [B,L] and ``attention_mask`` [B,L] with ``T_i`` visual placeholders."""

    def generate(
        self,
        bundle: ModelBundle,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        features: Sequence[torch.Tensor],
        provenance: Sequence[tuple[Compressed, dict[str, Any]]] | None = None,
        **generate_kwargs: Any,
    ) -> Any:
        """``generate`` with the projected features; returns [B, L + new] sequences.
        ``provenance``: per sample what :meth:`provenance` gave (its visual tokens' sources and
        the family's facts: what a family with spatial positions, Qwen2.5-VL's M-RoPE, places
        the tokens by)."""

    def shapes(self, bundle: ModelBundle) -> ModelShapes: ...

    def keep_map_panels(self, bundle: ModelBundle, codes: Any, row: dict[str, Any]) -> list[Any]:
        """A sample's keep-map codes [N] (``row``: its samples.jsonl row) as ``(label, [rows,
        cols])`` panels covering the whole image, for :func:`recomp_eval.keepmap.render_panels`."""


def working_methods(adapter: Any) -> list[str]:
    """The registered methods whose signals ``adapter``'s family supplies."""
    from recomp_eval.methods import METHODS, build_method

    return sorted(
        name
        for name in METHODS
        if not required_signals(build_method(name).spec) - set(adapter.supported_signals)
    )


def required_signals(spec: Any) -> set[str]:
    """The :data:`SIGNALS` a method's :class:`~recomp_eval.methods.base.SignalSpec` needs."""
    needed = {"features"}
    if spec.cls_attn is not None:
        needed.add("cls_attn")
    if spec.keys is not None:
        needed.add("keys")
    if spec.cls_feature:
        needed.add("cls_feature")
    if spec.text is not None:
        needed.add("text_embeds" if spec.text.output == "embeddings" else "text_sim")
    if spec.needs_seeds:
        needed.add("seeds")
    if spec.patch_embeds is not None:
        needed.add("patch_embeds")
    if spec.projected:
        needed.add("projected")
    return needed


def check_signals(method: Any, adapter: Any) -> None:
    """One line when ``method`` needs a signal the family cannot supply, naming what works."""
    missing = sorted(required_signals(method.spec) - set(adapter.supported_signals))
    if not missing:
        return
    working = working_methods(adapter)
    raise ValueError(
        f"method '{method.name}' needs {', '.join(missing)}, which the {adapter.family} family "
        f"cannot supply; methods that work with {adapter.family}: {', '.join(working)}"
    )


def resolve_model_id(model_id: str, special: str, build: Callable[[], Any]) -> str:
    """A configured ``model.id``: ``special`` (a family's tiny id) builds its offline folder; a
    relative folder is looked up in the working directory, then in the repository; anything
    else is a hub id."""
    from pathlib import Path

    from recomp_eval.config_path import CONFIG_DIR

    if model_id == special:
        return str(build())
    path = Path(model_id).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    in_repo = CONFIG_DIR.parent / path
    return str(in_repo) if in_repo.exists() else model_id


def run_method(method: Any, tower_out: TowerOutput) -> Compressed:
    """``method`` on the tower items' signals; the CLS attention, when captured, is added to the
    output's ``patch_scores`` for diagnostics (where the method looked)."""
    compressed = method(tower_out.signals)
    if tower_out.signals.cls_attn is not None:
        compressed.patch_scores.setdefault("cls_attn", tower_out.signals.cls_attn)  # [B,N]
    return compressed


def provenance_cpu(c: Compressed) -> Compressed:
    """Provenance copy on CPU; features are dropped (an empty last axis) to keep results small."""
    return Compressed(
        features=c.features.new_zeros((*c.features.shape[:2], 0), device="cpu"),
        lengths=c.lengths.cpu(),
        source=c.source.cpu(),
        role=c.role.cpu(),
        members=c.members.cpu(),
        stats={k: v.detach().cpu() for k, v in c.stats.items()},
        patch_scores={k: v.detach().float().cpu() for k, v in c.patch_scores.items()},
    )
