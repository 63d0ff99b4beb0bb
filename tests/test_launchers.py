"""Several processes for real: torchrun, accelerate launch and a submitit job array (the SLURM
path, run by submitit's local executor), each compared with a one-process run of the same
command. Nothing collective runs, so gloo/NCCL never enter; on this CPU every process uses one
thread. The torchrun check on the tiny model is in ``make test``; the rest are ``slow``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recomp_eval.benchmarks.fixtures import write_fixture
from recomp_eval.records import RunRecord
from recomp_eval.runner import load_run_rows

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RUNS = "runs=[{method: none},{method: pool, retention: 0.25},{method: recomp, retention: 0.25}]"
SAME = ("run_key", "metrics", "primary_metric", "tokens", "flops", "samples", "method",
        "benchmark", "identity")  # fmt: skip
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def launch(prefix: list[str], overrides: list[str], timeout: int = 600) -> str:
    proc = subprocess.run([*prefix, *overrides], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def summary(out: Path) -> dict[str, dict]:
    """Folder name -> what must not depend on the split, plus the answers."""
    found = {}
    for path in sorted((out / "raw").rglob("results.json")):
        record = RunRecord(**json.loads(path.read_text()))
        rows = load_run_rows(path.parent)
        found[path.parent.name] = {
            "record": {k: getattr(record, k) for k in SAME},
            "rows": {
                i: (r["prediction"], r["kept_tokens"], r.get("keep_map")) for i, r in rows.items()
            },
            "world": record.world,
        }
    return found


def same_as(one: dict[str, dict], many: dict[str, dict], size: int) -> None:
    assert one.keys() == many.keys() and len(one) == 3
    for name in one:
        assert many[name]["record"] == one[name]["record"], name
        assert many[name]["rows"] == one[name]["rows"], name
        assert many[name]["world"]["size"] == size
        assert one[name]["world"]["timing"] == "one process"
        if size > 1:
            assert many[name]["world"]["timing"] == f"{size} processes sharing cpu"


@pytest.fixture(scope="module")
def pope(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixture("pope", tmp_path_factory.mktemp("fixtures"))


def tiny_overrides(data: Path, out: Path) -> list[str]:
    return ["benchmark=pope", f"benchmark.data_dir={data}", f"paths.root={out}",
            "runner.max_new_tokens=3", "runner.batch_size=2", "runner.torch_threads=1", RUNS]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(pope: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The one-process records, evaluated in this process (the same code as the CLI)."""
    from hydra import compose, initialize_config_dir

    from recomp_eval.config_path import CONFIG_DIR
    from recomp_eval.evaluate import evaluate

    out = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            evaluate(compose(config_name="eval", overrides=tiny_overrides(pope, out)))
    finally:
        torch.set_num_threads(threads)  # runner.torch_threads=1 must not slow later tests
    return summary(out)


def test_torchrun_two_processes_equal_one(pope: Path, tmp_path: Path, one_process) -> None:
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "-m", "recomp_eval"]
    launch(torchrun, tiny_overrides(pope, tmp_path))
    many = summary(tmp_path)
    same_as(one_process, many, 2)
    devices = {s["device"] for run in many.values() for s in run["world"]["shards"]}
    assert devices == {"cpu"}
    hydra_dirs = [p.name for p in (tmp_path / "hydra").glob("*/*")]
    assert any(d.endswith("-rank1") for d in hydra_dirs)  # one Hydra folder per rank


@pytest.mark.slow
def test_accelerate_launch_two_processes_equal_one(pope: Path, tmp_path: Path,
                                                    one_process) -> None:  # fmt: skip
    accelerate = [str(VENV_BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "-m", "recomp_eval"]  # fmt: skip
    launch(accelerate, tiny_overrides(pope, tmp_path))
    same_as(one_process, summary(tmp_path), 2)


@pytest.mark.slow
def test_submitit_array_of_two_shards_then_merge(pope: Path, tmp_path: Path,
                                                 one_process) -> None:  # fmt: skip
    """One multirun over the shards = one job array (the SLURM launcher's path, run locally)."""
    args = [sys.executable, "-m", "recomp_eval", "-m", "hydra/launcher=local_array",
            "runner.num_shards=2", "runner.shard=0,1"]  # fmt: skip
    output = launch(args, tiny_overrides(pope, tmp_path))
    jobs = {p.name for p in tmp_path.rglob(".submitit/*") if p.is_dir()}
    assert jobs, output[-2000:]  # submitit ran them (its job folders)
    for run in (tmp_path / "raw").rglob("identity.json"):
        markers = [json.loads(p.read_text()) for p in run.parent.glob("shard-*-of-2.json")]
        assert {m["launcher"] for m in markers} == {"array"} and len(markers) == 2
        assert len({m["pid"] for m in markers}) == 2  # two jobs, one shard each
    merged = subprocess.run([str(VENV_BIN / "recomp-eval-merge"), "--root", str(tmp_path / "raw"),
                             "--strict"], capture_output=True, text=True, env=ENV)  # fmt: skip
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "0 runs unfinished" in merged.stdout
    same_as(one_process, summary(tmp_path), 2)


@pytest.mark.slow
def test_torchrun_on_synth_llava_equals_one_process(tmp_path: Path) -> None:
    from recomp_eval.synth.writers import write_benchmark

    data = tmp_path / "synth"
    write_benchmark("gqa", data, n_images=4)
    overrides = ["model=synth_llava", "benchmark=gqa", f"benchmark.data_dir={data / 'gqa'}",
                 "runner.batch_size=4", "runner.torch_threads=1", RUNS]  # fmt: skip
    launch([sys.executable, "-m", "recomp_eval"], [*overrides, f"paths.root={tmp_path / 'one'}"])
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "-m", "recomp_eval"]
    launch(torchrun, [*overrides, f"paths.root={tmp_path / 'two'}"])
    same_as(summary(tmp_path / "one"), summary(tmp_path / "two"), 2)


@pytest.mark.slow
def test_a_killed_torchrun_rank_resumes_in_one_process(pope: Path, tmp_path: Path) -> None:
    """SIGKILL rank 1 mid-run (torchrun then stops rank 0 too); one process finishes the runs
    with the record of an uninterrupted one-process run, and nothing is done twice."""
    slow = ["runner.batch_size=1", "runner.max_new_tokens=24"]
    out = tmp_path / "killed"
    overrides = [*tiny_overrides(pope, out), *slow]
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "-m", "recomp_eval"]
    proc = subprocess.Popen([*torchrun, *overrides], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and killed is None:
        for path in out.rglob("processes.shard-1-of-2.json"):
            entries = json.loads(path.read_text() or "[]")
            if entries and entries[0]["samples"] >= 1:
                killed = entries[0]["pid"]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    proc.communicate(timeout=120)
    if killed is None:
        pytest.skip("the runs finished before rank 1 could be killed")
    assert proc.returncode != 0
    assert len(list((out / "raw").rglob("results.json"))) < 3
    launch([sys.executable, "-m", "recomp_eval"], overrides)  # world size 1 finishes them
    launch([sys.executable, "-m", "recomp_eval"], [*tiny_overrides(pope, tmp_path / "one"), *slow])
    one, resumed = summary(tmp_path / "one"), summary(out)
    assert one.keys() == resumed.keys() and len(one) == 3
    for name in one:
        assert resumed[name]["record"] == one[name]["record"], name
        assert resumed[name]["rows"] == one[name]["rows"], name
    for folder in {p.parent for p in out.rglob("samples*.jsonl")}:
        ids = [json.loads(line)["sample_id"] for f in folder.glob("samples*.jsonl")
               for line in f.read_text().splitlines()]  # fmt: skip
        assert len(ids) == len(set(ids))  # nothing done twice
