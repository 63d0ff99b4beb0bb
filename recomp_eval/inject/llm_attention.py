"""In-LLM visual-token pruning, any method, through a registered attention function (no eager).

``with llm_pruning(model, pruner, image_token_id) as probe:`` registers, for this block only, an
attention function and a mask function under a fresh name (``recomp_<pruner.name>_<id>``) and
switches only the text model to it. The mechanics below are family- and method-agnostic; the
method (an :class:`~recomp_eval.llm_methods.base.LLMPruner`, e.g. FastV) only scores and selects.
For each prefill forward:

* the attention function of every ``Stage.attention_layer`` keeps its post-RoPE q/k/v, mask and
  scale (references, no copies) until the stage runs;
* at the input of each ``Stage.prune_layer`` a decoder-layer pre-hook builds a
  :class:`~recomp_eval.llm_methods.base.PruneView` of the current rows, calls
  ``pruner.scores`` then ``pruner.select``, checks the selection (image rows only, the same count
  in every sample) and composes it with the earlier stages;
* ``mask`` variant, from that layer on: the attention function ANDs the kept rows into the
  attention mask (dropped columns hidden from every other row; a dropped row still sees itself),
  extended with ones in decode;
* ``prune`` variant, from that layer on: the pre-hooks gather hidden states (at the stage's
  layer), RoPE ``(cos, sin)``, ``position_ids`` and mask rows/columns; in decode only the mask
  columns. The KV cache of those layers then holds the pruned prefix (``DynamicCache``).
* positions: ``original`` keeps each kept row's RoPE position; ``renumber`` gives the kept rows
  contiguous positions and shifts decode positions by the dropped count (RoPE recomputed with the
  stack's ``rotary_emb``).

Per-call state lives in a ``ContextVar`` keyed by the registered name; hooks and registrations are
removed and the previous attention implementation restored in ``finally``. The prune variant
returns hidden states/logits for the kept positions only (the last position is always text).
The pure mask and index algebra is in :mod:`recomp_eval.inject.llm_masks`; the interface and
its stage checks (:func:`check_depth`, re-exported here) in :mod:`recomp_eval.llm_methods.base`.

Letters: ``B`` batch, ``Lp`` prefill length, ``L'`` kept length, ``E`` LLM width, ``d`` head width.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any

import torch

from recomp_eval.inject import llm_masks as mx
from recomp_eval.llm_methods.base import (
    AttentionInputs,
    LLMPruner,
    PruneView,
    Stage,
    check_depth,
    check_pruner,
)

__all__ = ["PruningProbe", "check_depth", "llm_pruning"]

# Registered name -> state of the active block. Holds no tensors outside a ``with`` block.
_STATES: ContextVar[Mapping[str, _State]] = ContextVar(
    "recomp_llm_pruning_states", default=MappingProxyType({})
)
_NAME_PREFIX = "recomp_"  # + pruner.name + "_" + id
_SUPPORTED_BASE = ("sdpa", "eager")  # attention is always computed with the stock sdpa function


@dataclass
class PruningProbe:
    """What happened during the block; one entry per prefill forward.

    ``visual_counts[i]``: [num_layers, B] int64 visual tokens at each decoder layer's input.
    ``image_masks[i]`` / ``keep_masks[i]``: [B,Lp] bool image positions / positions kept after
    the last stage.
    """

    num_layers: int
    pruner: LLMPruner
    visual_counts: list[torch.Tensor] = field(default_factory=list)
    image_masks: list[torch.Tensor] = field(default_factory=list)
    keep_masks: list[torch.Tensor] = field(default_factory=list)

    @property
    def per_layer_counts(self) -> torch.Tensor:
        """[num_layers, ΣB] int64 over all prefills of the block, in call order."""
        if not self.visual_counts:
            raise RuntimeError("no prefill ran inside the llm_pruning block")
        return torch.cat([c.cpu() for c in self.visual_counts], dim=1)

    @property
    def mean_visual_tokens(self) -> torch.Tensor:
        """[ΣB] float64 average over decoder layers of the visual tokens at each layer's input."""
        return self.per_layer_counts.double().mean(dim=0)


@dataclass(frozen=True)
class _Selection:
    """The rows in force after some stages of one prefill."""

    stage: int  # the last stage that ran
    layer: int  # decoder layer at whose input ``step`` gathers the hidden states
    keep: torch.Tensor  # [B,Lp] bool prompt rows kept
    rows: torch.Tensor | None  # [B,L'] int64 kept prompt rows; None while nothing is dropped
    step: torch.Tensor | None  # [B,L'] int64 index into the previous stage's rows
    dropped: int  # Lp - L'

    @property
    def changed(self) -> bool:
        return self.rows is not None


@dataclass
class _State:
    """Per-block mutable state, reached from the attention function through ``_STATES``."""

    pruner: LLMPruner
    image_token_id: int
    num_layers: int
    probe: PruningProbe
    norm: Any  # the stack's final norm or None
    rotary: Any  # the stack's rotary embedding or None
    stages: tuple[Stage, ...]
    stage_at: dict[int, int]  # prune layer -> stage index
    attention_layers: frozenset[int]
    pending_ids: torch.Tensor | None = None  # [B,Lp] input_ids of the current top-level call
    image_mask: torch.Tensor | None = None  # [B,Lp] bool, set at prefill
    prefilling: bool = False
    active: _Selection | None = None  # in force at the layer being run (prefill)
    layer_sel: list[_Selection | None] = field(default_factory=list)  # per layer, for decode
    captures: dict[int, AttentionInputs] = field(default_factory=dict)  # attention layer -> q/k/v
    counts: list[torch.Tensor] = field(default_factory=list)  # per layer [B]
    step: dict[Any, Any] = field(default_factory=dict)  # per-forward derived tensors

    @property
    def prefill_len(self) -> int:
        return self.image_mask.shape[1]

    @property
    def prune(self) -> bool:
        return self.pruner.variant == "prune"

    @property
    def renumber(self) -> bool:
        return self.pruner.positions == "renumber"


def _state(name: str) -> _State:
    state = _STATES.get().get(name)
    if state is None:
        raise RuntimeError(
            f"attention implementation '{name}' was called outside its llm_pruning block (or from "
            f"another thread/context); run the model inside `with llm_pruning(...)`"
        )
    return state


def _cached(state: _State, key: Any, make) -> Any:
    if key not in state.step:
        state.step[key] = make()
    return state.step[key]


def _attention(module, query, key, value, attention_mask, *, name: str, **kwargs):
    """Stock sdpa attention plus the stage captures (prefill) and the mask variant's masking."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _state(name)
    layer = module.layer_idx
    sel = state.layer_sel[layer]
    if not state.prune and sel is not None and sel.changed:
        attention_mask = _cached(
            state,
            ("mask", sel.stage, id(attention_mask)),
            lambda: mx.masked_keep(attention_mask, sel.keep, query.shape[2], key.shape[2]),
        )
    if state.prefilling and layer in state.attention_layers:
        scale = kwargs.get("scaling") or module.scaling
        state.captures[layer] = AttentionInputs(query, key, value, attention_mask, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _capture_ids(state: _State, module, args, kwargs) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    state.pending_ids = ids if isinstance(ids, torch.Tensor) else None


def _text_model_pre_hook(state: _State, module, args, kwargs) -> None:
    """Detect prefill vs decode for this forward; build the image mask at prefill."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    embeds = kwargs.get("inputs_embeds")
    ids = kwargs.get("input_ids")
    ids = ids if ids is not None else state.pending_ids
    state.pending_ids = None
    state.step = {}
    shape = tuple(embeds.shape[:2]) if embeds is not None else tuple(ids.shape)
    if past == 0:
        if ids is None or tuple(ids.shape) != shape:
            raise ValueError(
                f"llm_pruning needs the prompt input_ids [B,L]={list(shape)} at prefill to find "
                f"image positions (got {None if ids is None else list(ids.shape)}); call the "
                f"model with input_ids"
            )
        state.image_mask = ids == state.image_token_id  # [B,Lp]
        state.active, state.counts, state.captures = None, [], {}
        state.layer_sel = [None] * state.num_layers
        state.prefilling = True
        state.probe.image_masks.append(state.image_mask)
        return
    if state.image_mask is None or state.image_mask.shape[0] != shape[0]:
        raise RuntimeError("llm_pruning saw a decode step without a matching prefill")
    state.prefilling = False


def _layer_pre_hook(state: _State, layer: int, module, args, kwargs):
    """Run a stage at its layer, log the visual count (prefill), shrink the layer's inputs."""
    if state.prefilling:
        stage = state.stage_at.get(layer)
        if stage is not None:
            _run_stage(state, stage, layer, module, args, kwargs)
        sel = state.layer_sel[layer] = state.active
        visible = state.image_mask if sel is None or not sel.changed else sel.keep
        state.counts.append((state.image_mask & visible).sum(dim=1))  # [B]
        if layer == state.num_layers - 1:
            state.probe.visual_counts.append(torch.stack(state.counts).detach())  # [layers,B]
            if sel is not None:
                state.probe.keep_masks.append(sel.keep.detach())
    else:
        sel = state.layer_sel[layer]
    if sel is None or not sel.changed or not (state.prune or state.renumber):
        return None
    kwargs = dict(kwargs)
    if not state.prefilling:
        kwargs.update(
            _cached(state, ("decode", sel.stage), lambda: _decode_shared(state, sel, kwargs))
        )
        return args, kwargs
    kwargs.update(
        _cached(state, ("prefill", sel.stage), lambda: _prefill_shared(state, sel, kwargs))
    )
    if state.prune and layer == sel.layer:
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = mx.gather_seq(hidden, sel.step)  # [B,L',E]
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
    return args, kwargs


def _prefill_shared(state: _State, sel: _Selection, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The per-forward tensors every layer of the selection shares: RoPE, position ids, mask."""
    out: dict[str, Any] = {}
    if state.prune:
        index = mx.position_index(sel.rows, state.renumber)  # [B,L']
    else:  # mask variant, renumbered: the length stays, each kept row reads its new position
        index = mx.renumber_index(sel.keep)  # [B,Lp]
    if kwargs.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(
            mx.gather_seq(t, index) for t in kwargs["position_embeddings"]
        )  # cos, sin: [B,L',d]
    if kwargs.get("position_ids") is not None:
        out["position_ids"] = mx.gather_seq(kwargs["position_ids"], index)  # [B,L']
    if state.prune and kwargs.get("attention_mask") is not None:
        out["attention_mask"] = mx.gather_mask(kwargs["attention_mask"], sel.rows)  # [B,1,L',L']
    return out


def _decode_shared(state: _State, sel: _Selection, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Decode: kept mask columns (prune); positions shifted by the dropped count (renumber)."""
    out: dict[str, Any] = {}
    mask = kwargs.get("attention_mask")
    if state.prune and mask is not None:
        out["attention_mask"] = mx.gather_cols(mask, sel.rows, state.prefill_len)  # [B,1,q,L'+t]
    if state.renumber:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError("llm_pruning with renumbered positions needs position_ids in decode")
        shifted = position_ids - sel.dropped  # [B|1,q]
        like = kwargs["position_embeddings"][0]  # dtype/device reference for the new tables
        out["position_ids"] = shifted
        out["position_embeddings"] = state.rotary(like, shifted)  # cos, sin: [B|1,q,d]
    return out


def _run_stage(state: _State, stage: int, layer: int, module, args, kwargs) -> None:
    """Score and select at the input of ``layer``; compose with the earlier stages."""
    pruner, prev = state.pruner, state.active
    view = _view(state, stage, layer, module, args, kwargs, prev)
    scores = pruner.scores(stage, view)
    keep = pruner.select(stage, scores, view)  # [B,L] over the current rows
    if tuple(keep.shape) != tuple(view.image_mask.shape) or keep.dtype != torch.bool:
        raise ValueError(
            f"in-LLM method '{pruner.name}' stage {stage} returned a {keep.dtype} "
            f"{list(keep.shape)} selection; expected bool {list(view.image_mask.shape)}"
        )
    kept = keep.sum(dim=1)  # [B]
    text_dropped, unequal, everything = torch.stack(
        [(~keep & ~view.image_mask).any(), (kept != kept[0]).any(), keep.all()]
    ).tolist()  # one host sync
    if text_dropped:
        raise ValueError(
            f"in-LLM method '{pruner.name}' stage {stage} dropped non-image rows; a selection may "
            f"drop image rows only"
        )
    if unequal:
        raise ValueError(
            f"in-LLM method '{pruner.name}' stage {stage} kept {kept.tolist()} rows per sample; "
            f"a batch needs the same count in every sample"
        )
    state.captures.pop(state.stages[stage].attention_layer, None)
    if everything:  # nothing dropped here: leave the model exactly as it was
        if prev is None:
            state.active = _Selection(stage, layer, keep, None, None, 0)
        return
    step = mx.keep_index(keep)  # [B,L']
    rows = mx.compose_rows(None if prev is None else prev.rows, keep)  # [B,L']
    full = mx.rows_mask(rows, state.prefill_len)  # [B,Lp]
    state.active = _Selection(stage, layer, full, rows, step, state.prefill_len - rows.shape[1])


def _view(state: _State, stage: int, layer: int, module, args, kwargs, prev) -> PruneView:
    """The current rows as the layer receives them before this stage's selection."""
    hidden = args[0] if args else kwargs["hidden_states"]  # [B,L|Lp,E]
    b = state.image_mask.shape[0]
    current = None if prev is None or not prev.changed else prev.rows  # [B,L]
    position_embeddings = kwargs.get("position_embeddings")
    if current is not None and (state.prune or state.renumber):
        shared = _cached(
            state, ("prefill", prev.stage), lambda: _prefill_shared(state, prev, kwargs)
        )
        position_embeddings = shared.get("position_embeddings")
    attention = state.captures.get(state.stages[stage].attention_layer)
    if current is None:
        rows = mx.all_rows(b, state.prefill_len, state.image_mask.device)  # [B,Lp]
        image = state.image_mask
    else:
        rows = current
        image = state.image_mask.gather(1, current)  # [B,L]
        if not state.prune:  # mask variant: every prompt row is still there; show the kept ones
            hidden = mx.gather_seq(hidden, current)  # [B,L,E]
            if position_embeddings is not None:
                position_embeddings = tuple(mx.gather_seq(t, current) for t in position_embeddings)
            if attention is not None:
                attention = AttentionInputs(
                    mx.gather_heads(attention.query, current),  # [B,H,L,d]
                    mx.gather_heads(attention.key, current),  # [B,Hkv,L,d]
                    mx.gather_heads(attention.value, current),  # [B,Hkv,L,d]
                    None if attention.mask is None else mx.gather_mask(attention.mask, current),
                    attention.scaling,
                )
    return PruneView(
        stage=stage,
        layer=layer,
        image_mask=image,
        rows=rows,
        prompt_images=state.image_mask.sum(dim=1),  # [B]
        hidden=hidden,
        attention=attention,
        position_embeddings=position_embeddings,
        norm=state.norm,
        module=module,
    )


def _text_model(model: torch.nn.Module) -> tuple[torch.nn.Module, str | None]:
    """The decoder stack (a module with ``.layers`` and the text config) and its sub-config key."""
    text_config = model.config.get_text_config()
    for module in model.modules():
        if getattr(module, "config", None) is text_config and hasattr(module, "layers"):
            break
    else:
        raise ValueError(f"no decoder stack with .layers found in {type(model).__name__}")
    if text_config is model.config:
        return module, None
    for key in model.config.sub_configs:
        if getattr(model.config, key, None) is text_config:
            return module, key
    raise ValueError(f"text config of {type(model).__name__} is not a named sub-config")


def _set_impl(model: torch.nn.Module, key: str | None, impl: str) -> None:
    model.set_attn_implementation(impl if key is None else {key: impl})


@contextmanager
def llm_pruning(
    model: torch.nn.Module, cfg: LLMPruner, image_token_id: int
) -> Iterator[PruningProbe]:
    """Apply an in-LLM pruning method inside ``model``'s LLM for the block; yields a probe.

    Args:
        model: ``LlavaForConditionalGeneration`` (or a causal LM whose prompt holds image tokens).
        cfg: the method (``BuiltMethod.llm``, e.g. a FastV config); a selection that keeps every
            row leaves the outputs exactly vanilla; stages that do not fit the decoder depth are
            an error (they would silently prune nothing).
        image_token_id: id of the image placeholder in ``input_ids`` (``config.image_token_id``).
    """
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    check_pruner(cfg)
    text_model, key = _text_model(model)
    layers = list(text_model.layers)
    check_depth(cfg, len(layers))
    previous = text_model.config._attn_implementation
    if previous not in _SUPPORTED_BASE:
        raise NotImplementedError(
            f"llm_pruning wraps sdpa attention; the text model uses '{previous}' (load the model "
            f"with attn_implementation='sdpa')"
        )
    for i, layer in enumerate(layers):
        if getattr(getattr(layer, "self_attn", None), "layer_idx", i) != i:
            raise ValueError(f"decoder layer {i} has self_attn.layer_idx != {i}")
    rotary = getattr(text_model, "rotary_emb", None)
    if cfg.positions == "renumber" and rotary is None:
        raise NotImplementedError(
            f"renumbered positions need the decoder's rotary_emb; {type(text_model).__name__} "
            f"has none"
        )
    stages = tuple(cfg.stages)
    probe = PruningProbe(num_layers=len(layers), pruner=cfg)
    state = _State(
        pruner=cfg,
        image_token_id=image_token_id,
        num_layers=len(layers),
        probe=probe,
        norm=getattr(text_model, "norm", None),
        rotary=rotary,
        stages=stages,
        stage_at={s.prune_layer: i for i, s in enumerate(stages)},
        attention_layers=frozenset(s.attention_layer for s in stages) - {None},
    )
    name = f"{_NAME_PREFIX}{cfg.name}_{uuid.uuid4().hex[:12]}"
    token = _STATES.set(MappingProxyType({**_STATES.get(), name: state}))
    handles = []
    # Attention: an entry of the shared interface instance, removable through its public mapping
    # API (``del``). Mask: transformers looks mask functions up in the class-wide mapping only
    # (masking_utils checks ``ALL_MASK_ATTENTION_FUNCTIONS._global_mapping``), which the public
    # ``register`` fills and nothing public empties: popping our own key is the minimum.
    ALL_ATTENTION_FUNCTIONS[name] = partial(_attention, name=name)
    AttentionMaskInterface.register(name, sdpa_mask)
    try:
        _set_impl(model, key, name)
        handles.append(
            model.register_forward_pre_hook(partial(_capture_ids, state), with_kwargs=True)
        )
        handles.append(
            text_model.register_forward_pre_hook(
                partial(_text_model_pre_hook, state), with_kwargs=True
            )
        )
        for i, layer in enumerate(layers):
            handles.append(
                layer.register_forward_pre_hook(
                    partial(_layer_pre_hook, state, i), with_kwargs=True
                )
            )
        yield probe
    finally:
        for handle in handles:
            handle.remove()
        _set_impl(model, key, previous)
        del ALL_ATTENTION_FUNCTIONS[name]
        AttentionMaskInterface._global_mapping.pop(name, None)
        _STATES.reset(token)
