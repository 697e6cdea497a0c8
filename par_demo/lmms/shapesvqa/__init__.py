"""The ShapesVQA task for lmms-eval: `shapesvqa.yaml` and the functions it names (`utils.py`)."""
