"""Shared test setup: offline flags, deterministic seeds, GPU skip helper, script loader."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def scripts_module(name: str) -> ModuleType:
    """``scripts/<name>.py`` as the module ``name``: the one way tests import a script.

    Loaded by path and registered in ``sys.modules`` under its own name (once; later calls return
    that module), with ``scripts/`` first on ``sys.path`` only while it executes, as
    ``python scripts/<name>.py`` would have it, so that its top-level imports of sibling scripts
    (``import train_tiny_common``) resolve to the sibling files and are registered the same way.
    The test session's ``sys.path`` is left as it was.
    """
    path = SCRIPTS / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    if not path.is_file():
        raise ImportError(f"scripts_module: no script {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
