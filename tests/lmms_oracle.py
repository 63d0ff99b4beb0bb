"""lmms-eval 0.7.3's ``llava_hf`` model as an oracle, run in-process on a local checkpoint.

Model side: lmms-eval's own code. :func:`load_wrapper` builds the class its registry resolves
``llava_hf`` to (``lmms_eval.models.get_model``: the chat class
``lmms_eval.models.chat.llava_hf.LlavaHf``; ``simple=True`` is ``force_simple``) on a folder, on
CPU, batch size 1, and :func:`run` calls its real ``generate_until``.

Task side: faked minimally, no task or dataset is loaded. :func:`lmms_task` is an lmms-eval task
object (``ConfigurableMessagesTask`` for the chat class, ``ConfigurableTask`` for the simple one)
created without ``__init__`` (which downloads the dataset), holding the real ``TaskConfig`` of the
task's own YAML (``load_yaml_config``: its ``doc_to_visual``/``doc_to_text``/``process_results``
functions, ``lmms_eval_specific_kwargs``, ``generation_kwargs``, metric list).
:func:`plain_task` is the same with a config that asks a given text about a given image. The
requests come from the task's real ``fewshot_context`` and ``construct_requests`` (for the chat
class ``doc_to_messages`` is lmms-eval's ``_auto_doc_to_messages``), and the docs go to
``wrapper.task_dict[task][split]`` as lmms-eval's evaluator puts them.

Recorded, not recomputed: the wrapper's processor is wrapped in a proxy that records the ``text``
it tokenizes (the rendered prompt) and the ``input_ids``/``pixel_values`` it returns; the docs
list records which doc each request reads (the serving order); ``model.generate`` is wrapped
during the call to record its keyword arguments and any exception (both wrappers log and swallow
generation errors and answer ``""``; :func:`run` re-raises them).

Side effects, all on the first call (never at import of this module): importing lmms-eval
replaces loguru's handlers (stdout, WARNING) and calls ``warnings.filterwarnings("ignore")``
(the warning filters are restored here); ``load_yaml_config`` registers a ``!function`` YAML
constructor. lmms-eval's simple module imports ``decord`` at import time (video only): when it is
not installed a stub stands in during that import (its readers raise) and is removed again.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

LMMS_MODEL = "llava_hf"  # the name users pass to `lmms_eval --model`
PLAIN_TASK = "oracle_plain"


@dataclass
class OracleResult:
    """What the wrapper rendered, fed and generated for one request (in request order)."""

    prompt: str  # the string the wrapper's processor tokenized
    input_ids: list[int]  # [L] as fed to generate (image placeholder expanded by the processor)
    pixel_values: torch.Tensor  # [n_images,3,S,S]
    text: str  # generate_until's answer, unstripped (lmms-eval strips before process_results)
    output_tokens: int | None  # generated ids, EOS included (chat class only: its TokenCounts)
    generate_kwargs: dict[str, Any]  # the non-tensor keyword arguments of model.generate


# --- importing lmms-eval ---------------------------------------------------------------------------


@functools.cache
def decord_stubbed() -> bool:
    """Whether ``decord`` is missing (then a stub stands in while lmms-eval is imported)."""
    return "decord" not in sys.modules and importlib.util.find_spec("decord") is None


def _decord_stub() -> types.ModuleType:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("decord is stubbed by tests/lmms_oracle.py: no video support")

    stub = types.ModuleType("decord")
    stub.VideoReader = unavailable  # type: ignore[attr-defined]
    stub.cpu = unavailable  # type: ignore[attr-defined]
    return stub


@functools.cache
def wrapper_class(simple: bool = False) -> type:
    """The class lmms-eval's registry resolves ``llava_hf`` to (``simple``: ``force_simple``)."""
    stub = decord_stubbed()
    if stub:
        sys.modules["decord"] = _decord_stub()
    try:
        with warnings.catch_warnings():
            from lmms_eval.models import get_model

            return get_model(LMMS_MODEL, force_simple=simple)
    finally:
        if stub:
            sys.modules.pop("decord", None)


@functools.cache
def _task_api() -> types.SimpleNamespace:
    wrapper_class()  # the package import (and its side effects) happens once, there
    with warnings.catch_warnings():
        import lmms_eval.api.metrics  # noqa: F401  (registers the metrics task YAMLs name)
        from lmms_eval.api.instance import GenerationResult
        from lmms_eval.api.task import ConfigurableMessagesTask, ConfigurableTask, TaskConfig
        from lmms_eval.utils import load_yaml_config

    return types.SimpleNamespace(
        chat_task=ConfigurableMessagesTask,
        simple_task=ConfigurableTask,
        TaskConfig=TaskConfig,
        GenerationResult=GenerationResult,
        load_yaml_config=load_yaml_config,
    )


# --- the model side ----------------------------------------------------------------------------------


class _RecordingProcessor:
    """Delegates to the wrapper's processor; records each ``__call__``'s text and outputs."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        text = kwargs.get("text")
        call: dict[str, Any] = {"text": text[0] if isinstance(text, list) else text}
        self.calls.append(call)  # before the call: a failing call keeps its text
        out = self._processor(*args, **kwargs)
        call["input_ids"] = out["input_ids"][0].tolist()
        call["pixel_values"] = out["pixel_values"].clone() if "pixel_values" in out else None
        return out


class _RecordingDocs(list):
    """A split's docs; records the doc ids the wrapper reads, in the order it reads them."""

    def __init__(self, docs: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(docs)
        self.read: list[int] = []

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, int):
            self.read.append(index)
        return super().__getitem__(index)


def load_wrapper(folder: str | Path, simple: bool = False, dtype: str = "float32") -> Any:
    """lmms-eval's ``llava_hf`` on a local folder, as ``--model llava_hf --model_args
    pretrained=FOLDER,device_map=cpu,dtype=float32 --device cpu --batch_size 1`` builds it."""
    cls = wrapper_class(simple)
    with warnings.catch_warnings():
        wrapper = cls(
            pretrained=str(folder), device="cpu", device_map="cpu", dtype=dtype, batch_size=1
        )
    wrapper._image_processor = _RecordingProcessor(wrapper._image_processor)
    return wrapper


def recorded_prompts(wrapper: Any) -> list[str | None]:
    """Every prompt string the wrapper's processor was asked to tokenize in the last run."""
    return [call["text"] for call in wrapper._image_processor.calls]


# --- the task side -----------------------------------------------------------------------------------


def tasks_dir() -> Path:
    """lmms-eval's ``tasks/`` folder (YAMLs and ``utils.py``), found without importing it."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("lmms_eval is not installed")
    return Path(spec.origin).parent / "tasks"


def make_task(config: Mapping[str, Any], simple: bool = False, model: str = LMMS_MODEL) -> Any:
    """A task object of the kind lmms-eval builds for the chat (or simple) class, on ``config``,
    without ``__init__``: the attributes that its prompt, request and scoring methods read,
    set as ``ConfigurableTask.__init__`` sets them."""
    api = _task_api()
    unknown = sorted(set(config) - set(api.TaskConfig.__dataclass_fields__))
    if unknown:
        raise KeyError(f"task config keys that lmms-eval's TaskConfig lacks: {unknown}")
    task = object.__new__(api.simple_task if simple else api.chat_task)
    task._config = api.TaskConfig(**dict(config))  # adds `until: ["\n\n"]` as lmms-eval does
    task.model_name = model
    task._prepare_model_specific_config()  # lmms_eval_specific_kwargs[model] or its `default`
    task.OUTPUT_TYPE = task.config.output_type
    task._prepare_metric_and_aggregation()
    task.features, task.multiple_input, task.multiple_target = [], 0, 0
    return task


def lmms_task(yaml_name: str, simple: bool = False) -> Any:
    """lmms-eval's own task ``tasks/*/<yaml_name>.yaml`` (``pope``, ``gqa``, ``vqav2_val``,
    ``textvqa_val``, ``mme``) on no dataset."""
    api = _task_api()
    matches = sorted(tasks_dir().glob(f"*/{yaml_name}.yaml"))
    if len(matches) != 1:
        raise FileNotFoundError(f"{len(matches)} lmms-eval task YAMLs named {yaml_name}.yaml")
    config = api.load_yaml_config(yaml_path=str(matches[0]), mode="full")
    return make_task(config, simple=simple)


def plain_task(gen_kwargs: Mapping[str, Any], simple: bool = False) -> Any:
    """A task whose doc is ``{"image": PIL image, "text": str}``: that image, then that text."""
    config = {
        "task": PLAIN_TASK,
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": _doc_image,
        "doc_to_text": _doc_text,
        "generation_kwargs": dict(gen_kwargs),
        "metric_list": [],  # not scored
    }
    return make_task(config, simple=simple)


def _doc_image(doc: Mapping[str, Any]) -> list[Image.Image]:
    return [doc["image"]]


def _doc_text(doc: Mapping[str, Any]) -> str:
    return doc["text"]


# --- running and scoring -----------------------------------------------------------------------------


def run(
    wrapper: Any,
    task: Any,
    docs: Sequence[Mapping[str, Any]],
    split: str = "test",
    max_new_tokens: int | None = None,
) -> list[OracleResult]:
    """One request per doc (doc id = position) through the wrapper's real ``generate_until``.

    Args:
        wrapper: from :func:`load_wrapper`.
        task: from :func:`lmms_task` or :func:`plain_task`, of the wrapper's kind.
        docs: the split's docs, as lmms-eval's dataset yields them (PIL images).
        max_new_tokens: replaces the task's in these requests (prompt checks need no answer).
    Returns:
        One :class:`OracleResult` per doc, in doc order.
    """
    chat_task = isinstance(task, _task_api().chat_task)
    if task.OUTPUT_TYPE != "generate_until" or chat_task == bool(wrapper.is_simple):
        raise TypeError(f"a {type(task).__name__} does not fit {type(wrapper).__module__}")
    name, task_kwargs = task.config.task, task.config.generation_kwargs
    if max_new_tokens is not None:
        task.config.generation_kwargs = {**task_kwargs, "max_new_tokens": int(max_new_tokens)}
    try:
        requests = [
            task.construct_requests(  # deep-copies generation_kwargs into each request
                doc_id,
                task.fewshot_context(doc, 0),
                metadata={"task": name, "doc_id": doc_id, "repeats": 1, "split": split},
            )
            for doc_id, doc in enumerate(docs)
        ]
    finally:
        task.config.generation_kwargs = task_kwargs
    model, recorder = wrapper._model, wrapper._image_processor
    recorder.calls.clear()
    served = _RecordingDocs(docs)
    fed: list[dict[str, Any]] = []
    errors: list[Exception] = []
    original = model.generate

    def recording_generate(*args: Any, **kwargs: Any) -> Any:
        fed.append({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        try:
            return original(*args, **kwargs)
        except Exception as err:  # the wrapper swallows it; re-raised below
            errors.append(err)
            raise

    wrapper.task_dict = {name: {split: served}}
    model.generate = recording_generate  # an instance attribute on this wrapper's model only
    try:
        with warnings.catch_warnings():
            outputs = wrapper.generate_until(requests)
    finally:
        del model.generate
        wrapper.task_dict = {}
    if errors:
        raise RuntimeError(f"lmms-eval's model.generate failed: {errors[0]!r}") from errors[0]
    if not (len(served.read) == len(recorder.calls) == len(fed) == len(docs)):
        raise RuntimeError(
            f"{len(docs)} requests but {len(served.read)} docs read, {len(recorder.calls)} "
            f"processor calls and {len(fed)} generate calls"
        )
    by_doc = {d: (call, kw) for d, call, kw in zip(served.read, recorder.calls, fed, strict=True)}
    results = []
    for doc_id, out in enumerate(outputs):
        call, kwargs = by_doc[doc_id]
        counts = getattr(out, "token_counts", None)
        results.append(
            OracleResult(
                prompt=call["text"],
                input_ids=call["input_ids"],
                pixel_values=call["pixel_values"],
                text=out.text if isinstance(out, _task_api().GenerationResult) else out,
                output_tokens=None if counts is None else counts.output_tokens,
                generate_kwargs=kwargs,
            )
        )
    return results


def run_texts(
    wrapper: Any,
    images: Sequence[Image.Image],
    texts: Sequence[str],
    gen_kwargs: Mapping[str, Any],
) -> list[OracleResult]:
    """The wrapper on given images and user texts (one image, then one text, per request)."""
    if len(images) != len(texts):
        raise ValueError("images and texts must have equal lengths")
    docs = [{"image": im, "text": t} for im, t in zip(images, texts, strict=True)]
    return run(wrapper, plain_task(gen_kwargs, simple=bool(wrapper.is_simple)), docs)


def lmms_scores(task: Any, docs: Sequence[Mapping[str, Any]], texts: Sequence[str]):
    """lmms-eval's own scoring of generations: the task's ``process_results`` (which strips each
    answer first) and its metric list's aggregations, as the evaluator runs them."""
    per_metric: dict[str, list[Any]] = {}
    for doc, text in zip(docs, texts, strict=True):
        for metric, value in task.process_results(doc, [text]).items():
            per_metric.setdefault(metric, []).append(value)
    aggregation = task.aggregation()
    return {metric: aggregation[metric](values) for metric, values in per_metric.items()}
