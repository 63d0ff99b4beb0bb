"""Where the Hydra configs live: ``configs/`` of the source checkout (editable install)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    from recomp_eval.shards import rank_suffix

    # `${rank_suffix:}` in configs/hydra/default.yaml: each torchrun rank its own Hydra folder
    OmegaConf.register_new_resolver("rank_suffix", rank_suffix, replace=True)


_register_resolvers()
