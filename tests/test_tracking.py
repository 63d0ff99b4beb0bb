"""wandb in offline mode writes its run files; finish runs even when the job fails.

The offline run folder is read back: media under ``files/media/images/``, the samples table under
``files/media/table/``, and config, tags and summary from the ``run-<id>.wandb`` transaction log
(a LevelDB-style log of ``wandb_internal_pb2.Record`` protobufs).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from recomp_eval import keepmap
from recomp_eval.methods.base import Role
from recomp_eval.tracking import NullTracker, make_tracker, resolve_mode

WANDB = {"name": "wandb", "project": "t"}
LOG_BLOCK = 32768  # LevelDB log block size used by the .wandb transaction log
LOG_HEADER = 7  # file header (":W&B", magic, version) and chunk header (crc, length, kind) bytes
FULL, LAST = 1, 4  # chunk kinds that end a record


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, silent, and wandb's artifact staging / cache / config kept under ``tmp_path``."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, folder in (
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / folder))


def _records(path: Path) -> list[Any]:
    """Protobuf records of a ``.wandb`` transaction log."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, pending, pos = [], b"", LOG_HEADER
    while pos + LOG_HEADER <= len(data):
        left = LOG_BLOCK - pos % LOG_BLOCK
        if left < LOG_HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + LOG_HEADER])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        pending += data[pos + LOG_HEADER : pos + LOG_HEADER + length]
        pos += LOG_HEADER + length
        if kind in (FULL, LAST):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def _run_info(run_dir: Path) -> dict[str, Any]:
    """Name, config, tags and summary of one offline run, folded over its records."""
    (log_file,) = run_dir.glob("run-*.wandb")
    info: dict[str, Any] = {"name": None, "config": {}, "tags": [], "summary": {}, "exit": False}
    for record in _records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info["name"] = record.run.display_name
            info["tags"] = list(record.run.tags)
            info["config"].update(
                {i.key: json.loads(i.value_json) for i in record.run.config.update}
            )
        elif kind == "config":
            info["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            info["summary"].update(
                {i.key: json.loads(i.value_json) for i in record.summary.update if i.key}
            )
        elif kind == "exit":
            info["exit"] = True
    info["config"].pop("_wandb", None)
    return info


def _figure_size(fig: Any, dpi: int) -> tuple[int, int]:
    width, height = fig.get_size_inches() * dpi
    return round(width), round(height)


def test_keep_map_codes_roles() -> None:
    n = 9
    role = torch.tensor([Role.ATTENTION, Role.TEXT, Role.MERGED, Role.SUMMARY], dtype=torch.int8)
    source = torch.tensor([0, 4, 8, -1])
    members = torch.zeros(4, n, dtype=torch.bool)
    members[0, 0] = members[1, 4] = True
    members[2, [8, 7, 6]] = True
    members[3, [1, 2, 3, 5, 6, 7]] = True
    codes = keepmap.keep_map(role, source, members)
    assert codes.tolist() == [2, 6, 6, 6, 3, 6, 5, 5, 4]
    assert keepmap.decode(keepmap.encode(codes)).tolist() == codes.tolist()


@pytest.mark.usefixtures("wandb_env")
def test_wandb_offline_writes_run_files(tmp_path: Path) -> None:
    image = Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8))
    fig = keepmap.render(np.arange(9, dtype=np.uint8) % 7, (3, 3), image=image, title="x")
    with (
        pytest.raises(RuntimeError, match="job failed"),
        make_tracker(
            {"name": "wandb", "project": "t"}, name="fail", config={}, output_dir=tmp_path / "a"
        ),
    ):
        raise RuntimeError("job failed")
    tracker = make_tracker(
        {"name": "wandb", "project": "t"},
        name="ok",
        config={"retention": 0.1},
        output_dir=tmp_path / "b",
    )
    with tracker:
        tracker.log_metrics({"gqa/accuracy": 0.5})
        tracker.log_samples(
            [
                {
                    "image": image,
                    "question": "q",
                    "prediction": "p",
                    "kept_tokens": 58,
                    "keep_map": fig,
                }
            ]
        )
    runs = list((tmp_path / "b" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no .wandb log file written"
    assert list((tmp_path / "a" / "wandb").glob("offline-run-*")), "failed job left no run"


@pytest.mark.usefixtures("wandb_env")
def test_wandb_samples_table_writes_media_files(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    images = [
        Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8)),
        Image.fromarray(np.full((24, 48, 3), 30, dtype=np.uint8)),  # 48 wide, 24 high
    ]
    figs = [
        keepmap.render(np.arange(9, dtype=np.uint8) % 7, (3, 3), image=image, title=str(i))
        for i, image in enumerate(images)
    ]
    tracker = make_tracker(WANDB, name="media", config={}, output_dir=tmp_path / "run")
    with tracker:
        tracker.log_samples(
            [
                {
                    "sample_id": f"s{i}",
                    "image": image,
                    "question": "q",
                    "answers": ["a", "b"],
                    "kept_tokens": 58.0,
                    "keep_map": fig,
                }
                for i, (image, fig) in enumerate(zip(images, figs, strict=True))
            ]
        )
    assert all(plt.fignum_exists(fig.number) for fig in figs), "the caller closes the figures"

    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    files = run / "files"
    media = sorted((files / "media" / "images").rglob("*.png"))
    assert len(media) == 4, f"expected 2 images + 2 keep maps, found {media}"
    (table_file,) = (files / "media" / "table").glob("samples_*.table.json")
    table = json.loads(table_file.read_text())
    columns = table["columns"]
    assert columns == ["sample_id", "image", "question", "answers", "kept_tokens", "keep_map"]
    assert all(cell != "Image" for row in table["data"] for cell in row)
    cells = [row[columns.index(col)] for row in table["data"] for col in ("image", "keep_map")]
    dpi = tracker.figure_dpi
    sizes = [images[0].size, _figure_size(figs[0], dpi), images[1].size, _figure_size(figs[1], dpi)]
    for cell, size in zip(cells, sizes, strict=True):
        assert cell["_type"] == "image-file"
        assert (cell["width"], cell["height"]) == size
        with Image.open(files / cell["path"]) as decoded:
            assert decoded.size == size
    assert sorted(files / cell["path"] for cell in cells) == media
    assert [row[columns.index("answers")] for row in table["data"]] == ["['a', 'b']"] * 2
    for fig in figs:
        plt.close(fig)


@pytest.mark.usefixtures("wandb_env")
def test_wandb_figures_render_at_figure_dpi(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = keepmap.render(np.arange(4, dtype=np.uint8), (2, 2))
    tracker = make_tracker(WANDB, name="dpi", config={}, output_dir=tmp_path / "run", figure_dpi=40)
    with tracker:
        tracker.log_samples([{"image": None, "keep_map": fig}])
    (table_file,) = (tmp_path / "run").glob("wandb/offline-run-*/files/media/table/*.table.json")
    ((image, keep_map),) = json.loads(table_file.read_text())["data"]
    assert image is None
    with Image.open(table_file.parents[2] / keep_map["path"]) as decoded:
        assert decoded.size == _figure_size(fig, 40)
    plt.close(fig)


@pytest.mark.usefixtures("wandb_env")
def test_wandb_trackers_make_separate_runs_with_run_key(tmp_path: Path) -> None:
    import wandb

    first = make_tracker(
        WANDB, name="a", config={"method": "a"}, output_dir=tmp_path, run_key="key-a"
    )
    with first:
        first.log_metrics({"gqa/accuracy": 0.5})
    second = make_tracker(WANDB, name="b", config={"method": "b"}, output_dir=tmp_path, tags=["x"])
    with second:
        second.set_config({"retention": 0.25})
        second.set_run_key("key-b")  # known only once the job has run
    wandb.teardown()  # flush the transaction logs before reading them

    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    info = {item["name"]: item for item in map(_run_info, runs)}
    assert set(info) == {"a", "b"}
    assert all(item["exit"] for item in info.values())
    assert info["a"]["config"] == {"method": "a", "run_key": "key-a"}
    assert info["b"]["config"] == {"method": "b", "retention": 0.25, "run_key": "key-b"}
    assert info["a"]["tags"] == ["run_key:key-a"]
    assert info["b"]["tags"] == ["x", "run_key:key-b"]
    assert info["a"]["summary"]["run_key"] == "key-a"
    assert info["a"]["summary"]["gqa/accuracy"] == 0.5
    assert info["b"]["summary"]["run_key"] == "key-b"
    assert "gqa/accuracy" not in info["b"]["summary"]


def test_mode_and_null_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    null = make_tracker({"name": "none"})
    assert isinstance(null, NullTracker)
    null.set_config({"a": 1})
    null.set_run_key("k")
    with pytest.raises(ValueError, match="unknown logger"):
        make_tracker({"name": "mlflow"})
