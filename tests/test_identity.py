"""One identity per run: labels, YAML defaults, run keys that cover checkpoint and data contents.

Config-level tests compose the real configs; the end-to-end ones run the tiny model on
hub-schema fixtures and compare against a fresh run in a clean folder (the oracle).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from recomp_eval.benchmarks.fixtures import write_fixture
from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.evaluate import evaluate, load_model
from recomp_eval.runner import SampleStore
from recomp_eval.runs import expand_runs, folder_name


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="eval", overrides=list(overrides))


# --- labels and defaults (no model) ---------------------------------------------------------


def test_ablation_runs_get_distinct_labels_and_folders() -> None:
    specs = expand_runs(composed("experiment=rc_quirk_ablation"))
    labels = [s.label for s in specs]
    assert len(set(labels)) == len(labels) == 7, labels
    assert labels[0] == "recomp[paper]" and labels[-1] == "recomp[official]"
    assert "recomp[paper,text_source=first_line,text_max_len=20,text_pool=last]" in labels
    assert "recomp[paper,center_count_base=width]" in labels
    folders = {folder_name(s, s.retention, "k") for s in specs}
    assert len(folders) == 7 and all("[" not in f and "," not in f for f in folders)


def test_option_sweep_labels_name_the_option() -> None:
    (spec,) = expand_runs(composed("method=recomp", "method.text_weight=0"))
    assert spec.label == "recomp[paper,text_weight=0]"
    (fastv,) = expand_runs(composed("method=fastv", "method.k_layer=3"))
    assert fastv.label == "fastv[prune,k_layer=3]"
    (plain,) = expand_runs(composed("method=fastv"))
    assert plain.label == "fastv[prune]"


@pytest.mark.parametrize("name", ["fastv", "recomp", "random", "visionzip", "pool", "prumerge"])
def test_runs_entry_equals_the_method_group(name: str) -> None:
    (group,) = expand_runs(composed(f"method={name}"))
    (entry,) = expand_runs(composed(f"runs=[{{method: {name}}}]"))
    assert (entry.method, entry.retention, entry.options, entry.label) == (
        group.method, group.retention, group.options, group.label,
    )  # fmt: skip


def test_runs_entry_applies_the_yaml_retention() -> None:
    (entry,) = expand_runs(composed("runs=[{method: random}]"))
    assert entry.retention == 0.1 and entry.budget == "fixed"
    (over,) = expand_runs(composed("runs=[{method: random, retention: 0.25}]"))
    assert over.retention == 0.25


def test_runs_entry_with_unknown_key_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['option'\]"):
        expand_runs(composed("runs=[{method: recomp, option: {variant: paper}}]"))


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fixtures")
    write_fixture("pope", root)
    return root


@pytest.fixture(scope="module")
def bundle():
    return load_model({"id": "tiny", "dtype": "float32", "device": "cpu"})


def run(data_dir: Path, out: Path, *overrides: str, bundle=None):
    cfg = composed(
        "benchmark=pope", f"benchmark.data_dir={data_dir}", f"paths.root={out}",
        "runner.max_new_tokens=4", "runner.batch_size=2", *overrides,
    )  # fmt: skip
    return evaluate(cfg, bundle)


def rows_of(record) -> dict[str, dict]:
    return SampleStore(Path(record.run_dir) / "samples.jsonl").load()


def test_method_and_runs_share_one_folder(data_root: Path, tmp_path: Path, bundle) -> None:
    (a,) = run(data_root / "pope", tmp_path, "method=fastv", bundle=bundle)
    (b,) = run(data_root / "pope", tmp_path, "runs=[{method: fastv}]", bundle=bundle)
    assert a.run_key == b.run_key and a.run_dir == b.run_dir
    assert a.method["label"] == b.method["label"] == "fastv[prune]"
    assert len(list((tmp_path / "raw").rglob("results.json"))) == 1
    (r,) = run(data_root / "pope", tmp_path, "runs=[{method: random}]", bundle=bundle)
    assert r.method["retention"] == 0.1 and r.method["budget"] == "fixed"
    assert r.tokens["max"] == round(0.1 * 64)


def _copy_tiny(dest: Path) -> Path:
    from recomp_eval.models.llava.tiny import build_tiny

    shutil.copytree(build_tiny(), dest)
    return dest


def _retrain(folder: Path, seed: int) -> None:
    """New random weights written in place: same file names and sizes, new contents and mtime."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    new = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * v.float().std().clamp(min=0.02)
           for k, v in tensors.items()}  # fmt: skip
    stat = path.stat()
    save_file(new, path, metadata={"format": "pt"})
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert path.stat().st_size == stat.st_size


def test_new_weights_at_the_same_path_start_a_new_run(data_root: Path, tmp_path: Path) -> None:
    model = _copy_tiny(tmp_path / "ckpt")
    args = (data_root / "pope", tmp_path / "out", f"model.id={model}", "method=none")
    (old,) = run(*args)
    _retrain(model, seed=1)
    (new,) = run(*args)
    assert new.run_key != old.run_key
    (fresh,) = run(data_root / "pope", tmp_path / "fresh", f"model.id={model}", "method=none")
    assert new.run_key == fresh.run_key
    assert {k: r["prediction"] for k, r in rows_of(new).items()} == {
        k: r["prediction"] for k, r in rows_of(fresh).items()
    }
    assert new.metrics == fresh.metrics
    marker = json.loads((Path(old.run_dir) / "superseded.json").read_text())
    assert marker["by"] == Path(new.run_dir).name
    assert any("model.safetensors" in c for c in marker["changes"])
    assert not (Path(new.run_dir) / "superseded.json").exists()


def test_on_change_stop_and_resume(data_root: Path, tmp_path: Path) -> None:
    from recomp_eval.run_folder import ContentsChangedError

    model = _copy_tiny(tmp_path / "ckpt")
    args = (data_root / "pope", tmp_path / "out", f"model.id={model}", "method=none")
    (old,) = run(*args)
    _retrain(model, seed=2)
    with pytest.raises(ContentsChangedError) as err:
        run(*args, "runner.on_change=stop")
    text = str(err.value)
    assert "\n" not in text and "model.safetensors" in text
    assert "runner.on_change=new" in text and "runner.on_change=resume" in text
    (kept,) = run(*args, "runner.on_change=resume")
    assert kept.run_key == old.run_key and rows_of(kept) == rows_of(old)
    assert kept.notes and "model.safetensors" in kept.notes[0]


def test_changed_gold_answers_start_a_new_run(tmp_path: Path, bundle) -> None:
    import pyarrow.parquet as pq

    data = write_fixture("pope", tmp_path / "data")
    (old,) = run(data, tmp_path / "out", "method=none", bundle=bundle)
    (shard,) = (data / "default" / "test").glob("*.parquet")
    table = pq.read_table(shard)
    flipped = ["no" if a == "yes" else "yes" for a in table.column("answer").to_pylist()]
    table = table.set_column(table.column_names.index("answer"), "answer", [flipped])
    pq.write_table(table, shard)
    manifest = (data / "manifest.json").read_text()
    (new,) = run(data, tmp_path / "out", "method=none", bundle=bundle)
    assert (data / "manifest.json").read_text() == manifest  # same manifest, new contents
    assert new.run_key != old.run_key
    assert new.benchmark["source"]["fingerprint"] != old.benchmark["source"]["fingerprint"]
    (fresh,) = run(data, tmp_path / "fresh", "method=none", bundle=bundle)
    assert new.metrics == fresh.metrics
    assert [r["answers"] for r in rows_of(new).values()] == [
        r["answers"] for r in rows_of(fresh).values()
    ]
    assert new.metrics["pope/f1_mean_llava"] != old.metrics["pope/f1_mean_llava"] or (
        rows_of(new) != rows_of(old)
    )
