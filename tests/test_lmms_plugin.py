"""The lmms-eval plugin (``--model recomp_llava``): model_args checks, and lmms-eval's own
``simple_evaluate`` with its own POPE task YAML on local SynthVQA parquet, against our harness.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from recomp_eval.lmms_plugin.args import parse_model_args

ROOT = Path(__file__).resolve().parent.parent
SYNTH_LLAVA = str(ROOT / "models" / "synth-llava")


# --- model_args: the Hydra path's checks, one line each ---------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"method": "recomp"}, "pretrained="),
        ({"pretrained": "x", "method": "recompp"}, "did you mean 'recomp'"),
        ({"pretrained": "x", "method": "recomp", "variantt": "paper"}, "variantt"),
        ({"pretrained": "x", "method": "recomp", "retention": "lots"}, "retention=lots"),
        ({"pretrained": "x", "method": "recomp", "retention": 1.5}, "retention"),
    ],
)
def test_bad_model_args_are_one_line(args: dict, needle: str) -> None:
    with pytest.raises((ValueError, KeyError)) as err:
        parse_model_args(args, device="cpu")
    text = str(err.value)
    assert needle in text and "\n" not in text


def test_model_args_start_from_the_method_yaml_and_the_repr_key_differs() -> None:
    paper = parse_model_args({"pretrained": "m", "method": "recomp", "variant": "paper",
                              "retention": 0.1}, device="cpu")  # fmt: skip
    official = parse_model_args({"pretrained": "m", "method": "recomp", "variant": "official",
                                 "retention": 0.1}, device="cpu")  # fmt: skip
    from recomp_eval.runs import method_defaults

    assert set(method_defaults("recomp")) - {"retention"} <= set(paper.options)  # the YAML's
    assert paper.options["variant"] == "paper" and official.options["variant"] == "official"
    assert paper.model["dtype"] == "float32" and paper.retention == 0.1
    same = parse_model_args({"pretrained": "m", "method": "recomp", "variant": "paper",
                             "retention": "0.1"}, device="cpu")  # fmt: skip
    assert paper.identity() == same.identity() != official.identity()


def test_importing_the_package_does_not_import_lmms_eval() -> None:
    import subprocess

    code = ("import sys, recomp_eval, recomp_eval.lmms_plugin, recomp_eval.lmms_plugin.args, "
            "recomp_eval.evaluate; print('lmms_eval' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- lmms-eval end to end -----------------------------------------------------------------------

needs_lmms = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed")  # fmt: skip


BENCHES = ("pope", "mme", "gqa")
METHOD = {"method": "recomp", "variant": "paper", "retention": 0.1}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """SynthVQA POPE/MME/GQA parquet and the include-path folder of local_<bench> tasks."""
    from recomp_eval.lmms_plugin.tasks import write_tasks
    from recomp_eval.synth.writers import write_benchmark

    root = tmp_path_factory.mktemp("lmms")
    for bench in BENCHES:
        write_benchmark(bench, root / "synth", n_images=2)
    write_tasks(root / "synth", root / "tasks", BENCHES)
    return root / "synth", root / "tasks"


def lmms_run(model, tasks: Path, batch_size: int, benches=BENCHES, limit=None) -> dict:
    """lmms-eval's own evaluation: {bench: (answers keyed as our sample ids, its results)}."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    names = [f"local_{b}" for b in benches]
    result = simple_evaluate(model=model, tasks=names, limit=limit, batch_size=batch_size,
                             log_samples=True, bootstrap_iters=0,
                             task_manager=TaskManager(include_path=str(tasks),
                                                      include_defaults=False))  # fmt: skip
    out = {}
    for bench in benches:
        samples = sorted(result["samples"][f"local_{bench}"], key=lambda s: s["doc_id"])
        seen: dict[str, int] = {}
        answers = {}
        for sample in samples:
            doc = sample["doc"]
            if bench == "pope":
                key = f"{doc['category']}/{doc['question_id']}"
            elif bench == "mme":  # our ids: <question_id>#<place in its image pair>
                n = seen[doc["question_id"]] = seen.get(doc["question_id"], -1) + 1
                key = f"{doc['question_id']}#{n}"
            else:
                key = str(doc["id"])
            answers[key] = sample["filtered_resps"][0]
        out[bench] = (answers, result["results"][f"local_{bench}"])
    return out


# our primary metric (protocol lmms_eval) -> lmms-eval's result key
THEIRS = {"pope": "pope_f1_score,none", "mme": "mme_perception_score,none",
          "gqa": "exact_match,none"}  # fmt: skip


@needs_lmms
@pytest.mark.slow  # ~40 s: make test stays under five minutes
def test_plugin_answers_and_scores_as_our_harness(local, tmp_path: Path) -> None:
    """lmms-eval's own POPE, MME and GQA tasks through the plugin: the answers equal our
    harness's protocol=lmms_eval answers, lmms-eval's scores equal our metrics, batch 4 = 1."""
    from hydra import compose, initialize_config_dir

    from recomp_eval.config_path import CONFIG_DIR
    from recomp_eval.evaluate import evaluate
    from recomp_eval.lmms_plugin.model import RecompLlava
    from recomp_eval.runner import load_run_rows

    synth, tasks = local
    requests = tmp_path / "requests.jsonl"
    model = RecompLlava(pretrained=SYNTH_LLAVA, device="cpu", batch_size=4,
                        requests_file=str(requests), **METHOD)  # fmt: skip
    batched = lmms_run(model, tasks, 4)
    model.batch_size_per_gpu = 1
    single = lmms_run(model, tasks, 1, benches=("pope",))  # the same instance: survives clean()
    assert single["pope"][0] == batched["pope"][0]
    lines = requests.read_text().splitlines()
    assert len(lines) == sum(len(a) for a, _ in batched.values()) + len(single["pope"][0])
    assert all(0 < json.loads(line)["kept_tokens"] < 576 for line in lines)
    for bench in BENCHES:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="eval", overrides=[
                "model=synth_llava", f"benchmark={bench}", f"benchmark.data_dir={synth / bench}",
                "protocol=lmms_eval", "method=recomp", "method.variant=paper", "retention=0.1",
                f"paths.root={tmp_path / 'ours'}",
            ])  # fmt: skip
        (record,) = evaluate(cfg)
        ours = {i: r["prediction"] for i, r in load_run_rows(Path(record.run_dir)).items()}
        answers, results = batched[bench]
        assert answers == ours, bench  # every sample, the same answer
        mine, theirs = record.metrics[record.primary_metric], results[THEIRS[bench]]
        assert min(abs(mine - theirs * scale) for scale in (1, 100)) < 1e-6, (bench, mine, theirs)


@needs_lmms
@pytest.mark.slow
def test_two_methods_do_not_share_answers(local) -> None:
    from recomp_eval.lmms_plugin.model import RecompLlava

    _, tasks = local
    none = RecompLlava(pretrained=SYNTH_LLAVA, method="none", device="cpu", batch_size=4,
                       requests_file="none")  # fmt: skip
    pool = RecompLlava(pretrained=SYNTH_LLAVA, method="pool", retention=0.05, device="cpu",
                       batch_size=4, requests_file="none")  # fmt: skip
    assert repr(none) != repr(pool)
    lmms_run(none, tasks, 4, benches=("pope",), limit=8)
    lmms_run(pool, tasks, 4, benches=("pope",), limit=8)
    kept = {r["kept_tokens"] for r in pool.side_rows}
    assert max(kept) < 0.1 * 576 and {r["kept_tokens"] for r in none.side_rows} == {576}


@needs_lmms
def test_the_entry_point_gives_lmms_eval_our_model_with_checked_args() -> None:
    """What ``--model recomp_llava --model_args ...`` does: lmms-eval's registry resolves our
    class through the entry point and builds it from the argument string."""
    from types import SimpleNamespace

    from lmms_eval.models import get_model

    cls = get_model("recomp_llava")
    assert cls.__name__ == "RecompLlava" and cls.is_simple
    model = cls.create_from_arg_string(
        f"pretrained={SYNTH_LLAVA},method=pool,retention=0.05,requests_file=none",
        {"batch_size": 2, "device": "cpu"},
    )
    assert model.batch_size_per_gpu == 2 and '"method": "pool"' in repr(model)
    model.clean()
    assert model.bundle.model is not None  # clean() keeps the loaded model
    with pytest.raises(NotImplementedError) as err:
        model.loglikelihood([SimpleNamespace(task_name="mmbench_en")])
    assert "mmbench_en" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError) as bad:
        cls.create_from_arg_string(f"pretrained={SYNTH_LLAVA},method=pool,retention=2",
                                   {"batch_size": 1, "device": "cpu"})  # fmt: skip
    assert "retention" in str(bad.value) and "\n" not in str(bad.value)


@needs_lmms
def test_generation_settings_follow_the_task() -> None:
    from recomp_eval.lmms_plugin.model import generation_limits

    assert generation_limits({}) == (1024, ("\n\n",))  # lmms-eval's defaults (textvqa sets none)
    assert generation_limits({"max_new_tokens": 16, "until": "ASSISTANT:"}) == (16, ("ASSISTANT:",))
    assert generation_limits({"until": ["\n", "."], "temperature": 0}) == (1024, ("\n", "."))
    with pytest.raises(ValueError) as err:
        generation_limits({"temperature": 0.7})
    assert "greedily" in str(err.value) and "\n" not in str(err.value)


@needs_lmms
@pytest.mark.slow
def test_accelerate_launch_shards_requests_and_matches_one_process(local, tmp_path: Path) -> None:
    """lmms-eval's own sharding over 2 processes (accelerate launch, gloo on CPU) gives the
    answers and scores of one process; each process writes its own requests file."""
    import subprocess

    _, tasks = local
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def lmms_cli(prefix: list[str], out: Path) -> tuple[dict, dict]:
        args = [*prefix, "--model", "recomp_llava", "--model_args",
                f"pretrained={SYNTH_LLAVA},method=pool,retention=0.25,device=cpu,"
                f"requests_file={out}/requests.jsonl", "--tasks", "local_pope",
                "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(out),
                "--log_samples"]  # fmt: skip
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        (results,) = out.rglob("*_results.json")
        (samples,) = out.rglob("*_samples_local_pope.jsonl")
        answers = {json.loads(line)["doc_id"]: json.loads(line)["filtered_resps"][0]
                   for line in samples.read_text().splitlines()}  # fmt: skip
        return json.loads(results.read_text())["results"]["local_pope"], answers

    one = lmms_cli([sys.executable, "-m", "lmms_eval"], tmp_path / "one")
    two = lmms_cli([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "lmms_eval"], tmp_path / "two")  # fmt: skip
    assert two[1] == one[1] and len(one[1]) == 12
    assert two[0]["pope_f1_score,none"] == one[0]["pope_f1_score,none"]
    ranks = sorted(p.name for p in (tmp_path / "two").glob("requests.rank*.jsonl"))
    assert ranks == ["requests.rank0.jsonl", "requests.rank1.jsonl"]
    lines = sum(len(p.read_text().splitlines()) for p in (tmp_path / "two").glob("requests.*"))
    assert lines == 12  # every request once, over both processes
