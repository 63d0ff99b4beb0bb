"""Every config group composes and instantiates (Hydra compose API, no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recomp_eval.config_path import CONFIG_DIR
from recomp_eval.evaluate import build_benchmark, expand_runs
from recomp_eval.methods import METHODS, build_method


def group(name: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / name).glob("*.yaml") if not p.stem.startswith("_"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="eval", overrides=list(overrides))


def test_method_configs_mirror_the_registry() -> None:
    assert set(group("method")) == set(METHODS)
    for name in group("method"):
        cfg = composed(f"method={name}")
        for spec in expand_runs(cfg):
            built = build_method(spec.method, retention=spec.retention, **spec.options)
            assert built.name == name


@pytest.mark.parametrize("bench", group("benchmark"))
@pytest.mark.parametrize("protocol", group("protocol"))
def test_benchmark_and_protocol_compose(bench: str, protocol: str, tmp_path: Path) -> None:
    cfg = composed(f"benchmark={bench}", f"protocol={protocol}", f"benchmark.data_dir={tmp_path}")
    assert cfg.protocol.name == protocol
    benchmark = build_benchmark(OmegaConf.to_container(cfg.benchmark, resolve=True), limit=3)
    assert benchmark.limit == 3


@pytest.mark.parametrize("experiment", group("experiment"))
def test_experiments_expand_to_valid_runs(experiment: str) -> None:
    cfg = composed(f"experiment={experiment}")
    specs = expand_runs(cfg)
    assert specs, experiment
    for spec in specs:
        build_method(spec.method, retention=spec.retention, **spec.options)


@pytest.mark.parametrize("model", group("model"))
@pytest.mark.parametrize("logger", group("logger"))
def test_model_logger_debug_compose(model: str, logger: str) -> None:
    cfg = composed(f"model={model}", f"logger={logger}", "debug=default")
    assert cfg.limit == 4 and cfg.logger.name == logger and cfg.model.id
    assert cfg.paths.records_dir.endswith("raw")


def test_bad_retention_is_one_clear_error() -> None:
    cfg = composed("method=fastervlm", "retention=1.5")
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        expand_runs(cfg)
