"""Data-parallel runs: shard assignment, shard files, markers, merge, resume at any world size.

The shards of a run here are evaluated one after another in this process (``runner.shard`` of
``runner.num_shards``, the job-array path); torchrun and submitit launch the same code in several
processes (``test_launchers.py``). Every sharded record is compared with a one-process run of
the same command: same answers, metrics, loyalty, token counts, FLOPs and skipped samples.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recomp_eval.benchmarks.fixtures import write_fixture
from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.evaluate import RunInterrupted, evaluate, load_model
from recomp_eval.merge import main as merge_main
from recomp_eval.run_folder import RunBusyError, RunFolder
from recomp_eval.runner import load_run_rows
from recomp_eval.shards import World, owned_ids, shard_of, world_from

ROOT = Path(__file__).resolve().parent.parent
RUNS = "runs=[{method: none},{method: pool, retention: 0.25}]"
# what must not depend on how a run was split (latency, memory, env and created may)
SAME = ("run_key", "metrics", "primary_metric", "tokens", "flops", "samples", "method",
        "benchmark", "identity", "protocol_details")  # fmt: skip


# --- the assignment ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 3, 8])
def test_shards_are_balanced_disjoint_and_cover_every_id(size: int) -> None:
    ids = [f"q{n}" for n in range(10_000)]
    shards = [owned_ids(ids, World(rank, size)) for rank in range(size)]
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # well within 1% of 10k / size
    assert set().union(*shards) == set(ids) and sum(sizes) == len(ids)


def test_assignment_ignores_the_order_and_the_hash_seed() -> None:
    ids = [f"{n:05d}" for n in range(500)]
    shuffled = random.Random(0).sample(ids, len(ids))
    assert shard_of(ids, 4) == shard_of(shuffled, 4)
    code = ("from recomp_eval.shards import shard_of; import json; "
            "print(json.dumps(shard_of([f'{n:05d}' for n in range(500)], 4), sort_keys=True))")  # fmt: skip
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {json.dumps(shard_of(ids, 4), sort_keys=True) + "\n"}


def test_world_from_the_launcher_or_the_array() -> None:
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert world_from({}, torchrun) == World(1, 2, 1, "torchrun")
    assert world_from({"shard": 2, "num_shards": 4}, {}) == World(2, 4, 0, "array")
    assert world_from({}, {}) == World()
    assert world_from({}, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) == World()
    for runner, env in [({"shard": 0, "num_shards": 2}, torchrun), ({"shard": 1}, {}),
                        ({"shard": 2, "num_shards": 2}, {})]:  # fmt: skip
        with pytest.raises(ValueError) as err:
            world_from(runner, env)
        assert "\n" not in str(err.value) and "runner.shard" in str(err.value)


# --- sharded runs in one process ----------------------------------------------------------------


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
            "runner.max_new_tokens=3", "runner.batch_size=2", RUNS, *overrides,
        ])  # fmt: skip


@pytest.fixture(scope="module")
def single(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, bundle) -> list[dict]:
    """The one-process records (none, pool) and their rows."""
    out = tmp_path_factory.mktemp("single")
    return [records_and_rows(r) for r in evaluate(config(data_dir, out), bundle)]


def records_and_rows(record) -> dict:
    rows = load_run_rows(Path(record.run_dir))
    return {
        "record": {k: getattr(record, k) for k in SAME},
        "rows": {
            i: (r["prediction"], r["kept_tokens"], r.get("keep_map")) for i, r in rows.items()
        },
    }


def results(out: Path) -> list[dict]:
    """The records under ``out`` as :func:`records_and_rows` gives them, none first."""
    from recomp_eval.records import RunRecord

    found = []
    for path in sorted((out / "raw").rglob("results.json")):
        record = RunRecord(**json.loads(path.read_text()))
        found.append(records_and_rows(record))
    return sorted(found, key=lambda r: r["record"]["method"]["name"] != "none")


def test_two_shards_give_the_one_process_record(data_dir: Path, tmp_path: Path, bundle,
                                                single: list[dict]) -> None:  # fmt: skip
    first = evaluate(config(data_dir, tmp_path, "runner.shard=0", "runner.num_shards=2"), bundle)
    assert first == []  # shard 0 alone completes no run
    assert not list(tmp_path.rglob("results.json"))
    last = evaluate(config(data_dir, tmp_path, "runner.shard=1", "runner.num_shards=2"), bundle)
    assert len(last) == 2  # the last shard to finish builds both records
    merged = results(tmp_path)
    assert merged == single
    pool = json.loads(next(p for p in (tmp_path / "raw").rglob("results.json")
                           if "pool" in str(p)).read_text())  # fmt: skip
    assert any(k.startswith("loyalty") or "loyal" in k for k in pool["metrics"])
    assert pool["world"]["size"] == 2 and pool["world"]["timing"] == "2 processes sharing cpu"
    assert [s["rank"] for s in pool["world"]["shards"]] == [0, 1]
    folder = Path(pool["run_dir"])
    files = sorted(p.name for p in folder.glob("samples*.jsonl"))
    assert files == ["samples.shard-0-of-2.jsonl", "samples.shard-1-of-2.jsonl"]
    per_file = [set(load_run_rows_of(folder / f)) for f in files]
    assert not per_file[0] & per_file[1]  # no sample done twice


def load_run_rows_of(path: Path) -> list[str]:
    return [json.loads(line)["sample_id"] for line in path.read_text().splitlines()]


def test_a_run_stopped_on_two_shards_finishes_on_one(data_dir: Path, tmp_path: Path, bundle,
                                                     single: list[dict]) -> None:  # fmt: skip
    with pytest.raises(RunInterrupted):
        evaluate(config(data_dir, tmp_path, "runner.shard=0", "runner.num_shards=2",
                        "runner.stop_after_batches=1"), bundle)  # fmt: skip
    evaluate(config(data_dir, tmp_path, "runner.shard=1", "runner.num_shards=2"), bundle)
    assert not list(tmp_path.rglob("results.json"))  # shard 0 stopped in its first run
    finished = evaluate(config(data_dir, tmp_path), bundle)
    assert len(finished) == 2
    assert results(tmp_path) == single
    for folder in {p.parent for p in tmp_path.rglob("samples*.jsonl")}:
        ids = [i for f in sorted(folder.glob("samples*.jsonl")) for i in load_run_rows_of(f)]
        assert len(ids) == len(set(ids))  # nothing done twice across world sizes


def test_merge_lists_the_missing_shard_and_builds_when_complete(
    data_dir: Path, tmp_path: Path, bundle, single: list[dict], capsys
) -> None:
    evaluate(config(data_dir, tmp_path, "runner.shard=1", "runner.num_shards=2"), bundle)
    assert merge_main(["--root", str(tmp_path / "raw"), "--strict"]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("unfinished:")]
    assert len(lines) == 2 and all("shard 0 of 2 not finished" in line for line in lines)
    assert all("runner.shard=0" in line for line in lines)
    evaluate(config(data_dir, tmp_path, "runner.shard=0", "runner.num_shards=2"), bundle)
    for path in (tmp_path / "raw").rglob("results.json"):
        path.unlink()  # e.g. copied from the cluster without them: merge rebuilds them
    assert merge_main(["--root", str(tmp_path / "raw"), "--strict"]) == 0
    assert "2 records built, 0 runs unfinished" in capsys.readouterr().out
    assert results(tmp_path) == single
    assert merge_main(["--root", str(tmp_path / "raw")]) == 0  # built once: nothing to redo
    assert "0 records built" in capsys.readouterr().out


def test_a_second_process_on_the_same_shard_is_refused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    with folder.claim(shard="shard-0-of-2"):
        with RunFolder(tmp_path / "run").claim(shard="shard-1-of-2"):
            pass  # the other shard runs alongside
        with (
            pytest.raises(RunBusyError) as err,
            RunFolder(tmp_path / "run").claim(shard="shard-0-of-2"),
        ):
            pass
        assert "shard-0-of-2" in str(err.value) and "\n" not in str(err.value)
        # a one-process run of the same run is refused while a shard runs
        with pytest.raises(RunBusyError), RunFolder(tmp_path / "run").claim():
            pass


def test_device_map_is_refused_under_torchrun(monkeypatch) -> None:
    from recomp_eval.models import load_model as load

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as err:
        load({"id": "tiny", "device_map": "auto"})
    assert "single process" in str(err.value) and "\n" not in str(err.value)


def test_launcher_variables_are_hidden_while_loading(monkeypatch) -> None:
    """transformers must not see torchrun's WORLD_SIZE while loading (tensor-parallel switch)."""
    import transformers

    from recomp_eval.models.llava.loader import load_llava
    from recomp_eval.models.llava.tiny import build_tiny

    seen = []
    real = transformers.LlavaForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append((os.environ.get("WORLD_SIZE"), kwargs.get("device_map")))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained",
                        classmethod(spy))  # fmt: skip
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    bundle = load_llava(str(build_tiny()), dtype="float32", device_map={"": "cpu"})
    assert seen == [(None, {"": "cpu"})]
    assert os.environ["WORLD_SIZE"] == "2"  # restored
    assert str(bundle.device) == "cpu"


def test_tables_mark_latencies_of_multi_process_runs(data_dir: Path, tmp_path: Path,
                                                     bundle) -> None:  # fmt: skip
    from recomp_eval.aggregate import write_tables

    for shard in (0, 1):
        evaluate(config(data_dir, tmp_path / "two", f"runner.shard={shard}",
                        "runner.num_shards=2"), bundle)  # fmt: skip
    evaluate(config(data_dir, tmp_path / "one"), bundle)
    two = write_tables(tmp_path / "two" / "raw", tmp_path / "t2")["efficiency"]
    one = write_tables(tmp_path / "one" / "raw", tmp_path / "t1")["efficiency"]
    assert {r["timing"] for r in two.rows} == {"2 processes sharing cpu"}
    assert "timing" in [c.key for c in two.columns] and any("timed with" in n for n in two.notes)
    assert "timing" not in [c.key for c in one.columns]


def test_latency_experiment_refuses_processes_sharing_a_cpu(data_dir: Path, tmp_path: Path,
                                                            bundle) -> None:  # fmt: skip
    cfg = config(data_dir, tmp_path, "experiment=latency", "runner.shard=0", "runner.num_shards=2")
    with pytest.raises(ValueError) as err:
        evaluate(cfg, bundle)
    assert "one process per device" in str(err.value) and "\n" not in str(err.value)


def test_each_run_is_logged_once_by_the_shard_that_completes_it(
    data_dir: Path, tmp_path: Path, bundle, monkeypatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var))
    shard = lambda r: config(data_dir, tmp_path, "logger=wandb", "runner.keep_maps=0",  # noqa: E731
                             f"runner.shard={r}", "runner.num_shards=2")  # fmt: skip
    evaluate(shard(0), bundle)
    wandb.teardown()
    assert not list((tmp_path / "wandb").glob("offline-run-*"))  # shard 0 completed no run
    records = evaluate(shard(1), bundle)
    wandb.teardown()
    assert len(records) == 2
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
