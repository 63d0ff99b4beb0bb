"""``--model_args`` of the lmms-eval plugin, checked by the same code as the Hydra path.

Pure (no lmms-eval import), so the checks are testable without it. Keys: ``pretrained`` (hub id
or folder, required), ``method`` (default ``none``), ``retention``, ``dtype``, ``device``,
``attn_implementation``, ``clip_text_id``, ``family``, ``requests_file`` (per-request kept
tokens and stage times; ``none`` for no file); every other key is an option of the method
(``variant=paper``, ``k_layer=3``), validated by the method itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# lmms-eval's llava_hf wrapper: max_new_tokens when a task's generation_kwargs set none
DEFAULT_MAX_NEW_TOKENS = 1024
MODEL_KEYS = ("pretrained", "dtype", "device", "attn_implementation", "clip_text_id", "family")


@dataclass
class PluginArgs:
    """The checkpoint and the compression run of one plugin instance."""

    model: dict[str, Any]
    method: str
    retention: float | None
    options: dict[str, Any] = field(default_factory=dict)
    requests: str | None = None  # requests_file=: where per-request figures go ("none": nowhere)

    def build(self) -> Any:
        from recomp_eval.methods import build_method

        return build_method(self.method, retention=self.retention, **self.options)

    def model_config(self, rank: int = 0) -> dict[str, Any]:
        """The ``model`` config :func:`recomp_eval.models.load_model` takes (``cuda:rank``
        under accelerate launch with several processes)."""
        cfg = dict(self.model)
        if rank and str(cfg["device"]) == "cuda":
            cfg["device"] = f"cuda:{rank}"
        return cfg

    def requests_file(self) -> Path | None:
        """``requests_file`` (default ``results/lmms/requests-<settings hash>.jsonl``)."""
        if self.requests == "none":
            return None
        if self.requests:
            return Path(self.requests)
        digest = hashlib.sha1(self.identity().encode()).hexdigest()[:12]
        return Path("results") / "lmms" / f"requests-{digest}.jsonl"

    def identity(self) -> str:
        """Every setting that changes answers, as stable JSON."""
        return json.dumps({"model": {k: v for k, v in self.model.items() if k != "device"},
                           "method": self.method, "retention": self.retention,
                           "options": self.options}, sort_keys=True, default=str)  # fmt: skip


def _none(value: Any) -> Any:
    return None if isinstance(value, str) and value.lower() in ("none", "null", "") else value


def parse_model_args(args: dict[str, Any], device: str | None = None) -> PluginArgs:
    """Validate ``--model_args`` (already split by lmms-eval) into :class:`PluginArgs`; one-line
    ``ValueError`` for anything wrong (unknown method or option, bad retention, no checkpoint)."""
    import torch
    from omegaconf import OmegaConf

    from recomp_eval.runs import expand_runs, method_defaults

    args = {k: _none(v) for k, v in args.items()}
    requests = args.pop("requests_file", None)
    if not args.get("pretrained"):
        raise ValueError(
            "recomp_llava needs pretrained=<hub id or folder> in --model_args, e.g. "
            "pretrained=llava-hf/llava-1.5-7b-hf,method=recomp,retention=0.1"
        )
    device = str(args.pop("device", None) or device or ("cuda" if torch.cuda.is_available()
                                                         else "cpu"))  # fmt: skip
    model = {
        "id": str(args.pop("pretrained")),
        "family": args.pop("family", None) or "llava",
        "dtype": str(
            args.pop("dtype", None) or ("float16" if device.startswith("cuda") else "float32")
        ),
        "device": device,
        "attn_implementation": str(args.pop("attn_implementation", None) or "sdpa"),
        "clip_text_id": args.pop("clip_text_id", None),
    }
    name = str(args.pop("method", None) or "none")
    retention = args.pop("retention", None)
    if isinstance(retention, (int, str)) and not isinstance(retention, bool):
        try:
            retention = float(retention)
        except ValueError:
            raise ValueError(
                f"retention={retention}: a number in (0, 1] or null (the method's adaptive budget)"
            ) from None
    cfg = OmegaConf.create({
        "method": {"name": name, **method_defaults(name)},
        "retention": None,
        "runs": [{"method": name, "retention": retention, "options": args}],
    })  # fmt: skip
    (spec,) = expand_runs(cfg)  # the Hydra path: YAML defaults, then these options
    plugin = PluginArgs(model, spec.method, spec.retention, dict(spec.options),
                        None if requests is None else str(requests))  # fmt: skip
    plugin.build()  # unknown options and bad budgets fail here, before the model loads
    return plugin
