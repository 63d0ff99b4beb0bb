"""The lmms-eval plugin (``--model recomp_llava``): model_args checks, and lmms-eval's own
``simple_evaluate`` with its own POPE task YAML on local SynthVQA parquet, against our harness.
"""

from __future__ import annotations

import importlib.util
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


@pytest.fixture(scope="module")
def local_pope(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from recomp_eval.lmms_plugin.tasks import write_tasks
    from recomp_eval.synth.writers import write_benchmark

    root = tmp_path_factory.mktemp("lmms")
    write_benchmark("pope", root / "synth", n_images=2)
    write_tasks(root / "synth", root / "tasks", ("pope",))
    return root / "synth" / "pope", root / "tasks"


def lmms_answers(model, tasks: Path, batch_size: int, limit: int = 8) -> dict[str, str]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    result = simple_evaluate(model=model, tasks=["local_pope"], limit=limit, batch_size=batch_size,
                             log_samples=True, bootstrap_iters=0,
                             task_manager=TaskManager(include_path=str(tasks),
                                                      include_defaults=False))  # fmt: skip
    samples = result["samples"]["local_pope"]
    # keyed as our POPE sample ids (<category>/<question_id>)
    return {f"{s['doc']['category']}/{s['doc']['question_id']}": s["filtered_resps"][0]
            for s in samples}  # fmt: skip


@needs_lmms
@pytest.mark.slow  # ~25 s: make test stays under five minutes
def test_plugin_answers_as_our_harness_at_any_batch_size(local_pope, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from recomp_eval.config_path import CONFIG_DIR
    from recomp_eval.evaluate import evaluate
    from recomp_eval.lmms_plugin.model import RecompLlava
    from recomp_eval.runner import load_run_rows

    data, tasks = local_pope
    model = RecompLlava(pretrained=SYNTH_LLAVA, method="recomp", variant="paper",
                        retention=0.1, device="cpu", batch_size=4)  # fmt: skip
    batched = lmms_answers(model, tasks, 4)
    model.batch_size_per_gpu = 1
    single = lmms_answers(model, tasks, 1)  # the same instance: it survives clean()
    assert batched == single and len(batched) == 8
    assert len(model.side_rows) == 16 and all(r["kept_tokens"] > 0 for r in model.side_rows)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="eval", overrides=[
            "model=synth_llava", "benchmark=pope", f"benchmark.data_dir={data}",
            "protocol=lmms_eval", "method=recomp", "method.variant=paper", "retention=0.1",
            f"paths.root={tmp_path}",
        ])  # fmt: skip
    (record,) = evaluate(cfg)
    ours = {i: r["prediction"] for i, r in load_run_rows(Path(record.run_dir)).items()}
    assert {k: ours[k] for k in batched} == batched


@needs_lmms
@pytest.mark.slow
def test_two_methods_do_not_share_answers(local_pope) -> None:
    from recomp_eval.lmms_plugin.model import RecompLlava

    _, tasks = local_pope
    none = RecompLlava(pretrained=SYNTH_LLAVA, method="none", device="cpu", batch_size=4)
    pool = RecompLlava(pretrained=SYNTH_LLAVA, method="pool", retention=0.05, device="cpu",
                       batch_size=4)  # fmt: skip
    assert repr(none) != repr(pool)
    lmms_answers(none, tasks, 4)
    lmms_answers(pool, tasks, 4)
    kept = {r["kept_tokens"] for r in pool.side_rows}
    assert max(kept) < 0.1 * 576 and {r["kept_tokens"] for r in none.side_rows} == {576}
