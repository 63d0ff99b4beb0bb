"""Command-line entry points: ``recomp-eval`` (Hydra app) and ``python -m recomp_eval``.

Every failure a user can fix ends in one line on stderr, ``recomp-eval: error: <problem>;
<fix>`` with exit status 2 (the traceback only with ``HYDRA_FULL_ERROR=1``); Ctrl-C says what is
saved and exits with 130. Config names on the command line are checked before Hydra composes
(unknown group options and keys get a did-you-mean).
"""

from __future__ import annotations

import errno
import logging
import os
import sys

# Offline by default: hub look-ups fail fast instead of retrying for ~20 s each. Set
# HF_HUB_OFFLINE=0 on a connected machine to download.
for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_flag, "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from recomp_eval.cli_checks import check_output_root, check_overrides  # noqa: E402
from recomp_eval.config_path import CONFIG_DIR  # noqa: E402

log = logging.getLogger("recomp_eval")
# the headline of each record this process built: shown by every torchrun rank (the last shard
# of a run to finish builds it), while ranks other than 0 otherwise log warnings only
result_log = logging.getLogger("recomp_eval.result")
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, RuntimeError)
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}


def error_line(err: BaseException) -> str | None:
    """The one line for an error a user can fix, or None for a bug (keep the traceback)."""
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        where = f" writing {err.filename}" if err.filename else ""
        return (
            f"{DISK_ERRNOS[err.errno]}{where}; free some space or point paths.root at another "
            f"disk, then rerun the same command to resume (every finished batch is kept)"
        )
    if isinstance(err, PermissionError):
        return f"permission denied: {err.filename}; choose a writable paths.root or fix its rights"
    if isinstance(err, (IsADirectoryError, NotADirectoryError)):
        return f"{err.strerror}: {err.filename}; check paths.root and the data/model paths"
    if isinstance(err, USER_ERRORS):
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        return " ".join(text.split())  # one line, whatever the message held
    return None


def quiet_other_ranks() -> None:
    """Under torchrun / accelerate, ranks other than 0 log warnings only (rank 0 speaks)."""
    if os.environ.get("RANK", "0") not in ("", "0") and "WORLD_SIZE" in os.environ:
        log.setLevel(logging.WARNING)
        result_log.setLevel(logging.INFO)


def run(cfg: DictConfig) -> int:
    """Evaluate ``cfg``; returns the exit status (errors become one line on stderr)."""
    from recomp_eval.evaluate import evaluate

    quiet_other_ranks()
    try:
        records = evaluate(cfg)
    except KeyboardInterrupt as err:
        detail = str(err) or "interrupted; rerun the same command to resume"
        print(f"recomp-eval: {detail}", file=sys.stderr)
        return 130
    except Exception as err:
        line = error_line(err)
        if line is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"recomp-eval: error: {line}", file=sys.stderr)
        return 2
    for record in records:
        headline = record.metrics.get(record.primary_metric, float("nan"))
        result_log.info(
            "%s %s retention=%s: %s=%.4f on %d samples, kept tokens %.1f, prefill %.3g TFLOPs",
            record.benchmark["name"],
            record.method["label"],
            record.method["retention"],
            record.primary_metric,
            headline,
            record.samples["evaluated"],
            record.tokens["mean"],
            record.flops["prefill_tflops"],
        )
    return 0


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="eval")
def _app(cfg: DictConfig) -> None:
    status = run(cfg)
    if status:
        sys.exit(status)


def main() -> None:
    problem = check_overrides(sys.argv[1:]) or check_output_root(sys.argv[1:])
    if problem:
        print(f"recomp-eval: error: {problem}", file=sys.stderr)
        sys.exit(2)
    _app()


if __name__ == "__main__":
    main()
