"""lmms-eval integration: `--model par_demo` (any pruning method of this project) and the ShapesVQA task.

lmms-eval (0.7+) builds its model registry from its own models plus the Python entry points of the group
`lmms_eval.models`; pyproject.toml registers `par_demo = "par_demo.lmms:manifest"` there, so an installed
par-demo is evaluated with no fork of lmms-eval and nothing patched:

    lmms-eval --model par_demo --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=par,budget=0.5 --tasks pope

Nothing here imports lmms-eval until lmms-eval itself asks for the model, so the app never needs it.
"""

from __future__ import annotations

MODEL_ID = "par_demo"
MODEL_CLASS = "par_demo.lmms.model.ParDemo"


def manifest():
    """The entry point lmms-eval calls: where the `par_demo` model class lives (a "simple" model: prompt text
    and the document's images in, text out)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
