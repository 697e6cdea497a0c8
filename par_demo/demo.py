"""Everything the Gradio app (`app.py`) calls: input checks, the cached full answer, compare, sweep, figures, stats.

`app.py` only lays out components and wires events to the handler methods of `DemoApp`. The logic here is plain
Python and testable without a browser; the only Gradio-specific pieces are the error conversion (`gr.Error`),
progress reporting and `SafeImage`, an image input whose decoding errors become clear messages.

Layers, from the bottom up:
- input checks (`load_image`, `check_question`, `check_method`, `check_budget`, ...) raise `UserError`;
- `DemoService` runs the model: full answer (LRU-cached per image, question, model), pruned answer, sweep;
- `DemoApp` turns results into the tuples of outputs the app's components expect, and every error into `gr.Error`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import math
import os
import re
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np
from PIL import Image, UnidentifiedImageError

from par_demo import images, viz
from par_demo.errors import UserError
from par_demo.models import MAX_QUESTION_CHARS  # the engine's limit, so a clipped question gets one notice

if TYPE_CHECKING:  # the engine is imported lazily so this module loads even where the model code cannot
    from par_demo.predict import Prediction, Predictor

log = logging.getLogger("par_demo.demo")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "assets" / "examples"

# (label shown in the UI, method name of the engine). "full" is the reference, never a choice in the UI.
METHOD_CHOICES: list[tuple[str, str]] = [
    ("PAR", "par"), ("FastV", "fastv"), ("random tokens", "random"), ("layer drop", "layerdrop"),
    ("VisionZip", "visionzip"), ("DivPrune", "divprune"), ("CDPruner", "cdpruner"),
    ("downsample (pooled)", "downsample"),
]
METHOD_LABELS = dict((value, label) for label, value in METHOD_CHOICES) | {"full": "full model"}
# What the per-patch and per-layer scores of each method are (shown on hover and in the colour bar). FastV's patch
# scores are attention to the image (the default name); DivPrune and downsampling have none.
TOKEN_SCORE_NAMES = {"par": "router score", "visionzip": "vision-tower attention", "cdpruner": "question relevance"}
LAYER_SCORE_NAMES = {"par": "router score", "layerdrop": "block influence"}
SWEEP_BUDGETS = tuple(round(1.0 - 0.1 * i, 1) for i in range(10))  # 1.0, 0.9, ..., 0.1
DEFAULT_START_LAYER = 2  # the paper prunes tokens from layer K=2 on

MAX_SIDE = 2048  # larger images are downscaled: the model sees a few hundred pixels per side anyway
MIN_SIDE = 16  # smaller images are upscaled: image processors cannot tell channels from 1x1 pixels
DEFAULT_CACHE_ITEMS = 64


# ---------------------------------------------------------------------------------------------------------------
# Input checks: each raises UserError with one line the user can act on.


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
    image = images.load_image(source)
    if max(image.size) > MAX_SIDE:  # the model sees a few hundred pixels per side; resizing early is cheaper
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    if min(image.size) < MIN_SIDE:  # image processors cannot tell channels from pixels in a 1x1 array
        scale = math.ceil(MIN_SIDE / min(image.size))
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
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


# ---------------------------------------------------------------------------------------------------------------
# Running the model.


def image_fingerprint(image: Image.Image) -> str:
    """A hash of the decoded pixels, so the same picture uploaded twice (any file name) hits the cache."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class LRUCache:
    """A small thread-safe least-recently-used cache; bounded so a public demo's memory stays flat."""

    def __init__(self, max_items: int):
        self.max_items = max(1, int(max_items))
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Any) -> Any | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def zerogpu_enabled() -> bool:
    return bool(os.environ.get("SPACES_ZERO_GPU")) and importlib.util.find_spec("spaces") is not None


def on_gpu(fn: Callable | None = None, *, duration: int = 60) -> Callable:
    """`spaces.GPU` on a Hugging Face ZeroGPU Space; a no-op everywhere else (no `spaces` package or env)."""

    def decorate(func: Callable) -> Callable:
        if not zerogpu_enabled():
            return func
        import spaces  # only present on Spaces

        return spaces.GPU(duration=duration)(func)

    return decorate(fn) if fn is not None else decorate


@on_gpu
def _predict_on_device(predictor: Predictor, image: Image.Image, question: str, kwargs: dict) -> Prediction:
    # On ZeroGPU this runs in the GPU worker; it returns only CPU data (answer text, numbers, lists).
    return predictor.predict(image, question, **kwargs)


def answer_agreement(reference: str, answer: str) -> float:
    """Word-overlap F1 between two answers (1.0 = same words); robust to case and trailing punctuation."""
    ref_words = _words(reference)
    ans_words = _words(answer)
    if not ref_words and not ans_words:
        return 1.0
    common = sum(min(ref_words.count(w), ans_words.count(w)) for w in set(ref_words))
    if common == 0:
        return 0.0
    precision, recall = common / len(ans_words), common / len(ref_words)
    return 2 * precision * recall / (precision + recall)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


@dataclass
class Comparison:
    """One query answered twice: by the full model (maybe from cache) and by a pruning method."""

    full: Prediction
    pruned: Prediction
    full_from_cache: bool
    model_view: Image.Image
    question_notice: str | None = None

    @property
    def prefill_speedup(self) -> float:
        return self.full.prefill_s / max(self.pruned.prefill_s, 1e-9)

    @property
    def total_speedup(self) -> float:
        return self.full.total_s / max(self.pruned.total_s, 1e-9)

    @property
    def agreement(self) -> float:
        return answer_agreement(self.full.answer, self.pruned.answer)


class DemoService:
    """The model side of the demo: one predictor, a bounded cache of full answers, a lock around the model."""

    def __init__(self, predictor: Predictor, model_name: str, n_layers: int, max_visual_tokens: int,
                 cache_items: int = DEFAULT_CACHE_ITEMS, max_new_tokens: int = 16, description: str = ""):
        self.predictor = predictor
        self.description = description  # the architecture in words (from the model's family)
        self.model_name = model_name
        self.n_layers = int(n_layers)
        self.max_visual_tokens = int(max_visual_tokens)  # per image; a dynamic-resolution model gives fewer
        self.max_new_tokens = max_new_tokens
        self.full_cache = LRUCache(cache_items)
        self.view_cache = LRUCache(cache_items)
        # One model, many users: model calls run one at a time (the app's queue also serialises them).
        self._model_lock = threading.Lock()
        self._available = dict(predictor.available_methods())

    @classmethod
    def from_model(cls, spec: str | None = None, quant: str = "none", options: dict | None = None,
                   **kwargs: Any) -> DemoService:
        from par_demo.models import DEFAULT_MODEL, load_model
        from par_demo.predict import Predictor

        loaded = load_model(spec or DEFAULT_MODEL, quant=quant, options=options)
        return cls(Predictor(loaded), loaded.name, loaded.n_layers, loaded.max_visual_tokens,
                   description=loaded.family.describe(loaded), **kwargs)

    @property
    def n_visual_tokens(self) -> int:
        return self.max_visual_tokens

    def available_methods(self) -> dict[str, str | None]:
        return dict(self._available)

    def default_method(self) -> str:
        for _, name in METHOD_CHOICES:
            if not self._available.get(name):
                return name
        return METHOD_CHOICES[0][1]

    def _run(self, image: Image.Image, question: str, **kwargs: Any) -> Prediction:
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        with self._model_lock:
            return _predict_on_device(self.predictor, image, question, kwargs)

    def model_view(self, image: Image.Image, fingerprint: str | None = None) -> Image.Image:
        key = (fingerprint or image_fingerprint(image), self.model_name)
        view = self.view_cache.get(key)
        if view is None:
            view = self.predictor.model_view(image).convert("RGB")
            self.view_cache.put(key, view)
        return view

    def full_answer(self, image: Image.Image, question: str, fingerprint: str | None = None) -> tuple[Prediction, bool]:
        """The unpruned prediction, computed once per (image, question, model) and then served from the cache."""
        key = (fingerprint or image_fingerprint(image), question, self.model_name, self.max_new_tokens)
        cached = self.full_cache.get(key)
        if cached is not None:
            return cached, True
        prediction = self._run(image, question, method="full", budget=1.0)
        self.full_cache.put(key, prediction)
        return prediction, False

    def compare(self, image: Any, question: Any, method: Any, budget: Any, tokens: Any = None, layers: Any = None,
                start_layer: Any = DEFAULT_START_LAYER, progress: Callable[[float, str], None] | None = None,
                ) -> Comparison:
        """Checks every input, then answers with the full model (cached) and with `method` at `budget`."""
        report = progress or (lambda fraction, text: None)
        pil_image = load_image(image)
        text, notice = check_question(question)
        name = check_method(method, self._available)
        value = check_budget(budget)
        overrides = self.check_overrides(tokens, layers, start_layer)
        fingerprint = image_fingerprint(pil_image)
        report(0.1, "full model")
        full, from_cache = self.full_answer(pil_image, text, fingerprint)
        report(0.55, f"{METHOD_LABELS[name]} at budget {value:.2f}")
        pruned = self._run(pil_image, text, method=name, budget=value, **overrides)
        view = self.model_view(pil_image, fingerprint)
        return Comparison(full, pruned, from_cache, view, notice)

    def check_overrides(self, tokens: Any, layers: Any, start_layer: Any) -> dict[str, int | None]:
        start = check_count(start_layer, "Pruning start layer", 0, self.n_layers - 1, zero_means_auto=False)
        return {
            "tokens": check_count(tokens, "Tokens kept", 1, self.n_visual_tokens),
            "layers": check_count(layers, "Layers kept", 1, self.n_layers),
            "start_layer": DEFAULT_START_LAYER if start is None else start,
        }

    def sweep(self, image: Any, question: Any, method: Any, start_layer: Any = DEFAULT_START_LAYER,
              budgets: Sequence[float] = SWEEP_BUDGETS) -> Iterator[tuple[Prediction, dict]]:
        """Runs `method` at each budget (1.0 → 0.1 by default); yields (full prediction, point) as each finishes."""
        pil_image = load_image(image)
        text, _ = check_question(question)
        name = check_method(method, self._available)
        overrides = self.check_overrides(None, None, start_layer)
        fingerprint = image_fingerprint(pil_image)
        full, _ = self.full_answer(pil_image, text, fingerprint)
        for budget in budgets:
            try:
                pruned = self._run(pil_image, text, method=name, budget=check_budget(budget), **overrides)
            except UserError as exc:  # e.g. a budget below the method's cheapest setting: note it, go on
                yield full, {"budget": float(budget), "skipped": str(exc)}
                continue
            yield full, sweep_point(full, pruned)

    def start_warm_up(self) -> threading.Thread:
        """`warm_up` in a background thread; a query arriving meanwhile simply waits for the model lock."""

        def run() -> None:
            try:
                log.info("warm-up done in %.1f s", self.warm_up())
            except Exception:  # a failed warm-up only costs the first user some latency
                log.exception("warm-up failed")

        thread = threading.Thread(target=run, name="par-demo-warm-up", daemon=True)
        thread.start()
        return thread

    def warm_up(self) -> float:
        """One full and one pruned query on an example, so the first user's latencies are not cold-start ones."""
        started = time.perf_counter()
        examples = load_examples()
        image = load_image(examples[0][0]) if examples else Image.new("RGB", (64, 64), (200, 200, 200))
        question = examples[0][1] if examples else "What is in the image?"
        self._run(image, question, method="full", budget=1.0)
        for name in ("fastv", "layerdrop"):
            if not self._available.get(name):
                try:
                    self._run(image, question, method=name, budget=0.5)
                except UserError:
                    pass
        return time.perf_counter() - started


def sweep_point(full: Prediction, pruned: Prediction) -> dict:
    return {
        "budget": pruned.budget, "flops_ratio": pruned.flops_ratio, "prefill_s": pruned.prefill_s,
        "total_s": pruned.total_s, "agreement": answer_agreement(full.answer, pruned.answer),
        "answer": pruned.answer,
    }


# ---------------------------------------------------------------------------------------------------------------
# Errors: whatever happens, the user sees one clear line, never a traceback.


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _free_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # freeing memory is best effort; the user message matters more
        pass


def as_user_message(exc: BaseException) -> gr.Error:
    """Maps any exception to the `gr.Error` shown to the user (and logs the unexpected ones)."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, UserError):
        return gr.Error(str(exc))
    if _is_out_of_memory(exc):
        _free_device_memory()
        return gr.Error("The model ran out of memory on this request; try a smaller image or a lower budget.")
    log.exception("unexpected error in the demo", exc_info=exc)
    return gr.Error(f"Something went wrong while answering ({type(exc).__name__}); please try again or another input.")


def friendly_errors(fn: Callable) -> Callable:
    """Decorator for event handlers (plain functions and generators): every exception becomes a `gr.Error`."""
    if _is_generator_function(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args: Any, **kwargs: Any) -> Iterator:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise as_user_message(exc) from None

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise as_user_message(exc) from None

    return wrapper


def _is_generator_function(fn: Callable) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)


def _is_uploaded_file(path: str) -> bool:
    """True for files in Gradio's upload folder (where every upload lands) or among the shipped examples."""
    from gradio.utils import get_upload_folder

    resolved = Path(path).resolve()
    roots = (Path(get_upload_folder()).resolve(), Path(EXAMPLES_DIR).resolve())
    return any(resolved.is_relative_to(root) for root in roots)


class SafeImage(gr.Image):
    """`gr.Image` whose decoding errors (not an image, truncated, bomb) become a clear `gr.Error`.

    Gradio opens the upload before our handler runs; a plain `gr.Image` would show a generic "Error" there.
    Create it with type="filepath" and image_mode=None: then Gradio only reads the header and `load_image` does
    the decoding. (No __init__ override: Gradio reads the component's props from its __init__ signature.)
    """

    def get_block_name(self) -> str:
        return "image"  # render with Gradio's own image widget

    def preprocess(self, payload: Any) -> Any:
        path = getattr(payload, "path", None)
        if path and not _is_uploaded_file(path):
            # An API caller can name any server path instead of uploading; only uploads and examples are read.
            raise gr.Error("Upload the image; paths on the server are not read.")
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Image.DecompressionBombError:
            limit = images.MAX_PIXELS // 10**6
            raise gr.Error(f"The image has too many pixels; the limit is {limit} megapixels.") from None
        except UnidentifiedImageError:
            raise gr.Error("This file is not an image in a format we can read (try PNG or JPEG).") from None
        except Exception:
            raise gr.Error("The uploaded image could not be read; please upload it again (PNG or JPEG).") from None


class CheckedSlider(gr.Slider):
    """`gr.Slider` that answers a non-number from the API (text, null, NaN) with a clear `gr.Error`.

    A plain slider compares the raw value with its bounds and fails with a generic error on a string.
    """

    def get_block_name(self) -> str:
        return "slider"  # render with Gradio's own slider widget

    def preprocess(self, payload: Any) -> float:
        if isinstance(payload, bool) or not isinstance(payload, (int, float)) or not math.isfinite(payload):
            raise gr.Error(f"{self.label or 'The value'} must be a number from {self.minimum:g} to {self.maximum:g}.")
        return super().preprocess(payload)


# ---------------------------------------------------------------------------------------------------------------
# Gradio handlers: the functions app.py wires to events. Each returns exactly the outputs listed in its docstring.


def display_answer(answer: str) -> str:
    """The answer as shown in the UI; an empty one is said so (random-weight models often produce nothing)."""
    return answer if answer.strip() else "(no text: the model produced only special tokens)"


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def timing_markdown(prediction: Prediction, reference: Prediction | None = None, cached: bool = False) -> str:
    """One line: prefill and total latency, and (for the pruned side) the speed-up over the full model."""
    prefill = f"prefill **{_seconds(prediction.prefill_s)}**"
    total = f"total **{_seconds(prediction.total_s)}**"
    if reference is not None:
        prefill += f" ({_speedup(reference.prefill_s, prediction.prefill_s)})"
        total += f" ({_speedup(reference.total_s, prediction.total_s)})"
    note = " · answer from cache, timed on its first run" if cached else ""
    return f"{prefill} · {total} · {prediction.new_tokens} new tokens{note}"


def _speedup(reference_s: float, seconds: float) -> str:
    ratio = reference_s / max(seconds, 1e-9)
    # Tiny models on a busy CPU can come out slower; say so rather than print "0.9× faster".
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{ratio:.2f}×, slower this time"


def stats_markdown(pruned: Prediction) -> str:
    """FLOPs, visual tokens and layers kept, as a short table."""
    tokens = len(pruned.kept_visual_tokens)
    layers = len(pruned.kept_layers)
    return (
        "| FLOPs (prefill) | visual tokens kept | decoder layers run |\n|---|---|---|\n"
        f"| **{pruned.flops_ratio:.0%}** of full ({pruned.flops / 1e9:.3g} / {pruned.flops_full / 1e9:.3g} GFLOPs) "
        f"| **{tokens}** / {pruned.n_visual_tokens} ({tokens / max(pruned.n_visual_tokens, 1):.0%}) "
        f"| **{layers}** / {pruned.n_layers} |"
    )


def patch_view_figure(view: Image.Image, pruned: Prediction, show_scores: bool) -> Any:
    score_name = TOKEN_SCORE_NAMES.get(pruned.method, "attention score")
    title = None
    if show_scores and pruned.token_scores is None:
        title = (f"{METHOD_LABELS.get(pruned.method, pruned.method)} has no per-patch scores · "
                 f"kept {len(pruned.kept_visual_tokens)}/{pruned.n_visual_tokens}, dropped patches dimmed")
    return viz.patch_figure(view, tuple(pruned.grid), pruned.kept_visual_tokens, pruned.token_scores,
                            show_scores=show_scores, score_name=score_name, title=title)


PATCH_VIEWS = ("kept / dropped", "per-patch scores")


class DemoApp:
    """Event handlers for app.py. Holds the service; per-user data travels in a `gr.State`, never on `self`."""

    def __init__(self, service: DemoService, sweep_budgets: Sequence[float] = SWEEP_BUDGETS):
        self.service = service
        self.sweep_budgets = tuple(sweep_budgets)

    # -- what app.py needs to build the layout
    def method_choices(self) -> list[tuple[str, str]]:
        available = self.service.available_methods()
        return [(label if not available.get(value) else f"{label} (unavailable)", value)
                for label, value in METHOD_CHOICES]

    def status_markdown(self) -> str:
        s = self.service
        described = f" · {s.description}" if s.description else ""
        lines = [f"**Model:** `{s.model_name}`{described} · up to {s.n_visual_tokens} visual tokens"
                 f" · {s.n_layers} decoder layers"]
        for label, value in METHOD_CHOICES:
            reason = s.available_methods().get(value)
            if reason:
                lines.append(f"**{label} unavailable:** {reason}")
        return "  \n".join(lines)

    @staticmethod
    def examples() -> list[list[str]]:
        return load_examples()

    @staticmethod
    def empty_outputs() -> tuple:
        """Placeholder figures shown before the first query (patches, layers, latency, sweep)."""
        return (viz.empty_figure("Run a query to see which image patches were kept", 440),
                viz.empty_figure("Run a query to see which decoder layers ran", 190),
                viz.empty_figure("Latency appears here", 220),
                viz.empty_figure("Press “Sweep budgets” to plot latency and agreement against FLOPs", 340))

    # -- events
    def run(self, image: Any, question: Any, method: Any, budget: Any, tokens: Any, layers: Any, start_layer: Any,
            patch_view: str, progress: gr.Progress = gr.Progress()) -> tuple:
        """Outputs: full answer, full timing, pruned answer, pruned timing, stats table, patch figure,
        layer figure, latency figure, stats JSON, view state."""
        return friendly_errors(self._run)(image, question, method, budget, tokens, layers, start_layer, patch_view,
                                          progress)

    def _run(self, image, question, method, budget, tokens, layers, start_layer, patch_view, progress) -> tuple:
        result = self.service.compare(image, question, method, budget, tokens, layers, start_layer,
                                      progress=lambda fraction, text: progress(fraction, desc=text))
        full, pruned = result.full, result.pruned
        for notice in dict.fromkeys([result.question_notice, *full.notices, *pruned.notices]):
            if notice:
                gr.Warning(notice)
        pruned_label = f"{METHOD_LABELS.get(pruned.method, pruned.method)} at budget {pruned.budget:.2f}"
        state = {"view": result.model_view, "pruned": pruned}
        return (
            display_answer(full.answer),
            timing_markdown(full, cached=result.full_from_cache),
            gr.update(value=display_answer(pruned.answer), label=f"Pruned answer — {pruned_label}"),
            timing_markdown(pruned, reference=full),
            stats_markdown(pruned),
            patch_view_figure(result.model_view, pruned, patch_view == PATCH_VIEWS[1]),
            viz.layer_figure(pruned.n_layers, pruned.kept_layers, pruned.layer_scores,
                             LAYER_SCORE_NAMES.get(pruned.method, "score")),
            viz.latency_figure(full.to_json(), pruned.to_json(), pruned_label),
            pruned.to_json(),
            state,
        )

    def rerun(self, image: Any, question: Any, method: Any, budget: Any, tokens: Any, layers: Any,
              start_layer: Any, patch_view: str, progress: gr.Progress = gr.Progress()) -> tuple:
        """Like `run`, for the slider: before an image and a question are there it quietly does nothing
        (moving the slider first is not a mistake worth an error pop-up)."""
        if image is None or not (isinstance(question, str) and question.strip()):
            return tuple(gr.skip() for _ in range(10))
        return self.run(image, question, method, budget, tokens, layers, start_layer, patch_view, progress)

    def redraw_patches(self, state: dict | None, patch_view: str) -> Any:
        """Output: the patch figure, redrawn in the other view from the last result (no model call)."""
        if not state:
            return viz.empty_figure("Run a query to see which image patches were kept", 440)
        return patch_view_figure(state["view"], state["pruned"], patch_view == PATCH_VIEWS[1])

    def api_compare(self, image: Any, question: Any, method: Any, budget: Any) -> tuple[str, str, dict, dict]:
        """The public `compare` endpoint. Outputs: full answer, pruned answer, pruned stats, full stats
        (both stats objects have exactly the `predict --json` keys)."""
        return friendly_errors(self._api_compare)(image, question, method, budget)

    def _api_compare(self, image, question, method, budget) -> tuple[str, str, dict, dict]:
        result = self.service.compare(image, question, method, budget)
        stats, full_stats = result.pruned.to_json(), result.full.to_json()
        if result.question_notice:  # API callers see no pop-ups: the notice travels with the stats
            for data in (stats, full_stats):
                data["notices"] = [result.question_notice, *data.get("notices", [])]
        return result.full.answer, result.pruned.answer, stats, full_stats

    def sweep(self, image: Any, question: Any, method: Any, start_layer: Any,
              progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:
        """Streams outputs: sweep figure, sweep summary (markdown), after every budget."""
        # `yield from` keeps this a generator function, which is how Gradio knows to stream it.
        yield from friendly_errors(self._sweep)(image, question, method, start_layer, progress)

    def _sweep(self, image, question, method, start_layer, progress) -> Iterator[tuple]:
        label = METHOD_LABELS.get(check_method(method), str(method))
        points: list[dict] = []
        budgets = self.sweep_budgets
        yield viz.sweep_figure(points, label), f"Sweeping {label} over {len(budgets)} budgets…"
        started = time.perf_counter()
        for full, point in self.service.sweep(image, question, method, start_layer, budgets):
            points.append(point)
            progress(len(points) / len(budgets), desc=f"budget {point['budget']:.1f}")
            done = [p for p in points if "skipped" not in p]
            yield viz.sweep_figure(done, label, full.total_s), sweep_summary(points, full, started, len(budgets))


def sweep_summary(points: Sequence[dict], full: Prediction, started: float, n_budgets: int) -> str:
    """A markdown table of the sweep so far; budgets a method cannot reach are listed with the reason."""
    rows = []
    for p in points:
        if "skipped" in p:
            rows.append(f"| {p['budget']:.1f} | – | – | – | – | not reachable: {_escape(p['skipped'])} |")
        else:
            rows.append(f"| {p['budget']:.1f} | {p['flops_ratio']:.0%} | {_seconds(p['prefill_s'])} "
                        f"| {_seconds(p['total_s'])} | {p['agreement']:.2f} | {_escape(display_answer(p['answer']))} |")
    head = (f"Full answer: **{_escape(display_answer(full.answer))}** ({_seconds(full.total_s)}) · "
            f"{len(points)}/{n_budgets} budgets in {time.perf_counter() - started:.1f} s\n\n"
            "| budget | FLOPs | prefill | total | agreement | answer |\n|---|---|---|---|---|---|\n")
    return head + "\n".join(rows)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:120]


def load_examples(directory: Path = EXAMPLES_DIR) -> list[list[str]]:
    """[image path, question] pairs from assets/examples/examples.jsonl (missing file → no examples)."""
    import json

    manifest = directory / "examples.jsonl"
    if not manifest.is_file():
        return []
    examples = []
    for line in manifest.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            examples.append([str(directory / record["image"]), record["question"]])
    return examples
