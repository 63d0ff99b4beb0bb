"""Command-line entry points: ``recomp-eval`` (Hydra app) and ``python -m recomp_eval``."""

from __future__ import annotations

import logging
import os
import sys

# Offline by default: hub look-ups fail fast instead of retrying for ~20 s each. Set
# HF_HUB_OFFLINE=0 on a connected machine to download.
for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_flag, "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from recomp_eval.config_path import CONFIG_DIR  # noqa: E402

log = logging.getLogger("recomp_eval")
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, RuntimeError)


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="eval")
def _app(cfg: DictConfig) -> None:
    from recomp_eval.evaluate import evaluate

    try:
        records = evaluate(cfg)
    except USER_ERRORS as err:
        # one line naming the problem and the fix; the traceback only with HYDRA_FULL_ERROR=1
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"recomp-eval: error: {err}", file=sys.stderr)
        sys.exit(2)
    for record in records:
        headline = record.metrics.get(record.primary_metric, float("nan"))
        log.info(
            "%s %s retention=%s: %s=%.4f, kept tokens %.1f, prefill %.3g TFLOPs",
            record.benchmark["name"],
            record.method["label"],
            record.method["retention"],
            record.primary_metric,
            headline,
            record.tokens["mean"],
            record.flops["prefill_tflops"],
        )


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
