"""Experiment tracking: a no-op tracker and a wandb tracker that always finishes.

``logger=wandb`` goes offline automatically when no API key is configured (runs are written under
``<output_dir>/wandb`` and can be synced later with ``wandb sync``). Scalars are logged as
``benchmark/metric``; a samples table carries the image, question, answers, prediction and kept
tokens; keep maps show which patches were kept, recovered and merged. ``finish()`` runs in
``__exit__`` whatever happened, so one failed job does not break a sweep. Each run carries its
``run_key`` (config, summary and a ``run_key:<key>`` tag) so a dashboard run leads back to its
results folder.

Why table media need care (wandb 0.31): a ``wandb.Table`` logged with ``run.log`` is written twice.
The copy that keeps the media is a ``run_table`` artifact (``Table.to_json(artifact)``); its image
files go to wandb's artifact staging folder (``$WANDB_DATA_DIR/artifacts/staging``, outside the run
folder) until the run is synced. The copy under the run's ``files/media/table/`` is written by
``Table.bind_to_run``, which passes the rows through ``_numpy_arrays_to_lists``: that replaces every
``Media`` cell by its class name, so each image cell reads ``"Image"`` and no image file lands in the
run folder. ``run.summary`` takes the same path, and declaring column types changes neither copy (the
types are inferred as ``image-file`` already). So the tracker binds every image to the run first
(the file is written to ``files/media/images/``) and logs a table whose run-file copy stores each
bound cell's own JSON reference (``{"_type": "image-file", "path": "media/images/...", ...}``); the
artifact copy is unchanged. Figures are rendered to PIL at a fixed dpi by the tracker.
"""

from __future__ import annotations

import functools
import io
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

    def set_config(self, values: dict[str, Any]) -> None:
        return None

    def set_run_key(self, run_key: str) -> None:
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


def to_pil(value: Any, dpi: int) -> Any:
    """A PIL image as is; a matplotlib figure rendered to an RGB PIL image at ``dpi`` (left open)."""
    if not hasattr(value, "savefig"):
        return value
    from PIL import Image

    buf = io.BytesIO()
    value.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    with Image.open(buf) as image:
        return image.convert("RGB")


@functools.cache
def _run_media_table() -> type:
    """``wandb.Table`` whose run-file copy references media already bound to the run.

    ``Table.bind_to_run`` writes ``files/media/table/<key>_<step>_<hash>.table.json`` and turns every
    ``Media`` cell into its class name; here bound cells are swapped for their ``to_json(run)``
    reference while that file is written. The ``run_table`` artifact is serialised before, from the
    untouched rows.
    """
    import wandb
    from wandb.data_types import Media

    class RunMediaTable(wandb.Table):
        def bind_to_run(self, run: Any, *args: Any, **kwargs: Any) -> None:
            rows = self.data
            self.data = [
                [
                    cell.to_json(run) if isinstance(cell, Media) and cell.is_bound() else cell
                    for cell in row
                ]
                for row in rows
            ]
            try:
                super().bind_to_run(run, *args, **kwargs)
            finally:
                self.data = rows

    return RunMediaTable


class WandbTracker:
    """One wandb run per (job, method); ``finish`` always runs on exit.

    ``reinit="finish_previous"``: entering a tracker finishes any run still active in the process,
    so trackers used one after the other always make separate runs.
    """

    MEDIA_COLUMNS = ("image", "keep_map")

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
        run_key: str | None = None,
        figure_dpi: int = 100,
    ) -> None:
        self.mode = resolve_mode(mode)
        self.figure_dpi = figure_dpi
        self.run_key = run_key
        config = dict(config)
        tags = list(tags or [])
        if run_key is not None:
            config["run_key"] = run_key
            tags.append(self.run_key_tag(run_key))
        self._kwargs = {
            "project": project,
            "name": name,
            "config": config,
            "dir": str(output_dir),
            "group": group,
            "tags": tags,
            "mode": self.mode,
            "entity": entity,
            "reinit": "finish_previous",
        }
        self.run: Any = None

    @staticmethod
    def run_key_tag(run_key: str) -> str:
        return f"run_key:{run_key}"

    def __enter__(self) -> WandbTracker:
        import wandb

        Path(self._kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(**self._kwargs)
        if self.run_key is not None:
            self.run.summary["run_key"] = self.run_key
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if exc_type else 0)
            self.run = None

    def set_config(self, values: dict[str, Any]) -> None:
        """Add or overwrite config entries of the open run."""
        self.run.config.update(dict(values), allow_val_change=True)

    def set_run_key(self, run_key: str) -> None:
        """Record the results-folder key (config, summary, tag) once it is known."""
        self.run_key = run_key
        self.set_config({"run_key": run_key})
        self.run.summary["run_key"] = run_key
        tag = self.run_key_tag(run_key)
        if tag not in (self.run.tags or ()):
            self.run.tags = (*(self.run.tags or ()), tag)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics))
        for key, value in metrics.items():
            self.run.summary[key] = value

    def log_samples(self, rows: list[dict[str, Any]], key: str = "samples") -> None:
        """Rows with ``image``/``keep_map`` (PIL, figure or None) and scalar fields.

        Each media cell is written to ``files/media/images/<key>_<column>_<step>_<row>.png`` and
        referenced by the run-file table; figures are rendered at ``figure_dpi``, not closed.
        """
        import wandb

        if not rows:
            return
        columns = list(rows[0].keys())
        step = self.run.step
        table = _run_media_table()(columns=columns)
        for i, row in enumerate(rows):
            values = []
            for col in columns:
                value = row[col]
                if col in self.MEDIA_COLUMNS and value is not None:
                    value = wandb.Image(to_pil(value, self.figure_dpi))
                    # Bound before logging: the file moves to the run folder now, else the
                    # run-file table would only say "Image" (see the module docstring).
                    value.bind_to_run(self.run, f"{key}_{col}", step, id_=i)
                elif isinstance(value, (list, dict)):
                    value = str(value)
                values.append(value)
            table.add_data(*values)
        self.run.log({key: table})

    def log_figures(self, figures: dict[str, Any]) -> None:
        import wandb

        self.run.log(
            {key: wandb.Image(to_pil(fig, self.figure_dpi)) for key, fig in figures.items()}
        )

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


def log_samples(tracker: Any, evaluation: Any, spec: Any, record: Any, n: int) -> None:
    """A samples table with images and keep maps for the first ``n`` samples (dashboard only).

    ``evaluation``: the :class:`~recomp_eval.evaluate.Evaluation` (benchmark, model config);
    ``record``: the finished run's record (its folder holds ``samples.jsonl``).
    """
    if tracker.mode == "disabled" or n <= 0:
        return
    import matplotlib.pyplot as plt

    from recomp_eval import keepmap
    from recomp_eval.runner import load_run_rows

    rows_by_id = load_run_rows(Path(record.run_dir))
    bundle, adapter = evaluation.bundle, evaluation.adapter
    table = []
    for sample in evaluation.benchmark:
        row = rows_by_id.get(sample.sample_id)
        if row is None:
            continue
        fig = None
        if row.get("keep_map"):
            fig = keepmap.render_panels(
                adapter.keep_map_panels(bundle, keepmap.decode(row["keep_map"]), row),
                sample.image,
                title=f"{sample.sample_id}: {row['kept_tokens']:.0f} tokens",
            )
        table.append(
            {
                "sample_id": sample.sample_id,
                "image": sample.image,
                "question": sample.question,
                "answers": sample.answers,
                "prediction": row["prediction"],
                "kept_tokens": row["kept_tokens"],
                "keep_map": fig,
            }
        )
        if len(table) >= n:
            break
    tracker.log_samples(table)
    for item in table:
        if item["keep_map"] is not None:
            plt.close(item["keep_map"])
