"""Where the Hydra configs live: ``configs/`` of the source checkout (editable install)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
