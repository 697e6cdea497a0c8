"""ShapesVQA in lmms-eval: the documents are the lines of a JSONL file in the format of `python -m par_demo eval`
(as `make-shapes` writes it), read and scored by the same code, so the harness and `eval` report the same accuracy.

lmms-eval loads this file by its path (the `!function utils.<name>` lines of shapesvqa.yaml), so it imports
only absolute names.
"""

from par_demo.images import load_image
from par_demo.shapes import QUESTION_TYPES, image_path, is_correct


def doc_to_visual(doc, lmms_eval_specific_kwargs):
    # Image paths in the JSONL are relative to its folder, which the task file names (`data_dir`).
    return [load_image(image_path(lmms_eval_specific_kwargs["data_dir"], doc["image"]))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]  # the bare question, as `eval` asks it: the model's chat template does the rest


def process_results(doc, results):
    """Exact match after normalisation (`is_correct`), overall and for the document's question type."""
    hit = float(is_correct(results[0], doc["answer"]))
    scores = {"accuracy": hit}
    if doc.get("type") in QUESTION_TYPES:
        scores[f"accuracy_{doc['type']}"] = hit
    return scores
