"""The entry point (group ``lmms_eval.models``, declared in setup.cfg) through which lmms-eval finds the model
``tokenprune`` (:class:`tokenprune.eval.lmms_eval_model.TokenPrune`): no fork of lmms-eval and no patch.

lmms-eval loads this module while it builds its model registry; only then is ``lmms_eval`` imported. The rest of
tokenprune never imports it (a test checks), so lmms-eval stays an optional extra (``tokenprune-lvlm[lmms]``).
"""

from __future__ import annotations

MODEL_ID = "tokenprune"
CLASS_PATH = "tokenprune.eval.lmms_eval_model.TokenPrune"


def manifests():
    """lmms-eval's manifest for ``--model tokenprune`` (called by its registry when it reads entry points)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]
