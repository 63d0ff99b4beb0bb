"""The runner end to end on the tiny model and hub-schema fixtures: methods, benchmarks,
protocols, batch-size invariance, resume after a crash, multirun sweeps, wandb logging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recomp_eval.aggregate import write_tables
from recomp_eval.benchmarks.fixtures import write_fixture
from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.evaluate import evaluate, load_model
from recomp_eval.runner import SampleStore

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("gqa", "vqav2", "textvqa", "pope", "mme")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fixtures")
    for name in BENCHMARKS:
        write_fixture(name, root)
    return root


@pytest.fixture(scope="module")
def bundle():
    return load_model({"id": "tiny", "dtype": "float32", "device": "cpu"})


def config(data_root: Path, out: Path, bench: str = "pope", *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(
            config_name="eval",
            overrides=[
                f"benchmark={bench}",
                f"benchmark.data_dir={data_root / bench}",
                f"paths.root={out}",
                "runner.max_new_tokens=3",
                "runner.batch_size=2",
                *overrides,
            ],
        )


def samples_of(record) -> dict[str, dict]:
    run_dir = Path(record.config["paths"]["records_dir"])
    paths = list(run_dir.rglob(f"*{record.run_key}/samples.jsonl"))
    assert len(paths) == 1
    return SampleStore(paths[0]).load()


def test_every_method_runs_end_to_end(data_root: Path, tmp_path: Path, bundle) -> None:
    runs = (
        "runs=[{method: none}, {method: recomp, options: {variant: official}},"
        " {method: recomp, retention: 0.25}, {method: prumerge}, {method: prumerge_plus},"
        " {method: visionzip, retention: 0.5}, {method: fastervlm, retention: 0.25},"
        " {method: fastv, retention: 0.5}, {method: random, retention: 0.25},"
        " {method: pool, retention: 0.25}, {method: cdpruner, retention: 0.25},"
        " {method: divprune, retention: 0.25}, {method: trim},"
        " {method: trim, retention: 0.25, options: {variant: fixed}},"
        " {method: vispruner, retention: 0.25}, {method: dart, retention: 0.25},"
        " {method: pdrop, options: {layer_list: [1, 2], ratios: [0.5, 0.25]}}]"
    )
    records = evaluate(config(data_root, tmp_path, "pope", runs), bundle)
    assert [r.method["name"] for r in records] == [
        "none", "recomp", "recomp", "prumerge", "prumerge_plus", "visionzip", "fastervlm",
        "fastv", "random", "pool", "cdpruner", "divprune", "trim", "trim", "vispruner", "dart",
        "pdrop",
    ]  # fmt: skip
    n_patches = 64  # tiny vision tower: 8 x 8 patches
    for rec in records:
        assert rec.samples["evaluated"] > 0 and rec.primary_metric in rec.metrics
        assert 0 < rec.tokens["mean"] <= n_patches + 1, rec.method
        assert rec.flops["prefill_tflops"] > 0 and rec.latency_ms["prefill"]["median"] >= 0
        assert rec.reportable is False  # CPU timings are never reportable
    by_label = {(r.method["name"], r.method["retention"]): r for r in records}
    assert by_label[("none", None)].tokens["mean"] == n_patches
    assert by_label[("fastervlm", 0.25)].tokens["max"] == 16
    # requested vs achieved: DART's count rule 4 + 8 (M // 8) and PyramidDrop's floors
    assert (by_label[("dart", 0.25)].tokens["requested"], by_label[("dart", 0.25)].tokens[
        "achieved"]) == (16, 20)  # fmt: skip
    assert by_label[("pdrop", None)].tokens["achieved"] == 16  # int(64 * 0.25) at the last layer
    assert by_label[("trim", 0.25)].tokens["requested"] == 16 == by_label[("trim", 0.25)].tokens[
        "achieved"]  # fmt: skip
    # compressed runs carry loyalty against the vanilla run of the same setting
    assert "pope/loyalty/agreement" in by_label[("fastervlm", 0.25)].metrics
    rows = samples_of(by_label[("recomp", 0.25)])
    assert all(len(r["keep_map"]) == n_patches for r in rows.values())
    for row in rows.values():  # text tokens feed the FLOPs: every prompt token but <image>
        if row["prompt"]:
            ids = bundle.tokenizer(row["prompt"])["input_ids"]
            assert row["text_tokens"] == len(ids) - ids.count(bundle.image_token_id) > 0


@pytest.mark.parametrize("bench", BENCHMARKS)
@pytest.mark.parametrize("protocol", ["llava15", "lmms_eval"])
def test_every_benchmark_and_protocol(
    bench: str, protocol: str, data_root: Path, tmp_path: Path, bundle
) -> None:
    cfg = config(data_root, tmp_path, bench, f"protocol={protocol}", "method=fastervlm")
    (rec,) = evaluate(cfg, bundle)
    assert rec.benchmark["name"] == bench and rec.protocol == protocol
    assert rec.metrics[f"{bench}/n_scored"] == rec.samples["evaluated"] > 0
    assert rec.benchmark["source"]["data_dir"] == str(data_root / bench)
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert results["config"]["protocol"]["name"] == protocol
    details = results["protocol_details"]
    assert details["image_processor"] == "CLIPImageProcessorPil"
    if protocol == "lmms_eval":
        assert details["template_source"].startswith("processor:chat_template")
        assert "lmms_eval.models.chat.llava_hf.LlavaHf" in details["follows"]
    else:
        assert details["template_source"].startswith("vicuna_v1")
    assert results["env"]["packages"]["torch"]


def test_batch_size_does_not_change_answers(data_root: Path, tmp_path: Path, bundle) -> None:
    one = evaluate(
        config(
            data_root,
            tmp_path / "b1",
            "gqa",
            "runner.batch_size=1",
            "method=recomp",
            "runner.max_new_tokens=6",
        ),
        bundle,
    )[0]
    four = evaluate(
        config(
            data_root,
            tmp_path / "b4",
            "gqa",
            "runner.batch_size=4",
            "method=recomp",
            "runner.max_new_tokens=6",
        ),
        bundle,
    )[0]
    assert one.run_key == four.run_key  # batch size is not part of the identity
    a, b = samples_of(one), samples_of(four)
    assert a.keys() == b.keys()
    for sid in a:
        assert a[sid]["prediction"] == b[sid]["prediction"], sid
        assert a[sid]["kept_tokens"] == b[sid]["kept_tokens"]
    assert {r["batch_size"] for r in b.values()} != {1}


def test_shared_vision_pass_gives_the_same_answers(data_root: Path, tmp_path: Path, bundle) -> None:
    runs = (
        "runs=[{method: none}, {method: recomp, options: {variant: official}},"
        " {method: recomp, retention: 0.25}, {method: prumerge}, {method: visionzip,"
        " retention: 0.5}, {method: fastv, retention: 0.5}]"
    )
    plain = evaluate(config(data_root, tmp_path / "a", "gqa", runs, "runner.max_new_tokens=6"),
                     bundle)  # fmt: skip
    cfg = config(data_root, tmp_path / "b", "gqa", runs, "runner.max_new_tokens=6",
                 "runner.share_vision=true")  # fmt: skip
    from recomp_eval import evaluate as ev

    made = []
    original = ev.Evaluation.__init__

    def keep(self, *a, **kw):
        original(self, *a, **kw)
        made.append(self)

    ev.Evaluation.__init__ = keep
    try:
        shared = evaluate(cfg, bundle)
    finally:
        ev.Evaluation.__init__ = original
    cache = made[0].vision_cache
    batches = -(-len(samples_of(plain[0])) // 2)
    # the first run's pass captures the q/k layers of all six runs: one tower pass per batch
    assert cache.misses == batches and cache.hits == 5 * batches, (cache.hits, cache.misses)
    assert cache.q_layers and cache.k_layers
    for a, b in zip(plain, shared, strict=True):
        assert a.run_key == b.run_key  # sharing is not part of a run's identity
        x, y = samples_of(a), samples_of(b)
        assert x.keys() == y.keys()
        for sid in x:
            assert x[sid]["prediction"] == y[sid]["prediction"], (a.method, sid)
            assert x[sid]["kept_tokens"] == y[sid]["kept_tokens"]
            assert x[sid]["keep_map"] == y[sid]["keep_map"]
            assert y[sid]["timings_ms"]["vision"] > 0  # a reused pass still reports its time


def test_resume_after_simulated_crash(data_root: Path, tmp_path: Path, bundle) -> None:
    ref = evaluate(config(data_root, tmp_path / "ref", "mme", "runner.batch_size=1"), bundle)[0]
    out = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        evaluate(
            config(data_root, out, "mme", "runner.batch_size=1", "runner.stop_after_batches=2"),
            bundle,
        )
    store_path = next(out.rglob("samples.jsonl"))
    assert len(SampleStore(store_path).load()) == 2
    with open(store_path, "a") as handle:  # a torn line, as if killed mid-write
        handle.write('{"sample_id": "torn", "predic')
    resumed = evaluate(config(data_root, out, "mme", "runner.batch_size=1"), bundle)[0]
    lines = store_path.read_text().splitlines()
    ids = [json.loads(line)["sample_id"] for line in lines]
    assert len(ids) == len(set(ids)) == ref.samples["evaluated"]
    assert resumed.metrics == ref.metrics
    assert resumed.run_key == ref.run_key


def _cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "recomp_eval", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.slow  # a real SIGKILL (~30 s); test_resume_after_simulated_crash is the quick one
def test_killed_process_resumes_without_duplicates(data_root: Path, tmp_path: Path) -> None:
    args = [
        "benchmark=vqav2", f"benchmark.data_dir={data_root / 'vqav2'}", f"paths.root={tmp_path}",
        "runner.batch_size=1", "runner.max_new_tokens=64", "method=pool",
    ]  # fmt: skip
    proc = _cli(args)
    store = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.rglob("samples.jsonl"))
        if found and found[0].read_text().count("\n") >= 1:
            store = found[0]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    if store is None:
        pytest.skip("the run finished before it could be killed")
    assert not list(tmp_path.rglob("results.json"))
    done_before = store.read_text().count("\n")
    finished = _cli(args)
    output = finished.communicate(timeout=300)[0]
    assert finished.returncode == 0, output
    ids = [json.loads(line)["sample_id"] for line in store.read_text().splitlines()]
    assert len(ids) == len(set(ids)) > done_before
    record = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert record["samples"]["evaluated"] == len(ids)


def test_multirun_sweep_writes_three_folders_and_one_table(data_root: Path, tmp_path: Path) -> None:
    proc = _cli([
        "-m", "benchmark=pope", f"benchmark.data_dir={data_root / 'pope'}",
        f"paths.root={tmp_path}", "runner.max_new_tokens=2", "method=fastervlm",
        "retention=0.1,0.25,0.5",
    ])  # fmt: skip
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    results = list((tmp_path / "raw").rglob("results.json"))
    assert len(results) == 3
    tables = write_tables(tmp_path / "raw", tmp_path / "tables")
    acc = tables["accuracy"]
    assert sorted(row["retention"] for row in acc.rows) == ["0.1", "0.25", "0.5"]
    assert (tmp_path / "tables" / "plots" / "pope-tiny-llava15.png").exists()


def test_wandb_logger_offline(data_root: Path, tmp_path: Path, bundle, monkeypatch) -> None:
    """One offline run per (job, method) with the run key, config and real media files."""
    import wandb
    from test_tracking import _run_info

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var))
    runs = "runs=[{method: none}, {method: recomp}]"
    cfg = config(data_root, tmp_path, "pope", "logger=wandb", runs, "runner.keep_maps=2")
    records = evaluate(cfg, bundle)
    wandb.teardown()  # flush the transaction logs before reading them
    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    infos = [_run_info(f) for f in folders]
    assert sorted(i["config"]["run_key"] for i in infos) == sorted(r.run_key for r in records)
    for info in infos:
        assert info["config"]["run"]["label"] in ("none", "recomp[paper]")
        assert info["config"]["benchmark"]["name"] == "pope"
    recomp_run = next(f for f, i in zip(folders, infos) if i["config"]["run"]["method"] == "recomp")
    images = sorted((recomp_run / "files" / "media" / "images").glob("*.png"))
    assert len([p for p in images if "keep_map" in p.name]) == 2, images
    assert len([p for p in images if "keep_map" not in p.name]) == 2, images
    (table,) = (recomp_run / "files" / "media" / "table").glob("*.table.json")
    cells = json.loads(table.read_text())["data"]
    assert not any(cell == "Image" for row in cells for cell in row)


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    """Through the function the Hydra app calls (the CLI wrapper itself: test_cli_errors.py)."""
    from recomp_eval.cli import run

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        bad = compose(config_name="eval", overrides=["benchmark=gqa", f"paths.root={tmp_path}",
                                                     "retention=2"])  # fmt: skip
        no_data = compose(config_name="eval", overrides=["benchmark=gqa", f"paths.root={tmp_path}"])
    assert run(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "retention=2" in err, err
    assert run(no_data) == 2  # no data offline
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prefetch" in err and "Traceback" not in err, err


def test_synth_tags_slice_the_results(tmp_path: Path, bundle) -> None:
    from recomp_eval.synth.writers import write_benchmark

    data = write_benchmark("gqa", tmp_path / "synth", n_images=6)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(
            config_name="eval",
            overrides=["benchmark=gqa", f"benchmark.data_dir={data}", f"paths.root={tmp_path}",
                       "runner.max_new_tokens=2"],
        )  # fmt: skip
    (rec,) = evaluate(cfg, bundle)
    sizes = {k: v for k, v in rec.metrics.items() if k.startswith("gqa/slice/size=")}
    counts = [v for k, v in sizes.items() if k.endswith("/n")]
    assert sum(counts) == rec.samples["evaluated"] and "gqa/slice/size=small/n" in sizes
    tables = {t.name: t for t in write_tables(tmp_path / "raw", tmp_path / "tables")["slices"]}
    assert "small" in {c.key for c in tables["slices_gqa_size"].columns}


def test_resume_skips_done_samples_before_decoding(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from recomp_eval.evaluate import build_benchmark

    data = write_fixture("pope", tmp_path, bad=True)
    cfg = config(tmp_path, tmp_path / "out", "pope", f"benchmark.data_dir={data}")
    bench = build_benchmark(OmegaConf.to_container(cfg.benchmark, resolve=True))
    all_ids = [s.sample_id for s in bench]
    bad_ids = {b.sample_id for b in bench.bad}
    assert bad_ids  # the fixture's bad records are screened out when iterated normally
    rest = [s.sample_id for s in bench.iterate(skip=bad_ids | set(all_ids[:2]))]
    assert rest == all_ids[2:] and not bench.bad  # skipped ids were never decoded or screened


def test_test_split_run_writes_the_evalai_submission(tmp_path: Path, bundle) -> None:
    """``submission: vqav2`` in vqav2_testdev.yaml: the run folder gets the EvalAI file."""
    import pyarrow.parquet as pq

    data = write_fixture("vqav2", tmp_path / "data")
    (shard,) = (data / "default" / "validation").glob("*.parquet")
    table = pq.read_table(shard)
    empty = [[] for _ in range(table.num_rows)]  # test-dev has no answers
    table = table.set_column(table.column_names.index("answers"), "answers", [empty])
    (data / "default" / "testdev").mkdir()
    pq.write_table(table, data / "default" / "testdev" / "testdev-00000-of-00001.parquet")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="eval", overrides=[
            "benchmark=vqav2_testdev", f"benchmark.data_dir={data}", f"paths.root={tmp_path}",
            "runner.max_new_tokens=3",
        ])  # fmt: skip
    (rec,) = evaluate(cfg, bundle)
    entries = json.loads((Path(rec.run_dir) / "submission_vqav2.json").read_text())
    rows = SampleStore(Path(rec.run_dir) / "samples.jsonl").load()
    assert len(entries) == len(rows) == table.num_rows
    assert {e["question_id"] for e in entries} == {r["meta"]["question_id"] for r in rows.values()}
    assert rec.metrics["vqav2/n_unscored"] == len(rows)
