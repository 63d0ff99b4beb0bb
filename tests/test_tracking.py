"""wandb in offline mode writes its run files; finish runs even when the job fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recomp_eval import keepmap
from recomp_eval.methods.base import Role
from recomp_eval.tracking import NullTracker, make_tracker, resolve_mode


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


def test_wandb_offline_writes_run_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
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


def test_mode_and_null_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert isinstance(make_tracker({"name": "none"}), NullTracker)
    with pytest.raises(ValueError, match="unknown logger"):
        make_tracker({"name": "mlflow"})
