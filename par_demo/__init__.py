"""par-demo: PAR (Pruning All-Rounder) joint visual-token and layer pruning for vision-language models, with real
speed-ups.

    import par_demo

    pruner = par_demo.load()  # or par_demo.wrap(model, processor) for a model you loaded with transformers
    result = pruner.generate("assets/examples/shapes_where.png", "Where is the blue square?", budget=0.5)

The names in `__all__` are the public API (defined in `par_demo.api` and the modules named below); everything
else is importable but may change. They are imported on first use, so `import par_demo.errors` (the app's input
checks, the CLI's help) does not load torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load": "par_demo.api", "wrap": "par_demo.api", "Pruner": "par_demo.api", "MethodInfo": "par_demo.api",
    "Prediction": "par_demo.predict", "AllMethods": "par_demo.comparison", "METHODS": "par_demo.methods",
    "UserError": "par_demo.errors", "BudgetOutOfReach": "par_demo.errors",
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'par_demo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
