"""Per-patch keep maps: what happened to each patch of one sample, for plots and dashboards.

Codes (one digit per patch, raster order, so a map serialises as a short string):
0 dropped, 1 kept (no score / pooled / CLS-adjacent), 2 kept by attention, 3 recovered by text,
4 merge centre, 5 absorbed into a merged or contextual token, 6 absorbed only by the summary token.
"""

from __future__ import annotations

import numpy as np
import torch

from recomp_eval.methods.base import Role

DROPPED, KEPT, ATTENTION, TEXT, CENTRE, ABSORBED, SUMMARY_ONLY = range(7)
LABELS = ["dropped", "kept", "attention", "text", "merge centre", "merged", "summary only"]
COLOURS = ["#000000", "#bbbbbb", "#d62728", "#2ca02c", "#1f77b4", "#9ecae1", "#7f7f7f"]


def keep_map(role: torch.Tensor, source: torch.Tensor, members: torch.Tensor) -> np.ndarray:
    """Code per patch for one sample.

    Args:
        role: [T] int8 roles of the sample's valid output tokens.
        source: [T] int64 source patch (-1 when none).
        members: [T,N] bool patches absorbed by each token.
    Returns:
        [N] uint8 codes (see module docstring); a patch takes its strongest role.
    """
    n = members.shape[-1]
    codes = np.zeros(n, dtype=np.uint8)
    role_np = role.cpu().numpy()
    source_np = source.cpu().numpy()
    members_np = members.cpu().numpy()
    summary = role_np == int(Role.SUMMARY)
    if summary.any():
        codes[members_np[summary].any(0)] = SUMMARY_ONLY
    absorbing = np.isin(role_np, [int(Role.MERGED), int(Role.CONTEXTUAL), int(Role.POOLED)])
    if absorbing.any():
        codes[members_np[absorbing].any(0)] = ABSORBED
    by_role = {
        int(Role.KEPT): KEPT,
        int(Role.CLS): KEPT,
        int(Role.CONTEXTUAL): CENTRE,
        int(Role.MERGED): CENTRE,
        int(Role.ATTENTION): ATTENTION,
        int(Role.TEXT): TEXT,
    }
    for r, code in by_role.items():  # later entries win: attention/text over centre over kept
        hit = (role_np == r) & (source_np >= 0)
        codes[source_np[hit]] = code
    return codes


def encode(codes: np.ndarray) -> str:
    return "".join(str(int(c)) for c in codes)


def decode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")


def render(codes: np.ndarray, grid: tuple[int, int], image=None, title: str = ""):
    """A matplotlib figure of the keep map, over the (resized) image when given."""
    return render_panels([("", codes.reshape(grid))], image, title)


def render_panels(panels: list[tuple[str, np.ndarray]], image=None, title: str = ""):
    """One figure with a keep map per panel (``(label, [rows, cols] codes)``), each over the
    (resized) image when given: LLaVA-1.5 has one panel, LLaVA-NeXT its base crop and its grid
    crops' map (both cover the whole image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
    for ax, (label, grid_codes) in zip(axes[0], panels):
        rows, cols = grid_codes.shape
        style = {"cmap": ListedColormap(COLOURS), "vmin": 0, "vmax": 6}
        if image is not None:
            ax.imshow(image, extent=(0, cols, rows, 0))
            ax.imshow(grid_codes, alpha=0.55, extent=(0, cols, rows, 0), **style)
        else:
            ax.imshow(grid_codes, **style)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{title} {label}".strip(), fontsize=8)
    present = sorted({int(c) for _, codes in panels for c in codes.reshape(-1)})
    fig.legend(
        handles=[Patch(color=COLOURS[c], label=LABELS[c]) for c in present],
        fontsize=6,
        loc="lower center",
        ncol=min(len(present), 7) or 1,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
