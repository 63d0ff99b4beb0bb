"""Check command-line overrides against the config tree before Hydra composes.

Hydra reports an unknown group option as a multi-line list that includes internal files
(``benchmark/_base``) and an unknown key as a struct error; users get one line with a
did-you-mean instead. Only what can be checked from the YAML files is checked here (group
options, first-level keys of a group and top-level keys); Hydra still validates the rest.
"""

from __future__ import annotations

import difflib
import re
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from recomp_eval.config_path import CONFIG_DIR

OVERRIDE = re.compile(r"^(?P<op>\+\+|\+|~)?(?P<key>[A-Za-z_][\w.]*)(=(?P<value>.*))?$")
# protocol keys the model family reads from the protocol *file* (conversation and image handling)
FAMILY_READ_PROTOCOL_KEYS = ("conversation", "system_prompt", "image_mode", "pad_color")
SWEEP_SYNTAX = re.compile(r"^\w+\(")  # choice(...), range(...), glob(...), interval(...)


def groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("."))


def options(group: str) -> list[str]:
    """The selectable files of a group (internal ``_*.yaml`` files are not options)."""
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


@cache
def _keys_of(path: Path) -> frozenset[str]:
    """First-level keys of a group file, with the group-local files its defaults list names."""
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    keys = set(cfg) if isinstance(cfg, dict) else set()
    for entry in cfg.get("defaults", []) if isinstance(cfg, dict) else []:
        if (
            isinstance(entry, str)
            and entry != "_self_"
            and (path.parent / f"{entry}.yaml").exists()
        ):
            keys |= _keys_of(path.parent / f"{entry}.yaml")
    keys.discard("defaults")
    return frozenset(keys)


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _default_choice(group: str) -> str | None:
    main = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "eval.yaml"), resolve=False)
    for entry in main.get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.replace("optional ", "") == group:
                    return None if value is None else str(value)
    return None


def check_overrides(argv: list[str]) -> str | None:
    """The first problem among ``argv``'s overrides as one line, or None."""
    known_groups = groups()
    top_keys = sorted(_keys_of(CONFIG_DIR / "eval.yaml") | set(known_groups) | {"hydra"})
    chosen: dict[str, list[str]] = {}
    parsed = []
    for arg in argv:
        if arg.startswith("-"):
            continue  # hydra flags (-m, --multirun, --cfg ...)
        match = OVERRIDE.match(arg)
        if not match or match["value"] is None:
            continue
        parsed.append(match)
        key, value = match["key"], match["value"]
        if key in known_groups and not SWEEP_SYNTAX.match(value) and value not in ("null", ""):
            values = [v.strip() for v in value.split(",")]
            allowed = options(key)
            for v in values:
                if v not in allowed:
                    return (
                        f"unknown {key} '{v}'{_did_you_mean(v, allowed)}; choose one of: "
                        f"{', '.join(allowed)}"
                    )
            chosen[key] = values
    for match in parsed:
        if match["op"] in ("+", "++"):
            continue  # adding keys is allowed
        head, _, rest = match["key"].partition(".")
        if head == "hydra" or head.startswith("local"):
            continue
        if head not in top_keys:
            return (
                f"unknown config key '{head}'{_did_you_mean(head, top_keys)}; top-level keys: "
                f"{', '.join(k for k in top_keys if k != 'hydra')}"
            )
        if head == "protocol" and rest.split(".")[0] in FAMILY_READ_PROTOCOL_KEYS:
            return (
                f"protocol.{rest.split('.')[0]} is read from the protocol file by the model "
                f"family; add a protocol file (configs/protocol/<name>.yaml, then "
                f"protocol=<name>) instead of overriding it"
            )
        if not rest or head not in known_groups or head == "experiment":
            continue
        first = rest.split(".")[0]
        names = chosen.get(head) or [_default_choice(head)]
        files = [CONFIG_DIR / head / f"{n}.yaml" for n in names if n]
        keys = sorted(set().union(*(_keys_of(f) for f in files if f.exists())))
        if keys and first not in keys:
            return (
                f"unknown key '{head}.{first}'{_did_you_mean(first, keys)}; keys of {head}: "
                f"{', '.join(k for k in keys if not k.startswith('_'))} (to add a key on "
                f"purpose: +{match['key']}=...)"
            )
    return None


def check_output_root(argv: list[str]) -> str | None:
    """``paths.root`` (from ``argv``, ``RECOMP_EVAL_RESULTS`` or the default) must be a folder:
    Hydra creates its run folder there before any of our code runs."""
    import os

    root = os.environ.get("RECOMP_EVAL_RESULTS", "results")
    for arg in argv:
        match = OVERRIDE.match(arg)
        if match and match["key"] == "paths.root" and match["value"]:
            root = match["value"]
    path = Path(root).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                return (
                    f"paths.root={root}: {candidate} is a file, not a folder; point paths.root "
                    f"at a folder (it is created when missing)"
                )
            break
    return None
