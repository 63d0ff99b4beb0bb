"""lmms-eval model plugin: ``python -m lmms_eval --model recomp_llava --model_args ...``.

lmms-eval finds it through the ``lmms_eval.models`` entry point (``pyproject.toml``), which calls
:func:`manifests`. Importing ``recomp_eval`` (or this package) never imports lmms-eval: that
import reconfigures the global loguru logger and torch.distributed's default timeout. Only
lmms-eval itself imports :mod:`recomp_eval.lmms_plugin.model`, the model class.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "recomp_llava"
CLASS_PATH = "recomp_eval.lmms_plugin.model.RecompLlava"


def manifests() -> Any:
    """The entry point's value: the manifest of our simple (non-chat) model class."""
    from lmms_eval.models.registry_v2 import ModelManifest  # loaded by lmms-eval, at its import

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
