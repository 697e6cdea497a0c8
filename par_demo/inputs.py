"""Checks of what a visitor or an API caller sends: each returns a clean value or raises `UserError` with one line.

Also the names the page uses for the methods: the list is derived from the method registry, so a method added
there appears on the page (under its own name until it is given a label here).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

import numpy as np
from PIL import Image

from par_demo import images
from par_demo.errors import UserError
from par_demo.methods import METHODS, REGISTRY
from par_demo.models import MAX_QUESTION_CHARS  # the engine's limit, so a clipped question gets one notice

# Display names; a method without one here is shown under its registry name.
_LABELS = {
    "full": "full model", "par": "PAR", "fastv": "FastV", "random": "random tokens", "layerdrop": "layer drop",
    "par-tokens": "PAR tokens only", "par-layers": "PAR layers only", "par-prior": "PAR with prior scores",
    "par-drop": "PAR without absorbing", "cdpruner-absorb": "CDPruner + absorbing",
    "visionzip": "VisionZip", "divprune": "DivPrune", "cdpruner": "CDPruner", "downsample": "downsample (pooled)",
}
# (label shown in the UI, method name of the engine), in registry order. "full" is the reference, never a choice.
METHOD_CHOICES: list[tuple[str, str]] = [(_LABELS.get(name, name), name) for name in METHODS if name != "full"]
METHOD_LABELS = {name: _LABELS.get(name, name) for name in METHODS}
# The groups of methods that "compare all" runs only when asked (each method's `extra`), and how the page names them.
_EXTRA_LABELS = {"baseline": "simple baselines", "ablation": "PAR's ablations"}
EXTRA_GROUPS: dict[str, list[str]] = {
    group: [n for n in METHODS if REGISTRY[n].extra == group] for group in _EXTRA_LABELS}
EXTRA_CHOICES: list[tuple[str, str]] = [
    (f"{_EXTRA_LABELS[group]} ({', '.join(METHOD_LABELS[n] for n in names)})", group)
    for group, names in EXTRA_GROUPS.items()]

MAX_SIDE = 2048  # larger images are downscaled: the model sees a few hundred pixels per side anyway
MIN_SIDE = 16  # smaller images are upscaled: image processors cannot tell channels from 1x1 pixels
assert MAX_SIDE / images.MAX_ASPECT >= MIN_SIDE  # a shrunk image never falls below MIN_SIDE again


def load_image(source: Any) -> Image.Image:
    """Decode an upload (file path, PIL image or numpy array) into an RGB PIL image the model can take.

    Decoding and its safety checks (size limits, EXIF orientation, first frame, transparency) are the engine's
    `par_demo.images.load_image`; here only what the app adds: numpy input, a friendlier "no image" message,
    and a size range the image processor handles well.
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        raise UserError("Please upload an image (or pick one of the examples).")
    if isinstance(source, np.ndarray):
        source = _array_to_image(source)
    image = images.load_image(source)  # sides at most `images.MAX_ASPECT` apart
    if min(image.size) < MIN_SIDE:  # image processors cannot tell channels from pixels in a 1x1 array
        scale = math.ceil(MIN_SIDE / min(image.size))
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    # enlarged first, then shrunk: the long side ends within MAX_SIDE, and the short one (MAX_SIDE / MAX_ASPECT
    # at the least) stays above MIN_SIDE
    if max(image.size) > MAX_SIDE:  # the model sees a few hundred pixels per side; resizing early is cheaper
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return image


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim not in (2, 3) or array.size == 0:
        raise UserError("The image array must be 2-D (gray) or 3-D (height, width, channels).")
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def check_question(question: Any) -> tuple[str, str | None]:
    """The cleaned question and, if it had to be shortened, a notice for the user."""
    if not isinstance(question, str):
        raise UserError("The question must be text.")
    text = unicodedata.normalize("NFC", _CONTROL.sub(" ", question))
    text = " ".join(text.split())
    if not text:
        raise UserError("Please type a question about the image.")
    if len(text) > MAX_QUESTION_CHARS:
        return text[:MAX_QUESTION_CHARS], f"The question was shortened to its first {MAX_QUESTION_CHARS} characters."
    return text, None


def _method_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def check_method(method: Any, available: dict[str, str | None] | None = None) -> str:
    """Accepts an engine name ("par", "layerdrop") or a UI label ("PAR", "layer drop"); returns the engine name."""
    if not isinstance(method, str):
        raise UserError("The method must be one of: " + ", ".join(v for _, v in METHOD_CHOICES) + ".")
    lookup = {_method_key(v): v for v in METHOD_LABELS} | {_method_key(label): v for label, v in METHOD_CHOICES}
    name = lookup.get(_method_key(method))
    if name is None:
        raise UserError(f"Unknown method {method[:40]!r}; choose one of: "
                        + ", ".join(v for _, v in METHOD_CHOICES) + ".")
    reason = (available or {}).get(name)
    if reason:
        raise UserError(f"{METHOD_LABELS[name]} is not available: {reason}")
    return name


def check_extras(extras: Any) -> tuple[str, ...]:
    """Which groups of extra methods to add to "compare all": none, or any of `EXTRA_GROUPS` (a list, or one name
    or a comma-separated string from an API caller)."""
    if extras is None or extras is False:
        return ()
    items = extras.split(",") if isinstance(extras, str) else extras
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise UserError("Extra methods must be a list of: " + ", ".join(EXTRA_GROUPS) + ".")
    groups = tuple(dict.fromkeys(item.strip().lower() for item in items if item.strip()))
    unknown = [g for g in groups if g not in EXTRA_GROUPS]
    if unknown:
        raise UserError(f"Unknown extra methods {unknown[0][:40]!r}; choose from: " + ", ".join(EXTRA_GROUPS) + ".")
    return groups


def check_budget(budget: Any) -> float:
    """A FLOPs budget: a number in (0, 1], the fraction of the full model's prefill FLOPs."""
    if isinstance(budget, bool) or budget is None:
        raise UserError("The budget must be a number between 0 and 1, e.g. 0.5.")
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise UserError("The budget must be a number between 0 and 1, e.g. 0.5.") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise UserError(f"The budget must be greater than 0 and at most 1 (got {budget!r}).")
    return value


def check_count(value: Any, name: str, low: int, high: int, zero_means_auto: bool = True) -> int | None:
    """An optional integer setting; None (or 0 when zero_means_auto) means "derive it from the budget"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise UserError(f"{name} must be a whole number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number.") from None
    if not math.isfinite(number) or number != int(number):
        raise UserError(f"{name} must be a whole number (got {value!r}).")
    count = int(number)
    if count == 0 and zero_means_auto:
        return None
    if not low <= count <= high:
        raise UserError(f"{name} must be between {low} and {high} (got {count}).")
    return count
