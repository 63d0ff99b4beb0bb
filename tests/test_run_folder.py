"""Run folders: one process per run (lock), per-process peak memory on resume, over-long prompts."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recomp_eval.benchmarks.fixtures import write_fixture
from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.evaluate import evaluate, load_model
from recomp_eval.run_folder import RunBusyError, RunFolder, run_peak_memory
from recomp_eval.runner import SampleStore

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixture("pope", tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="module")
def bundle():
    return load_model({"id": "tiny", "dtype": "float32", "device": "cpu"})


def config(data_dir: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="eval", overrides=[
            "benchmark=pope", f"benchmark.data_dir={data_dir}", f"paths.root={out}",
            "runner.max_new_tokens=3", "runner.batch_size=2", "method=pool", *overrides,
        ])  # fmt: skip


def test_lock_excludes_a_second_claim(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    with folder.claim():
        with pytest.raises(RunBusyError) as err, RunFolder(tmp_path / "run").claim():
            pass
        text = str(err.value)
        assert "\n" not in text and "pid" in text and "rerun the same command" in text
    with folder.claim():  # released on exit
        pass


def test_waiting_claim_gets_the_lock_after_release(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    order = []

    def second() -> None:
        with RunFolder(tmp_path / "run").claim(on_busy="wait", poll_s=0.05):
            order.append("second")

    with folder.claim():
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join(timeout=10)
    assert order == ["first done", "second"]


def test_second_identical_run_exits_with_one_line(data_dir: Path, tmp_path: Path, bundle) -> None:
    (done,) = evaluate(config(data_dir, tmp_path), bundle)
    samples = Path(done.run_dir) / "samples.jsonl"
    before = samples.read_text()
    # as if another process were working on it
    with RunFolder(Path(done.run_dir)).claim(), pytest.raises(RunBusyError):
        evaluate(config(data_dir, tmp_path), bundle)
    assert samples.read_text() == before  # nothing computed or written twice


def test_second_cli_process_on_a_busy_run_exits_with_one_line(
    data_dir: Path, tmp_path: Path, bundle
) -> None:
    """A second process (the CLI) meets a run folder another live process holds."""
    args = [sys.executable, "-m", "recomp_eval", "benchmark=pope", f"benchmark.data_dir={data_dir}",
            f"paths.root={tmp_path}", "runner.max_new_tokens=3", "method=pool"]  # fmt: skip
    (done,) = evaluate(config(data_dir, tmp_path), bundle)  # the same run, made in-process
    folder = Path(done.run_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from recomp_eval.run_folder import RunFolder\n"
         "with RunFolder(sys.argv[1]).claim():\n print('held', flush=True); time.sleep(60)",
         str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (folder / "samples.jsonl").read_text()
        second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"pid {holder.pid}" in errors[0], second.stderr
    assert "runner.on_busy=wait" in errors[0]
    assert (folder / "samples.jsonl").read_text() == before


def test_resumed_run_keeps_the_original_peak_memory(data_dir: Path, tmp_path: Path, bundle) -> None:
    with pytest.raises(KeyboardInterrupt, match="rerun the same command to resume"):
        evaluate(config(data_dir, tmp_path, "runner.stop_after_batches=1"), bundle)
    (folder,) = [p.parent for p in tmp_path.rglob("processes.json")]
    (first,) = RunFolder(folder).processes()
    assert first["samples"] == 2 and first["peak_memory_mb"]["total"] > 0
    (rec,) = evaluate(config(data_dir, tmp_path), bundle)
    entries = RunFolder(folder).processes()
    assert len(entries) == 2 and entries[0] == first  # the original process's entry is kept
    assert [e["samples"] for e in rec.peak_memory_mb["by_process"]] == [
        2,
        rec.samples["evaluated"] - 2,
    ]
    assert rec.peak_memory_mb["total"] == max(e["peak_memory_mb"]["total"] for e in entries)
    (again,) = evaluate(config(data_dir, tmp_path), bundle)  # nothing left: no new entry
    assert len(RunFolder(folder).processes()) == 2
    assert again.peak_memory_mb["total"] == rec.peak_memory_mb["total"]


def test_peak_memory_without_entries_uses_the_current_process() -> None:
    assert run_peak_memory([], {"total": 5.0, "kind": "host_rss"})["total"] == 5.0
    entries = [
        {"pid": 1, "host": "a", "samples": 10, "peak_memory_mb": {"total": 900.0, "kind": "cuda"}},
        {"pid": 2, "host": "a", "samples": 5, "peak_memory_mb": {"total": 300.0, "kind": "cuda"}},
    ]
    out = run_peak_memory(entries, {"total": 1.0, "kind": "cuda"})
    assert out["total"] == 900.0 and [p["total"] for p in out["by_process"]] == [900.0, 300.0]


def test_over_long_prompts_are_skipped_and_listed(tmp_path: Path, bundle) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = write_fixture("pope", tmp_path / "data")
    (shard,) = (data / "default" / "test").glob("*.parquet")
    table = pq.read_table(shard)
    questions = table.column("question").to_pylist()
    long_id = table.column("question_id").to_pylist()[1]
    questions[1] = "Is there a cat " + "really " * 5000 + "?"
    index = table.column_names.index("question")
    pq.write_table(table.set_column(index, "question", pa.array(questions)), shard)
    (rec,) = evaluate(config(data, tmp_path / "out"), bundle)
    reasons = {s["sample_id"]: s["reason"] for s in rec.samples["skipped_ids"]}
    too_long = [sid for sid, why in reasons.items() if why == "prompt_too_long"]
    assert len(too_long) == 1 and too_long[0].endswith(str(long_id))
    assert rec.samples["prompt_too_long"] == 1
    assert rec.samples["evaluated"] == len(questions) - 1
    rows = SampleStore(Path(rec.run_dir) / "samples.jsonl").load()
    assert too_long[0] not in rows
    # a smaller context skips more, by the documented rule (text + all visual + max_new)
    with pytest.raises(ValueError, match=r"no sample of pope was evaluated.*prompt_too_long"):
        evaluate(config(data, tmp_path / "tight", "runner.context_length=90"), bundle)
