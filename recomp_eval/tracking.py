"""Experiment tracking: a no-op tracker and a wandb tracker that always finishes.

``logger=wandb`` goes offline automatically when no API key is configured (runs are written under
``<output_dir>/wandb`` and can be synced later with ``wandb sync``). Scalars are logged as
``benchmark/metric``; a samples table carries the image, question, answers, prediction and kept
tokens; keep maps show which patches were kept, recovered and merged. ``finish()`` runs in
``__exit__`` whatever happened, so one failed job does not break a sweep.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NullTracker:
    """Tracker that records nothing (``logger=none``)."""

    mode = "disabled"

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        return None

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        return None

    def log_figures(self, figures: dict[str, Any]) -> None:
        return None

    def log_files(self, paths: dict[str, Path]) -> None:
        return None


def has_wandb_key() -> bool:
    """True when an API key is available from the environment or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(requested: str | None) -> str:
    """``online`` only when asked for and a key exists; ``WANDB_MODE`` wins when set."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if requested in (None, "auto", "online"):
        return "online" if has_wandb_key() else "offline"
    return requested


class WandbTracker:
    """One wandb run per (job, method); ``finish`` always runs on exit."""

    def __init__(
        self,
        project: str,
        name: str,
        config: dict[str, Any],
        output_dir: Path,
        group: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = "auto",
        entity: str | None = None,
    ) -> None:
        self.mode = resolve_mode(mode)
        self._kwargs = {
            "project": project,
            "name": name,
            "config": config,
            "dir": str(output_dir),
            "group": group,
            "tags": tags or [],
            "mode": self.mode,
            "entity": entity,
            "reinit": "finish_previous",
        }
        self.run: Any = None

    def __enter__(self) -> WandbTracker:
        import wandb

        Path(self._kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(**self._kwargs)
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if exc_type else 0)
            self.run = None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics))
        for key, value in metrics.items():
            self.run.summary[key] = value

    def log_samples(self, rows: list[dict[str, Any]]) -> None:
        """Rows with ``image`` (PIL or None), ``keep_map`` (figure or None) and scalar fields."""
        import wandb

        if not rows:
            return
        columns = list(rows[0].keys())
        table = wandb.Table(columns=columns)
        for row in rows:
            values = []
            for col in columns:
                value = row[col]
                if col in ("image", "keep_map") and value is not None:
                    value = wandb.Image(value)
                elif isinstance(value, (list, dict)):
                    value = str(value)
                values.append(value)
            table.add_data(*values)
        self.run.log({"samples": table})

    def log_figures(self, figures: dict[str, Any]) -> None:
        import wandb

        self.run.log({key: wandb.Image(fig) for key, fig in figures.items()})

    def log_files(self, paths: dict[str, Path]) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path)) for key, path in paths.items()})


def make_tracker(logger_cfg: dict[str, Any] | None, **kwargs: Any) -> NullTracker | WandbTracker:
    """Tracker from the ``logger`` config group (``name: none|wandb``)."""
    cfg = dict(logger_cfg or {})
    kind = cfg.pop("name", "none")
    if kind in (None, "none"):
        return NullTracker()
    if kind == "wandb":
        return WandbTracker(**{**cfg, **kwargs})
    raise ValueError(f"unknown logger '{kind}'; use logger=none or logger=wandb")
