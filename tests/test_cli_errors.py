"""Every user-fixable failure ends in one line that names the problem and the fix.

In-process through ``recomp_eval.cli.run`` (the function the Hydra app calls) where possible,
through the real CLI where Hydra or signals are involved.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from recomp_eval import cli
from recomp_eval.benchmarks.fixtures import write_fixture
from recomp_eval.cli_checks import check_output_root, check_overrides
from recomp_eval.config_path import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixture("pope", tmp_path_factory.mktemp("fixtures"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="eval", overrides=list(overrides))


def one_error_line(capsys: pytest.CaptureFixture, status: int, expected: int = 2) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("recomp-eval:")]
    assert status == expected and len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def run_cli(data_dir: Path, out: Path, *overrides: str) -> int:
    return cli.run(composed("benchmark=pope", f"benchmark.data_dir={data_dir}",
                            f"paths.root={out}", "runner.max_new_tokens=3", *overrides))  # fmt: skip


# --- checked before anything loads ----------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("runner.batch_size=0", "runner.batch_size=0: must be an integer >= 1"),
        ("runner.sort_window=-1", "runner.sort_window=-1"),
        ("runner.on_busy=later", "runner.on_busy=later: use one of exit, wait"),
        ("runner.fingerprint=md5", "use one of quick, full"),
    ],
)
def test_bad_runner_settings_stop_before_the_model_loads(
    override: str, needle: str, data_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import recomp_eval.evaluate as ev

    monkeypatch.setattr(ev, "load_model", lambda *a: pytest.fail("model loaded before the check"))
    line = one_error_line(capsys, run_cli(data_dir, tmp_path, override))
    assert needle in line


def test_missing_data_is_reported_before_the_model_loads(tmp_path: Path, capsys) -> None:
    status = cli.run(composed("benchmark=gqa", f"paths.root={tmp_path}",
                              "model.id=/nonexistent/model/folder"))  # fmt: skip
    line = one_error_line(capsys, status)
    assert "lmms-lab/GQA" in line and "prefetch" in line and "nonexistent" not in line


def test_output_root_that_is_a_file(tmp_path: Path, data_dir: Path, capsys) -> None:
    afile = tmp_path / "results"
    afile.write_text("not a folder")
    problem = check_output_root([f"paths.root={afile}"])
    assert problem and "is a file, not a folder" in problem and "\n" not in problem
    assert check_output_root([f"paths.root={afile / 'sub'}"])  # a parent that is a file
    assert check_output_root([f"paths.root={tmp_path / 'new'}"]) is None
    line = one_error_line(capsys, run_cli(data_dir, afile))  # in-process: no Hydra run folder
    assert "is a file, not a folder" in line


def test_output_root_that_is_a_file_through_the_cli(tmp_path: Path) -> None:
    afile = tmp_path / "results"
    afile.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "recomp_eval", f"paths.root={afile}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is a file, not a folder" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["method=recomb"], ["unknown method 'recomb'", "did you mean 'recomp'"]),
        (["benchmark=gqaa"], ["unknown benchmark 'gqaa'", "did you mean 'gqa'"]),
        (["-m", "method=recomp,fastvv"], ["unknown method 'fastvv'", "'fastv'"]),
        (["runner.batchsize=2"], ["unknown key 'runner.batchsize'", "'batch_size'"]),
        (["retentoin=0.1"], ["unknown config key 'retentoin'", "'retention'"]),
        (["method=recomp", "method.txt_weight=0"], ["'method.txt_weight'", "'text_weight'"]),
    ],
)
def test_unknown_names_get_a_did_you_mean(argv: list[str], needles: list[str]) -> None:
    problem = check_overrides(argv)
    assert problem and "\n" not in problem
    for needle in needles:
        assert needle in problem
    assert not re.search(r"(?<!\w)_base", problem)  # internal files are not options


@pytest.mark.parametrize(
    "argv",
    [["method=recomp", "method.text_weight=0"], ["benchmark=pope", "benchmark.data_dir=x"],
     ["-m", "method=recomp,fastv", "retention=0.1,0.2"], ["+runner.extra=1"],
     ["hydra.job.chdir=true"], ["experiment=synth_demo", "benchmark.limit=5"],
     ["method=choice(recomp,fastv)"], ["paths.root=/tmp/x", "runs=[{method: none}]"]],
)  # fmt: skip
def test_valid_overrides_pass_the_check(argv: list[str]) -> None:
    assert check_overrides(argv) is None


def test_unknown_group_through_the_cli_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "recomp_eval", "benchmark=gqaa",
                           f"paths.root={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "did you mean 'gqa'" in proc.stderr and "_base" not in proc.stderr


# --- bad checkpoints ------------------------------------------------------------------------


def tiny_copy(dest: Path) -> Path:
    from recomp_eval.models.llava.tiny import build_tiny

    shutil.copytree(build_tiny(), dest)
    return dest


@pytest.mark.parametrize("damage", ["truncated", "bad_json", "empty", "no_weights"])
def test_bad_checkpoint_is_one_line(damage: str, data_dir: Path, tmp_path: Path, capsys) -> None:
    folder = tiny_copy(tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    if damage == "truncated":
        with open(weights, "r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    elif damage == "bad_json":
        (folder / "config.json").write_text("{bad json")
    elif damage == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    else:
        weights.unlink()
    line = one_error_line(capsys, run_cli(data_dir, tmp_path / "out", f"model.id={folder}"))
    assert str(folder) in line and "huggingface-cli download" not in line


# --- while running ----------------------------------------------------------------------------


def test_disk_full_is_one_line_and_keeps_finished_batches(
    data_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import recomp_eval.runner as runner

    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > 1:  # the first batch is stored, the second finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(runner.os, "fsync", fsync)
    line = one_error_line(capsys, run_cli(data_dir, tmp_path, "runner.batch_size=2"))
    assert "no space left on the device writing" in line and "samples.jsonl" in line
    assert "rerun the same command to resume" in line
    monkeypatch.setattr(runner.os, "fsync", real_fsync)
    (store,) = tmp_path.rglob("samples.jsonl")
    assert store.read_text().count("\n") >= 2  # the stored batch survived
    assert cli.run(composed("benchmark=pope", f"benchmark.data_dir={data_dir}",
                            f"paths.root={tmp_path}", "runner.max_new_tokens=3",
                            "runner.batch_size=2")) == 0  # fmt: skip


def test_ctrl_c_says_what_is_saved_and_how_to_resume(data_dir: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "recomp_eval", "benchmark=pope", f"benchmark.data_dir={data_dir}",
            f"paths.root={tmp_path}", "runner.batch_size=1", "runner.max_new_tokens=256",
            "method=pool"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.rglob("samples.jsonl"))
        if found and found[0].read_text().count("\n") >= 1:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be interrupted")
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("recomp-eval:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "samples of pool are saved in" in lines[0]
    assert "rerun the same command to resume" in lines[0]


def test_template_without_the_image_part_stops_before_any_vision_work(
    data_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from recomp_eval.models.llava.adapter import LlavaAdapter

    folder = tiny_copy(tmp_path / "ckpt")
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    # a template that only knows plain-string content: structured parts render as a list repr
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"
    )
    monkeypatch.setattr(LlavaAdapter, "tower_pass", lambda *a, **k: pytest.fail("vision work ran"))
    status = run_cli(data_dir, tmp_path / "out", f"model.id={folder}", "protocol=lmms_eval")
    line = one_error_line(capsys, status)
    assert "protocol=lmms_eval renders 0 '<image>' placeholders" in line
    assert "protocol=llava15" in line  # the way out


def test_fastv_deeper_than_the_llm_stops_before_any_vision_work(
    data_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from recomp_eval.models.llava.adapter import LlavaAdapter

    monkeypatch.setattr(LlavaAdapter, "tower_pass", lambda *a, **k: pytest.fail("vision work ran"))
    status = run_cli(data_dir, tmp_path, "method=fastv", "method.k_layer=3")  # tiny LLM: 3 layers
    line = one_error_line(capsys, status)
    assert "k_layer=3 is at or beyond the LLM's depth (3 decoder layers)" in line
