"""``Sample``, the ``Benchmark`` protocol and the shared hub/parquet benchmark implementation.

A benchmark streams samples lazily: the text columns of the split are read once, images are
decoded one sample at a time when ``sample.image`` is first touched (the iterator touches it to
screen bad records unless ``check_images=False``). Bad records never crash a run: they are
skipped and listed in :meth:`HubBenchmark.report` with their ids and reasons; grayscale, RGBA and
other non-RGB images are converted and listed too.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from recomp_eval.benchmarks.loading import BadImageError, SplitSource, decode_image, load_split


@dataclass
class Sample:
    """One evaluation question.

    Attributes:
        sample_id: stable, unique within the benchmark split.
        benchmark: ``gqa``, ``vqav2``, ``textvqa``, ``pope`` or ``mme``.
        question: the question exactly as the dataset gives it (no suffix, no OCR line).
        answers: ground truth strings (10 for VQAv2/TextVQA, 1 otherwise; empty on test splits).
        meta: split, category, image_id, question_id, ocr_tokens, ... (benchmark-specific).
    """

    sample_id: str
    benchmark: str
    question: str
    answers: list[str]
    meta: dict[str, Any]
    load_image: Callable[[], Image.Image] = field(repr=False, compare=False)
    _image: Image.Image | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def image(self) -> Image.Image:
        """The RGB image, decoded on first access and cached."""
        if self._image is None:
            self._image = self.load_image()
        return self._image


@dataclass(frozen=True)
class BadSample:
    sample_id: str
    reason: str
    detail: str = ""


@runtime_checkable
class Benchmark(Protocol):
    """What the runner needs from a benchmark."""

    name: str
    version: int

    def __iter__(self) -> Iterator[Sample]: ...

    def __len__(self) -> int: ...

    def report(self) -> dict[str, Any]: ...

    def targets(self, sample_ids: Sequence[str], grid: tuple[int, int]) -> dict[str, np.ndarray]:
        """Target-object patch masks per sample id (``{}`` when the data has none)."""
        ...


def _no_image() -> Image.Image:
    raise RuntimeError("sample_ids() builds samples without images")


class HubBenchmark:
    """Shared loader; subclasses set ``name`` and implement :meth:`make_sample`.

    Args mirror ``configs/benchmark/<name>.yaml``: dataset ids/revision/config/split, an optional
    ``data_dir`` with local parquet, ``limit`` (max samples; ``limit_seed`` None takes the first
    ones, an int takes a seeded random subset in dataset order), ``filters`` (column -> allowed
    values, e.g. POPE ``category``), ``max_image_pixels`` (larger images are skipped),
    ``check_images`` (decode while iterating to screen bad records). ``prompt_template``,
    ``metrics``, ``answer_pipeline``, ``primary`` (per protocol), ``submission`` (EvalAI writer
    for test splits) and ``version`` are declarative: :mod:`recomp_eval.benchmarks.specs` reads
    them into a :class:`~recomp_eval.benchmarks.specs.BenchmarkSpec` for the prompt, scoring and
    loyalty code.
    """

    name: str = ""
    answered_splits_optional: frozenset[str] = frozenset()  # test splits without ground truth
    group_column: str | None = None  # limit keeps whole groups (MME image pairs)

    def __init__(
        self,
        dataset_id: str,
        split: str,
        revision: str = "main",
        config_name: str | None = None,
        alt_dataset_id: str | None = None,
        data_dir: str | None = None,
        limit: int | None = None,
        limit_seed: int | None = None,
        filters: Mapping[str, Sequence[Any]] | None = None,
        max_image_pixels: int | None = None,
        check_images: bool = True,
        prompt_template: str = "{question}{suffix}",
        metrics: Mapping[str, Sequence[str]] | None = None,
        answer_pipeline: Mapping[str, Sequence[str]] | None = None,
        primary: Mapping[str, str] | None = None,
        submission: str | None = None,
        version: int = 0,
        name: str | None = None,
    ) -> None:
        if name is not None and name != self.name:
            raise ValueError(f"config name '{name}' does not match benchmark class '{self.name}'")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {limit}")
        self.dataset_id, self.alt_dataset_id = dataset_id, alt_dataset_id
        self.split, self.revision, self.config_name = split, revision, config_name
        self.data_dir, self.limit, self.limit_seed = data_dir, limit, limit_seed
        self.filters = {k: list(v) for k, v in (filters or {}).items()}
        self.max_image_pixels, self.check_images = max_image_pixels, check_images
        self.prompt_template = prompt_template
        self.metrics = {k: list(v) for k, v in (metrics or {}).items()}
        self.answer_pipeline = {k: list(v) for k, v in (answer_pipeline or {}).items()}
        self.primary = dict(primary or {})
        self.submission = submission
        self.version = version
        self.bad: list[BadSample] = []
        self.converted: dict[str, str] = {}
        self._table = None
        self._tags: dict[str, dict[str, Any]] | None = None  # SynthVQA tags, read on first use
        self._indices: list[int] | None = None
        self.source: SplitSource | None = None

    # --- loading --------------------------------------------------------------------------------

    def load(self, config_name: str | None = None):
        """Load one (config, split) of this benchmark's dataset (images undecoded)."""
        ds, source = load_split(
            self.name,
            self.dataset_id,
            self.split,
            revision=self.revision,
            config_name=config_name or self.config_name,
            alt_dataset_id=self.alt_dataset_id,
            data_dir=self.data_dir,
        )
        return ds, source

    def _ensure_loaded(self) -> None:
        if self._table is not None:
            return
        table, self.source = self.load()
        self._table = table
        self._text = table.remove_columns([c for c in table.column_names if c == "image"])
        self._indices = self._select_indices()
        self.prepare()

    def prepare(self) -> None:
        """Hook for extra loading (GQA images); runs once after the main table is loaded."""

    def _select_indices(self) -> list[int]:
        n = self._text.num_rows
        keep = np.ones(n, dtype=bool)  # [n]
        for column, allowed in self.filters.items():
            if column not in self._text.column_names:
                raise KeyError(f"filter column '{column}' not in {self._text.column_names}")
            values = np.asarray(self._text[column], dtype=object)  # [n]
            keep &= np.isin(values, np.asarray(allowed, dtype=object))
        rows = np.flatnonzero(keep)  # [n_kept]
        if self.limit is None or self.limit >= rows.size:
            return rows.tolist()
        groups = (
            np.asarray(self._text[self.group_column], dtype=object)[rows]
            if self.group_column
            else rows
        )
        _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        group_order = np.argsort(first)  # groups in dataset order
        if self.limit_seed is not None:
            group_order = np.random.default_rng(self.limit_seed).permutation(group_order)
        sizes = np.bincount(inverse)
        taken = np.cumsum(sizes[group_order]) <= self.limit
        taken[0] = True  # always at least one group
        chosen = np.isin(inverse, group_order[taken])
        return rows[chosen].tolist()

    # --- iteration ------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Rows selected after filters and limit (bad records are found while iterating)."""
        self._ensure_loaded()
        return len(self._indices)

    def image_cell(self, index: int, row: Mapping[str, Any]) -> Any:
        """The undecoded image of row ``index`` (GQA overrides: images live in another config)."""
        return self._table[index]["image"]

    def make_sample(self, index: int, row: Mapping[str, Any], load_image) -> Sample:
        raise NotImplementedError

    def _loader(self, index: int, row: Mapping[str, Any], sample_id_box: list[str]):
        def load() -> Image.Image:
            image, mode = decode_image(self.image_cell(index, row), self.max_image_pixels)
            if mode != "RGB":
                self.converted[sample_id_box[0]] = f"{mode}->RGB"
            return image

        return load

    def __iter__(self) -> Iterator[Sample]:
        return self.iterate()

    def sample_ids(self) -> list[str]:
        """The ids of the selected rows, in order (no image is decoded): what a run shards."""
        self._ensure_loaded()
        ids = []
        for index in self._indices:
            sample = self.make_sample(index, self._text[index], _no_image)
            ids.append(sample.sample_id)
        return ids

    def iterate(
        self, skip: Collection[str] = (), only: Collection[str] | None = None
    ) -> Iterator[Sample]:
        """Samples in order; ids in ``skip`` (already done on resume) or not in ``only`` (another
        process's shard) are passed over before their image is decoded or screened, so
        ``report()`` then covers this process's samples."""
        self._ensure_loaded()
        self.bad, self.converted = [], {}
        seen: set[str] = set()
        for index in self._indices:
            row = self._text[index]
            box: list[str] = [""]
            sample = self.make_sample(index, row, self._loader(index, row, box))
            box[0] = sample.sample_id
            if sample.sample_id in seen:
                raise ValueError(f"{self.name}: duplicate sample_id {sample.sample_id!r}")
            seen.add(sample.sample_id)
            if sample.sample_id in skip or (only is not None and sample.sample_id not in only):
                continue
            reason = self._screen(sample)
            if reason is not None:
                self.bad.append(BadSample(sample.sample_id, *reason))
                continue
            yield sample

    def _screen(self, sample: Sample) -> tuple[str, str] | None:
        if not sample.question or not sample.question.strip():
            return ("empty_question", "")
        if not sample.answers and self.split not in self.answered_splits_optional:
            return ("no_answers", "")
        if self.check_images:
            try:
                _ = sample.image
            except BadImageError as err:
                return (err.reason, err.detail)
        return None

    def targets(self, sample_ids: Sequence[str], grid: tuple[int, int]) -> dict[str, np.ndarray]:
        """Patch masks ``[H*W]`` bool of the object each question asks about, on the model's
        ``grid``, for the samples that have one.

        A data folder that ships SynthVQA's ``tags.parquet`` supplies them (the scenes are
        re-generated from their ``scene_id``; :mod:`recomp_eval.synth.targets`); the real
        benchmarks return ``{}`` (GQA's scene-graph object boxes would be the next source).
        """
        if not self.data_dir or not (Path(self.data_dir) / "tags.parquet").exists():
            return {}
        from recomp_eval.synth.targets import masks_for
        from recomp_eval.synth.writers import read_tags

        if self._tags is None:
            self._tags = read_tags(self.data_dir)
        return masks_for(self._tags, sample_ids, grid)

    def report(self) -> dict[str, Any]:
        """Bad-record bookkeeping for the result record (valid after a full iteration)."""
        return {
            "benchmark": self.name,
            "version": self.version,
            "source": self.source.to_dict() if self.source else None,
            "n_selected": len(self._indices or []),
            "n_skipped": len(self.bad),
            "skipped": [b.__dict__ for b in self.bad],
            "n_converted": len(self.converted),
            "converted": dict(self.converted),
        }
