"""``protocol=lmms_eval`` against lmms-eval 0.7.3's own default ``llava_hf`` model, run.

The oracle (``tests/lmms_oracle.py``) runs the chat class that ``--model llava_hf`` resolves to,
its real ``generate_until``, on ``models/synth-llava`` and SynthVQA docs, with lmms-eval's own task
configs (prompt functions, ``lmms_eval_specific_kwargs``, generation kwargs, scoring). Checked:

1. POPE, first 32 questions, the task's generation settings (128 new tokens, greedy): our
   ``evaluate`` (``method=none``) at batch size 1 and 8 answers exactly as the wrapper (after the
   strip lmms-eval applies), with the same scores, by our metrics and by lmms-eval's own
   ``process_results`` + aggregations; our user text is the task's ``doc_to_text``.
2. Rendered prompt, input ids and pixels equal the wrapper's for each benchmark, with the
   folder's own template and with llava-hf's real template shipped as ``chat_template.json``
   only or as ``chat_template.jinja`` only; answers equal on the other four benchmarks too.
3. What lmms-eval's *simple* wrapper (``force_simple``) renders instead, documented.

lmms-eval is imported by the oracle on first use (it reconfigures loguru and the warning
filters), never at collection. Torch runs single-threaded here (restored afterwards): on a shared
2-core machine two threads are many times slower for this tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recomp_eval.benchmarks.prompts import SHORT_ANSWER, generation_settings, user_prompt
from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.evaluate import build_benchmark, evaluate, load_model
from recomp_eval.methods import build_method
from recomp_eval.metrics import score
from recomp_eval.models.llava.adapter import expand_image_tokens
from recomp_eval.models.llava.conversation import render_prompt
from recomp_eval.pipeline import generate, prepare_batch
from recomp_eval.runner import SampleStore
from recomp_eval.synth.schemas import GQA_IMAGE_CONFIG
from recomp_eval.synth.writers import write_benchmark

if importlib.util.find_spec("lmms_eval") is None:
    pytest.skip("lmms-eval is not installed", allow_module_level=True)

import lmms_oracle as oracle

ROOT = Path(__file__).resolve().parent.parent
SYNTH_LLAVA = ROOT / "models" / "synth-llava"
BENCHMARKS = ("gqa", "vqav2", "textvqa", "pope", "mme")
# our benchmark -> lmms-eval's task YAML (tasks/*/<name>.yaml)
LMMS_TASKS = {
    "gqa": "gqa", "vqav2": "vqav2_val", "textvqa": "textvqa_val", "pope": "pope", "mme": "mme",
}  # fmt: skip
N_POPE = 32  # questions compared end to end
N_PROMPTS = 3  # questions per benchmark in the prompt checks (MME: whole image pairs)
# llava-hf/llava-1.5-7b-hf's chat_template.json, verbatim (checked against the shared copy below)
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() "
    "+ ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next "
    "#}{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% "
    "for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation "
    "%}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SHARED_LLAVA_HF = Path("/work/shared/checkpoints/llava-1.5-7b-hf/chat_template.json")
# the two template files llava-hf folders ship; the shipped demo model's own template is slow
TEMPLATE_CASES = (
    pytest.param("folder", marks=pytest.mark.slow),
    "llava_hf_json",
    "llava_hf_jinja",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_benchmark("pope", root, n_images=6)  # 36 questions
    for name in ("gqa", "vqav2", "textvqa", "mme"):
        write_benchmark(name, root, n_images=2)
    return root


def load_docs(data_dir: Path, cache: Path) -> list[dict[str, Any]]:
    """The split's rows as lmms-eval's dataset yields them (``dataset_path: parquet``; images
    decoded to PIL). GQA: its ``process_docs`` joins the image config by ``imageId``, as here."""
    from datasets import load_dataset

    manifest = json.loads((data_dir / "manifest.json").read_text())
    split, config = manifest["split"], manifest["config"] or "default"

    def rows(cfg: str) -> list[dict[str, Any]]:
        files = sorted(str(p) for p in (data_dir / cfg / split).glob("*.parquet"))
        ds = load_dataset("parquet", data_files={split: files}, split=split, cache_dir=str(cache))
        return [ds[i] for i in range(len(ds))]

    docs = rows(config)
    if manifest["benchmark"] == "gqa":
        images = {r["id"]: r["image"].convert("RGB") for r in rows(GQA_IMAGE_CONFIG)}
        docs = [{**d, "image": images[d["imageId"]]} for d in docs]
    return docs


@pytest.fixture(scope="module")
def docs(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    cache = tmp_path_factory.mktemp("hf_datasets")
    return {name: load_docs(synth / name, cache) for name in BENCHMARKS}


def compose_eval(synth: Path, out: Path, bench: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(
            config_name="eval",
            overrides=[
                "model=synth_llava",
                f"benchmark={bench}",
                f"benchmark.data_dir={synth / bench}",
                "protocol=lmms_eval",
                "method=none",
                f"paths.root={out}",
                *overrides,
            ],
        )


def our_samples(synth: Path, tmp: Path, bench: str, limit: int) -> list:
    cfg = compose_eval(synth, tmp, bench)
    bench_cfg = OmegaConf.to_container(cfg.benchmark, resolve=True)
    return list(build_benchmark(bench_cfg, limit=limit))  # type: ignore[arg-type]


def pope_id(doc: Mapping[str, Any]) -> str:
    return f"{doc['category']}/{doc['question_id']}"  # our POPE sample id


# --- 1. POPE end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_wrapper():
    return oracle.load_wrapper(SYNTH_LLAVA)


@pytest.fixture(scope="module")
def pope_task():
    return oracle.lmms_task("pope")


@pytest.fixture(scope="module")
def lmms_pope(chat_wrapper, pope_task, docs) -> list[oracle.OracleResult]:
    """lmms-eval's wrapper on the first 32 POPE docs, the task's own generation kwargs."""
    return oracle.run(chat_wrapper, pope_task, docs["pope"][:N_POPE], split="test")


@pytest.fixture(scope="module")
def synth_bundle():
    return load_model({"id": str(SYNTH_LLAVA), "dtype": "float32", "device": "cpu"})


@pytest.fixture(scope="module")
def ours_pope(synth, synth_bundle, tmp_path_factory) -> dict[int, tuple[Any, dict[str, dict]]]:
    """Our ``evaluate`` on the same 32 questions at batch size 1 and 8: (record, rows by id)."""
    out = {}
    for batch_size in (1, 8):
        root = tmp_path_factory.mktemp(f"runs_b{batch_size}")
        cfg = compose_eval(
            synth, root, "pope", f"limit={N_POPE}", f"runner.batch_size={batch_size}"
        )
        (record,) = evaluate(cfg, synth_bundle)
        (path,) = Path(record.config["paths"]["records_dir"]).rglob(
            f"*{record.run_key}/samples.jsonl"
        )
        out[batch_size] = (record, SampleStore(path).load())
    return out


def test_pope_user_text_and_generation_are_the_tasks(synth, docs, pope_task, tmp_path) -> None:
    """Our user text is lmms-eval's ``pope_doc_to_text`` with the YAML's ``default`` kwargs; our
    generation settings are the task's, and the wrapper passes them to ``generate`` as such."""
    kwargs = pope_task.lmms_eval_specific_kwargs
    assert (kwargs["pre_prompt"], kwargs["post_prompt"]) == ("", SHORT_ANSWER)
    samples = our_samples(synth, tmp_path, "pope", N_POPE)
    first = docs["pope"][:N_POPE]
    assert [s.sample_id for s in samples] == [pope_id(d) for d in first]
    for sample, doc in zip(samples, first, strict=True):
        assert user_prompt(sample, "lmms_eval") == pope_task.doc_to_text(doc), sample.sample_id
    ours = generation_settings("pope", "lmms_eval")
    task = pope_task.config.generation_kwargs
    assert ours["max_new_tokens"] == task["max_new_tokens"] == 128
    assert ours["do_sample"] is task["do_sample"] is False
    assert ours["stop"] == [] and task["until"] == ["\n\n"]  # the chat wrapper ignores `until`


def test_pope_answers_match_lmms_eval(docs, lmms_pope, ours_pope) -> None:
    """Every answer equal (after the same strip) at batch size 1 and 8; at batch size 1 the
    generated token counts too; every prompt we stored is the wrapper's."""
    first = docs["pope"][:N_POPE]
    fed = {(r.generate_kwargs["max_new_tokens"], r.generate_kwargs["do_sample"]) for r in lmms_pope}
    assert fed == {(128, False)}  # what the wrapper passed to model.generate
    for batch_size, (_, rows) in ours_pope.items():
        assert set(rows) == {pope_id(d) for d in first}
        diffs = [
            (pope_id(d), rows[pope_id(d)]["prediction"], r.text)
            for d, r in zip(first, lmms_pope, strict=True)
            if rows[pope_id(d)]["prediction"] != r.text.strip()
        ]
        assert not diffs, f"batch size {batch_size}: (sample, ours, lmms-eval) {diffs}"
        for d, r in zip(first, lmms_pope, strict=True):
            row = rows[pope_id(d)]
            if row["prompt"] is not None:
                assert row["prompt"] == r.prompt, pope_id(d)
            if batch_size == 1:
                assert row["new_tokens"] == r.output_tokens, pope_id(d)


def test_pope_scores_match_lmms_eval(docs, lmms_pope, ours_pope, pope_task) -> None:
    """Same scores by our metrics and by lmms-eval's ``pope_process_results`` + aggregations."""
    first = docs["pope"][:N_POPE]
    theirs_text = [r.text for r in lmms_pope]
    lmms_on_theirs = oracle.lmms_scores(pope_task, first, theirs_text)
    assert set(lmms_on_theirs) == {
        "pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio",
    }  # fmt: skip
    for batch_size, (record, rows) in ours_pope.items():
        ours_rows = [rows[pope_id(d)] for d in first]
        theirs_rows = [{**row, "prediction": t.strip()} for row, t in zip(ours_rows, theirs_text)]
        ours = score("pope", ours_rows, "lmms_eval")
        assert ours == score("pope", theirs_rows, "lmms_eval"), batch_size
        assert {k: record.metrics[k] for k in ours} == ours
        lmms_on_ours = oracle.lmms_scores(pope_task, first, [r["prediction"] for r in ours_rows])
        assert lmms_on_ours == lmms_on_theirs, batch_size
        assert ours["pope/accuracy_lmms_eval"] == lmms_on_theirs["pope_accuracy"]
        assert ours["pope/precision_lmms_eval"] == lmms_on_theirs["pope_precision"]
        assert ours["pope/recall_lmms_eval"] == lmms_on_theirs["pope_recall"]
        assert ours["pope/f1_lmms_eval"] == pytest.approx(lmms_on_theirs["pope_f1_score"])
        # lmms-eval's "yes ratio" counts ground-truth yes (tests/test_lmms_parity.py)
        assert ours["pope/gt_yes_ratio_lmms_eval"] == lmms_on_theirs["pope_yes_ratio"]


# --- 2. prompts and input ids per benchmark and template case -----------------------------------------


def checkpoint_copy(tmp: Path, case: str) -> Path:
    """synth-llava as shipped (``folder``), or a copy whose only template is llava-hf's, as
    ``chat_template.json`` or as ``chat_template.jinja``."""
    if case == "folder":
        return SYNTH_LLAVA
    folder = tmp / case
    shutil.copytree(SYNTH_LLAVA, folder, ignore=shutil.ignore_patterns("chat_template.*"))
    if case == "llava_hf_json":
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_TEMPLATE}))
    else:
        (folder / "chat_template.jinja").write_text(LLAVA_HF_TEMPLATE)
    assert len(list(folder.glob("chat_template*"))) == 1
    return folder


def test_embedded_template_is_llava_hfs() -> None:
    if not SHARED_LLAVA_HF.is_file():
        pytest.skip(f"{SHARED_LLAVA_HF} is not on this machine")
    assert json.loads(SHARED_LLAVA_HF.read_text())["chat_template"] == LLAVA_HF_TEMPLATE


def our_inputs(bundle, image, text: str) -> tuple[str, list[int], torch.Tensor]:
    """Our rendered prompt, the ids fed to ``generate`` with no compression, and the pixels."""
    batch = prepare_batch(bundle, [image], [text], "lmms_eval")
    n = bundle.adapter.shapes(bundle).patches
    ids, _ = expand_image_tokens(
        batch.prompt_ids, [n], bundle.image_token_id, bundle.tokenizer.pad_token_id
    )
    return batch.prompts[0], ids[0].tolist(), batch.pixel_values


@pytest.mark.parametrize("case", TEMPLATE_CASES)
def test_prompts_and_input_ids_match_lmms_eval(case: str, synth, docs, tmp_path) -> None:
    folder = checkpoint_copy(tmp_path, case)
    wrapper = oracle.load_wrapper(folder)
    bundle = load_model({"id": str(folder), "dtype": "float32", "device": "cpu"})
    for bench in BENCHMARKS:
        task = oracle.lmms_task(LMMS_TASKS[bench])
        samples = our_samples(synth, tmp_path, bench, N_PROMPTS)
        first = docs[bench][: len(samples)]
        theirs = oracle.run(wrapper, task, first, task.config.test_split, max_new_tokens=1)
        for sample, doc, their in zip(samples, first, theirs, strict=True):
            where = f"{case}/{bench}/{sample.sample_id}"
            assert sample.question == doc["question"], where
            text = user_prompt(sample, "lmms_eval")
            assert text == task.doc_to_text(doc), where
            prompt, ids, pixels = our_inputs(bundle, sample.image, text)
            assert prompt == their.prompt, where
            assert prompt == f"USER: <image>\n{text} ASSISTANT:", where
            assert ids == their.input_ids, where
            assert torch.equal(pixels, their.pixel_values), where


@pytest.mark.slow  # POPE above is the fast check; the other tasks' answers here
def test_other_benchmarks_answers_match_lmms_eval(
    synth, docs, chat_wrapper, synth_bundle, tmp_path
) -> None:
    """gqa, vqav2, textvqa, mme: the tasks' own generation settings, answers equal."""
    method = build_method("none")
    for bench in ("gqa", "vqav2", "textvqa", "mme"):
        task = oracle.lmms_task(LMMS_TASKS[bench])
        samples = our_samples(synth, tmp_path, bench, N_PROMPTS)
        first = docs[bench][: len(samples)]
        theirs = oracle.run(chat_wrapper, task, first, task.config.test_split)
        settings = generation_settings(bench, "lmms_eval")
        assert {r.generate_kwargs["max_new_tokens"] for r in theirs} == {settings["max_new_tokens"]}
        ours = generate(
            synth_bundle,
            method,
            images=[s.image for s in samples],
            user_texts=[user_prompt(s, "lmms_eval") for s in samples],
            questions=[s.question for s in samples],
            protocol="lmms_eval",
            sample_ids=[s.sample_id for s in samples],
            max_new_tokens=settings["max_new_tokens"],
            stop=tuple(settings["stop"]),
        )
        diffs = [
            (s.sample_id, o.text, t.text)
            for s, o, t in zip(samples, ours, theirs, strict=True)
            if o.text != t.text.strip()
        ]
        assert not diffs, f"{bench}: (sample, ours, lmms-eval) {diffs}"


# --- 3. the simple wrapper (force_simple), documented -------------------------------------------------


def test_simple_wrapper_renders_differently(synth, docs, tmp_path) -> None:
    """lmms-eval's simple ``llava_hf`` applies the *tokenizer's* template to the plain string
    ``"<image>\\n{text}"``. With llava-hf's template as ``.jinja`` that renders an empty user
    turn (and its processor then refuses the image); with ``.json`` only the tokenizer has no
    template and it falls back to its vicuna template with the system prompt, which is our
    ``llava15`` rendering, not our ``lmms_eval`` one. With synth-llava's own template (which also
    renders string content) it agrees with the chat class."""
    doc = docs["pope"][0]
    task = oracle.lmms_task("pope", simple=True)
    text = task.doc_to_text(doc)
    chat_prompt = f"USER: <image>\n{text} ASSISTANT:"  # the chat class, every case (test above)

    jinja = oracle.load_wrapper(checkpoint_copy(tmp_path, "llava_hf_jinja"), simple=True)
    with pytest.raises(ValueError, match="Found total 0 <image> tokens and 1 images"):
        oracle.run(jinja, task, [doc], max_new_tokens=1)
    assert oracle.recorded_prompts(jinja) == ["USER: ASSISTANT:"]

    folder = checkpoint_copy(tmp_path, "llava_hf_json")
    json_only = oracle.load_wrapper(folder, simple=True)
    (res,) = oracle.run(json_only, task, [doc], max_new_tokens=1)
    bundle = load_model({"id": str(folder), "dtype": "float32", "device": "cpu"})
    assert res.prompt == render_prompt("llava15", text, bundle.tokenizer, bundle.processor)
    assert res.prompt.startswith("A chat between a curious user") and res.prompt != chat_prompt

    shipped = oracle.load_wrapper(SYNTH_LLAVA, simple=True)
    (res,) = oracle.run(shipped, task, [doc], max_new_tokens=1)
    assert res.prompt == chat_prompt


# --- larger: every question of every benchmark ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("bench", BENCHMARKS)
def test_every_question_matches_lmms_eval(bench: str, synth_bundle, tmp_path) -> None:
    """All questions of a 12-image SynthVQA benchmark: our ``evaluate`` at batch size 8 answers
    as lmms-eval's wrapper and scores the same."""
    root = tmp_path / "synth"
    write_benchmark(bench, root, n_images=12)
    all_docs = load_docs(root / bench, tmp_path / "hf_datasets")
    task = oracle.lmms_task(LMMS_TASKS[bench])
    theirs = oracle.run(oracle.load_wrapper(SYNTH_LLAVA), task, all_docs, task.config.test_split)
    (record,) = evaluate(compose_eval(root, tmp_path / "runs", bench), synth_bundle)
    (path,) = Path(record.config["paths"]["records_dir"]).rglob(f"*{record.run_key}/samples.jsonl")
    rows = SampleStore(path).load()
    ids = [s.sample_id for s in our_samples(root, tmp_path, bench, len(all_docs))]
    assert len(ids) == len(all_docs) == len(rows)
    diffs = [
        (sid, rows[sid]["prediction"], t.text)
        for sid, t in zip(ids, theirs, strict=True)
        if rows[sid]["prediction"] != t.text.strip()
    ]
    assert not diffs, f"{bench}: (sample, ours, lmms-eval) {diffs}"
    ours_rows = [rows[sid] for sid in ids]
    theirs_rows = [{**r, "prediction": t.text.strip()} for r, t in zip(ours_rows, theirs)]
    assert score(bench, ours_rows, "lmms_eval") == score(bench, theirs_rows, "lmms_eval")
