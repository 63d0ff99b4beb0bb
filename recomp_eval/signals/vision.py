"""Vision-side signals from a CLIP tower under sdpa: q/k forward hooks, CLS attention, keys.

Hooks on ``encoder.layers[l].self_attn.{q_proj,k_proj}`` capture the raw projections
[B,N+1,C] (bias included, before the head split and the query scaling). From them:

- ``concat_heads`` CLS attention (PruMerge/RC release): the H heads treated as one C-wide head,
  ``softmax(q_cls . K^T * C**-0.5)``, CLS->CLS column dropped.
- ``mean_heads`` CLS attention (VisionZip/FasterVLM): per-head ``softmax(q_cls,h . K_h^T *
  d**-0.5)``, averaged over heads, CLS column dropped. Equals eager ``attentions[l][:, :, 0, 1:]``
  averaged over heads.

Only the CLS query row is formed (O(N) per head), never the N x N map. Everything is computed in
the dtype of the captured tensors (the model dtype). Letters: B batch, N patches, C width,
H heads, d = C / H head width, D CLIP joint width.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

CLS_INDEX = 0  # CLIP puts the class token first
_SEED_BYTES = 8
_SEED_MASK = (1 << 63) - 1


def resolve_layer(layer: int, num_layers: int) -> int:
    """Turn a negative layer offset (-1 = last) into an index in ``[0, num_layers)``."""
    idx = layer + num_layers if layer < 0 else layer
    if not 0 <= idx < num_layers:
        raise ValueError(f"layer {layer} does not exist in a tower of {num_layers} layers")
    return idx


@dataclass
class QKProbe:
    """Captures written by the q/k hooks of one context (never stored on the modules)."""

    q: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B,N+1,C]
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B,N+1,C]
    calls: dict[str, int] = field(default_factory=dict)  # "q5" / "k5" -> times the hook fired

    def clear(self) -> None:
        self.q.clear()
        self.k.clear()
        self.calls.clear()

    def require(self, kind: str, layer: int) -> torch.Tensor:
        """The capture of ``kind`` ('q' or 'k') at ``layer``; raises if the hook never fired."""
        store = self.q if kind == "q" else self.k
        if layer not in store:
            raise RuntimeError(
                f"the {kind}_proj hook of vision layer {layer} did not fire; the tower must run "
                f"all its layers inside the capture context"
            )
        return store[layer]


def attention_module(tower: torch.nn.Module, layer: int) -> torch.nn.Module:
    """Layer ``layer``'s attention of a transformers 5.x CLIP tower (``q_proj``/``k_proj``)."""
    try:
        return tower.encoder.layers[layer].self_attn
    except (AttributeError, IndexError) as err:
        raise RuntimeError(
            f"vision tower {type(tower).__name__} has no encoder.layers[{layer}].self_attn "
            f"(expected a transformers 5.x CLIPVisionModel)"
        ) from err


@contextmanager
def capture_qk(
    tower: torch.nn.Module,
    q_layers: Iterable[int],
    k_layers: Iterable[int],
    attention: Callable[[int], torch.nn.Module] | None = None,
) -> Iterator[QKProbe]:
    """Register forward hooks on ``q_proj`` / ``k_proj`` of the given layers; remove on exit.

    Args:
        tower: the vision tower (a CLIPVisionModel by default).
        q_layers, k_layers: resolved (non-negative) layer indices.
        attention: layer index -> the module holding ``q_proj``/``k_proj`` (a family's hook
            points); default :func:`attention_module` (``encoder.layers[i].self_attn``).
    """
    attention = attention or (lambda layer: attention_module(tower, layer))
    probe = QKProbe()
    handles = []
    try:
        for kind, layers in (("q", sorted(set(q_layers))), ("k", sorted(set(k_layers)))):
            store = probe.q if kind == "q" else probe.k
            for layer in layers:
                proj = getattr(attention(layer), f"{kind}_proj", None)
                if proj is None:
                    raise RuntimeError(f"vision layer {layer} has no {kind}_proj to hook")
                handles.append(proj.register_forward_hook(_make_hook(probe, store, kind, layer)))
        yield probe
    finally:
        for handle in handles:
            handle.remove()


def _make_hook(probe: QKProbe, store: dict[int, torch.Tensor], kind: str, layer: int):
    key = f"{kind}{layer}"

    def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        store[layer] = output.detach()  # [B,N+1,C]
        probe.calls[key] = probe.calls.get(key, 0) + 1

    return hook


def cls_attention_concat(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """CLS attention with all heads as one C-wide head (PruMerge/RC release).

    Args:
        q, k: [B,N+1,C] raw projections (CLS at index 0).
    Returns:
        [B,N] ``softmax(q_cls . K^T * C**-0.5)`` over all N+1 keys, CLS column dropped.
    """
    width = q.shape[-1]
    logits = torch.einsum("bc,bnc->bn", q[:, CLS_INDEX], k) * width**-0.5  # [B,N+1]
    return logits.softmax(dim=-1)[:, CLS_INDEX + 1 :]  # [B,N]


def cls_attention_mean_heads(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head CLS attention averaged over heads (VisionZip/FasterVLM).

    Args:
        q, k: [B,N+1,C] raw projections; ``num_heads`` H divides C.
    Returns:
        [B,N] mean over heads of ``softmax(q_cls,h . K_h^T * d**-0.5)``, CLS column dropped.
    """
    b, n1, width = k.shape
    d = width // num_heads
    q_cls = q[:, CLS_INDEX].view(b, num_heads, d)  # [B,H,d]
    k_heads = k.view(b, n1, num_heads, d)  # [B,N+1,H,d]
    logits = torch.einsum("bhd,bnhd->bhn", q_cls, k_heads) * d**-0.5  # [B,H,N+1]
    return logits.softmax(dim=-1).mean(dim=1)[:, CLS_INDEX + 1 :]  # [B,N]


def patch_keys(k: torch.Tensor, form: str, num_heads: int) -> torch.Tensor:
    """Patch rows of the keys: ``full`` [B,N,C] or ``mean_heads`` [B,N,d]."""
    patches = k[:, CLS_INDEX + 1 :]  # [B,N,C]
    if form == "full":
        return patches
    if form == "mean_heads":
        b, n, width = patches.shape
        return patches.view(b, n, num_heads, width // num_heads).mean(dim=2)  # [B,N,d]
    raise ValueError(f"unknown key form '{form}'; use 'full' or 'mean_heads'")


def joint_space_similarity(
    text_embeds: torch.Tensor, last_hidden: torch.Tensor, visual_projection: torch.nn.Module
) -> torch.Tensor:
    """RC text score ``s = normalize(e_t) . normalize(visual_projection(Z_j)) * D**-0.5``.

    Args:
        text_embeds: [B,D] projected text embedding ``e_t``.
        last_hidden: [B,N+1,C] ViT ``last_hidden_state`` (before ``post_layernorm``).
        visual_projection: Linear C -> D (no bias).
    Returns:
        [B,N] similarity per patch (CLS excluded), in the dtype of ``last_hidden``.
    """
    patches = visual_projection(last_hidden[:, CLS_INDEX + 1 :])  # [B,N,D]
    dim = patches.shape[-1]
    p = torch.nn.functional.normalize(patches, dim=-1)  # [B,N,D]
    t = torch.nn.functional.normalize(text_embeds.to(p.dtype), dim=-1)  # [B,D]
    return torch.einsum("bd,bnd->bn", t, p) * dim**-0.5  # [B,N]


def joint_space_patches(
    features: torch.Tensor,
    post_layernorm: torch.nn.Module,
    visual_projection: torch.nn.Module,
    mode: str,
) -> torch.Tensor:
    """Joint-space embeddings of feature-layer patches, ``visual_projection(post_layernorm(z))``.

    Args:
        features: [B,N,C] patch rows of the feature layer (CLS removed), tower dtype.
        post_layernorm: the tower's final LayerNorm (C).
        visual_projection: the CLIP pair's Linear C -> D (no bias).
        mode: ``ln_in_tower_dtype`` (layer norm in the features' dtype, projection in fp32:
            CDPruner) or ``fp32`` (both in fp32: TRIM).
    Returns:
        [B,N,D] float32, not normalised.
    """
    if mode == "fp32":
        ln = post_layernorm
        normed = torch.nn.functional.layer_norm(
            features.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps
        )  # [B,N,C]
    elif mode == "ln_in_tower_dtype":
        normed = post_layernorm(features).float()  # [B,N,C]
    else:
        raise ValueError(f"unknown patch_embeds mode '{mode}'; use ln_in_tower_dtype or fp32")
    bias = visual_projection.bias
    return torch.nn.functional.linear(
        normed, visual_projection.weight.float(), None if bias is None else bias.float()
    )  # [B,N,D]


def sample_seeds(sample_ids: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """[B] int64 seeds, a stable hash (SHA-256) of each sample id (same across processes)."""
    seeds = [
        int.from_bytes(hashlib.sha256(str(s).encode()).digest()[:_SEED_BYTES], "little")
        & _SEED_MASK
        for s in sample_ids
    ]
    return torch.tensor(seeds, dtype=torch.int64, device=device)
