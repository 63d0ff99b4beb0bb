"""In-LLM visual-token pruning (FastV) through a registered attention function, no eager attention.

``with llm_pruning(model, cfg, image_token_id) as probe:`` registers, for this block only, an
attention function and a mask function under a fresh project-specific name and switches only the
text model to it. Inside:

* prefill, layer ``K-1``: the attention function scores key positions from post-RoPE q/k
  (:mod:`recomp_eval.llm_methods.fastv`, O(H L) memory for ``last_query``) and stores a keep mask;
* ``mask`` variant, layers >= K: the keep mask is ANDed into the attention mask (dropped columns
  hidden from every other row; a dropped row still sees itself), extended with ones in decode;
* ``prune`` variant, layers >= K: decoder-layer pre-hooks gather hidden states (at K), RoPE
  ``(cos, sin)`` (original positions kept), ``position_ids`` and mask rows/columns; in decode only
  the mask columns. The KV cache of layers >= K then holds the pruned prefix (``DynamicCache``).

Per-call state lives in a ``ContextVar`` keyed by the registered name; hooks and registrations are
removed and the previous attention implementation restored in ``finally``. The prune variant
returns hidden states/logits for the kept positions only (the last position is always text).

Letters: ``B`` batch, ``L`` prefill length, ``L'`` kept length, ``E`` LLM width, ``d`` head width.
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

from recomp_eval.llm_methods.fastv import (
    FastVConfig,
    keep_index,
    last_query_scores,
    mean_query_scores,
    select_keep,
)

# Registered name -> state of the active block. Holds no tensors outside a ``with`` block.
_STATES: ContextVar[Mapping[str, _State]] = ContextVar(
    "recomp_llm_pruning_states", default=MappingProxyType({})
)
_NAME_PREFIX = "recomp_fastv_"  # must not contain "sdpa"/"flash"/"flex" (transformers dispatch)
_SUPPORTED_BASE = ("sdpa", "eager")  # attention is always computed with the stock sdpa function


@dataclass
class PruningProbe:
    """What happened during the block; one entry per prefill forward.

    ``visual_counts[i]``: [num_layers, B] int64 visual tokens at each decoder layer's input.
    ``image_masks[i]`` / ``keep_masks[i]``: [B,L] bool image positions / kept positions.
    """

    num_layers: int
    cfg: FastVConfig
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


@dataclass
class _State:
    """Per-block mutable state, reached from the attention function through ``_STATES``."""

    cfg: FastVConfig
    image_token_id: int
    num_layers: int
    probe: PruningProbe
    pending_ids: torch.Tensor | None = None  # [B,L] input_ids of the current top-level call
    image_mask: torch.Tensor | None = None  # [B,L] bool, set at prefill
    keep: torch.Tensor | None = None  # [B,L] bool, None while nothing is dropped
    index: torch.Tensor | None = None  # [B,L'] int64 kept positions
    prefilling: bool = False
    counts: list[torch.Tensor] = field(default_factory=list)  # per layer [B]
    step: dict[str, Any] = field(default_factory=dict)  # per-forward derived tensors

    @property
    def prefill_len(self) -> int:
        return self.image_mask.shape[1]


def causal_allowed(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[1,1,q,kv] bool causal mask; query i sits at key position ``i + kv - q``."""
    rows = torch.arange(q_len, device=device) + (kv_len - q_len)  # [q]
    return (torch.arange(kv_len, device=device)[None, :] <= rows[:, None])[None, None]


def masked_keep(
    mask: torch.Tensor | None, keep: torch.Tensor, q_len: int, kv_len: int
) -> torch.Tensor:
    """AND the keep mask into an attention mask (mask variant); a dropped row still sees itself.

    Args:
        mask: [B|1,1,q,kv] bool (True = attend) or None (plain causal).
        keep: [B,L] bool over the prefill positions; decode columns past ``L`` are kept.
    Returns:
        [B,1,q,kv] bool.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"expected a bool sdpa mask, got {mask.dtype}")
    b, seq = keep.shape
    base = causal_allowed(q_len, kv_len, keep.device) if mask is None else mask  # [B|1,1,q,kv]
    cols = torch.ones(b, kv_len, dtype=torch.bool, device=keep.device)  # [B,kv]
    cols[:, :seq] = keep
    rows = torch.arange(q_len, device=keep.device) + (kv_len - q_len)  # [q]
    self_col = torch.arange(kv_len, device=keep.device)[None, :] == rows[:, None]  # [q,kv]
    return base & (cols[:, None, None, :] | self_col[None, None])  # [B,1,q,kv]


def gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather positions along dim 1: x [B|1,L,...], index [B,L'] -> [B,L',...]."""
    b, kept = index.shape
    x = x.expand(b, *x.shape[1:])  # [B,L,...]
    idx = index.view(b, kept, *([1] * (x.dim() - 2))).expand(b, kept, *x.shape[2:])  # [B,L',...]
    return x.gather(1, idx)  # [B,L',...]


def gather_mask(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows and columns of a prefill mask: [B|1,1,L,L] -> [B,1,L',L']."""
    b, kept = index.shape
    mask = mask.expand(b, *mask.shape[1:])  # [B,1,L,L]
    rows = mask.gather(2, index[:, None, :, None].expand(b, 1, kept, mask.shape[3]))  # [B,1,L',L]
    return rows.gather(3, index[:, None, None, :].expand(b, 1, kept, kept))  # [B,1,L',L']


def gather_cols(mask: torch.Tensor, index: torch.Tensor, prefill_len: int) -> torch.Tensor:
    """Decode mask columns: kept prefix + every decoded position. [B|1,1,q,kv] -> [B,1,q,L'+kv-L]."""
    b, _ = index.shape
    q_len, kv_len = mask.shape[2], mask.shape[3]
    new = torch.arange(prefill_len, kv_len, device=index.device).expand(b, -1)  # [B,kv-L]
    cols = torch.cat([index, new], dim=1)  # [B,L'+kv-L]
    mask = mask.expand(b, *mask.shape[1:])  # [B,1,q,kv]
    index4 = cols[:, None, None, :].expand(b, 1, q_len, cols.shape[1])  # [B,1,q,L'+kv-L]
    return mask.gather(3, index4)  # [B,1,q,L'+kv-L]


def _state(name: str) -> _State:
    state = _STATES.get().get(name)
    if state is None:
        raise RuntimeError(
            f"attention implementation '{name}' was called outside its llm_pruning block (or from "
            f"another thread/context); run the model inside `with llm_pruning(...)`"
        )
    return state


def _attention(module, query, key, value, attention_mask, *, name: str, **kwargs):
    """Stock sdpa attention plus FastV scoring (layer K-1) and masking (mask variant, >= K)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _state(name)
    cfg, layer = state.cfg, module.layer_idx
    if state.prefilling and layer == cfg.k_layer - 1:
        scale = kwargs.get("scaling") or module.scaling
        if cfg.score == "last_query":
            scores = last_query_scores(query, key, attention_mask, scale)  # [B,L]
        else:
            scores = mean_query_scores(query, key, attention_mask, scale)  # [B,L]
        _set_keep(state, select_keep(scores, state.image_mask, cfg))
    if cfg.variant == "mask" and state.keep is not None and layer >= cfg.k_layer:
        attention_mask = _cached(
            state,
            ("mask", id(attention_mask)),
            lambda: masked_keep(attention_mask, state.keep, query.shape[2], key.shape[2]),
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _set_keep(state: _State, keep: torch.Tensor) -> None:
    state.probe.keep_masks.append(keep.detach())
    if bool(keep.all()):
        return  # nothing dropped (R = 0): leave the model exactly as it was
    state.keep = keep
    state.index = keep_index(keep)  # [B,L']


def _cached(state: _State, key: Any, make) -> Any:
    if key not in state.step:
        state.step[key] = make()
    return state.step[key]


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
        state.image_mask = ids == state.image_token_id  # [B,L]
        state.keep, state.index, state.counts = None, None, []
        state.prefilling = True
        state.probe.image_masks.append(state.image_mask)
        return
    if state.image_mask is None or state.image_mask.shape[0] != shape[0]:
        raise RuntimeError("llm_pruning saw a decode step without a matching prefill")
    state.prefilling = False


def _layer_pre_hook(state: _State, layer: int, module, args, kwargs):
    """Log the visual count (prefill) and, for the prune variant, shrink the layer's inputs."""
    cfg = state.cfg
    if state.prefilling:
        visible = state.image_mask if layer < cfg.k_layer or state.keep is None else state.keep
        state.counts.append((state.image_mask & visible).sum(dim=1))  # [B]
        if layer == state.num_layers - 1:
            state.probe.visual_counts.append(torch.stack(state.counts).detach())  # [layers,B]
    if cfg.variant != "prune" or state.keep is None or layer < cfg.k_layer:
        return None
    kwargs = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if not state.prefilling:
        if mask is not None:
            kwargs["attention_mask"] = _cached(
                state, "decode_mask", lambda: gather_cols(mask, state.index, state.prefill_len)
            )
        return args, kwargs
    index = state.index
    pruned = _cached(state, "prefill", lambda: _prune_shared(kwargs, index))
    kwargs.update(pruned)
    hidden = args[0] if args else kwargs["hidden_states"]
    if hidden.shape[1] == state.prefill_len:
        hidden = gather_seq(hidden, index)  # [B,L',E]
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs["hidden_states"] = hidden
    return args, kwargs


def _prune_shared(kwargs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """Gather the per-forward tensors every layer >= K shares: RoPE, position ids, mask."""
    out: dict[str, Any] = {}
    if kwargs.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(
            gather_seq(t, index) for t in kwargs["position_embeddings"]
        )  # cos, sin: [B,L',d]
    if kwargs.get("position_ids") is not None:
        out["position_ids"] = gather_seq(kwargs["position_ids"], index)  # [B,L']
    if kwargs.get("attention_mask") is not None:
        out["attention_mask"] = gather_mask(kwargs["attention_mask"], index)  # [B,1,L',L']
    return out


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


def check_depth(cfg: FastVConfig, num_layers: int) -> None:
    """``k_layer`` must leave at least one decoder layer to run on the pruned sequence."""
    if cfg.k_layer >= num_layers:
        raise ValueError(
            f"FastV k_layer={cfg.k_layer} is at or beyond the LLM's depth ({num_layers} decoder "
            f"layers), so nothing would be pruned; use method.k_layer between 1 and "
            f"{num_layers - 1}"
        )


@contextmanager
def llm_pruning(
    model: torch.nn.Module, cfg: FastVConfig, image_token_id: int
) -> Iterator[PruningProbe]:
    """Apply FastV inside ``model``'s LLM for the duration of the block; yields a probe.

    Args:
        model: ``LlavaForConditionalGeneration`` (or a causal LM whose prompt holds image tokens).
        cfg: FastV settings; nothing dropped (ratio 0) = vanilla outputs; ``cfg.k_layer`` at or
            beyond the decoder depth is an error (it would silently prune nothing).
        image_token_id: id of the image placeholder in ``input_ids`` (``config.image_token_id``).
    """
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

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
    probe = PruningProbe(num_layers=len(layers), cfg=cfg)
    state = _State(cfg=cfg, image_token_id=image_token_id, num_layers=len(layers), probe=probe)
    name = f"{_NAME_PREFIX}{uuid.uuid4().hex[:12]}"
    token = _STATES.set(MappingProxyType({**_STATES.get(), name: state}))
    handles = []
    AttentionInterface.register(name, partial(_attention, name=name))
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
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
        _STATES.reset(token)
