"""The Gradio side of the app (`app.py` wires these handlers to its components): events, errors, input widgets.

Layers, from the bottom up:
- `par_demo.inputs` checks what a visitor sends (one-line `UserError`s);
- `par_demo.service.DemoService` runs the model: compare, compare all methods, sweep (every latency timed in the
  request that shows it, `par_demo.timing`);
- `par_demo.panels` and `par_demo.viz` turn results into Markdown, HTML and figures;
- here, `DemoApp` returns the tuples of outputs the app's components expect, and every error becomes one
  `gr.Error` line for the visitor and one log line for the operator (a traceback only for a real fault).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from par_demo import images, panels, viz
from par_demo.errors import UserError
from par_demo.inputs import METHOD_CHOICES, METHOD_LABELS, check_method
from par_demo.service import EXAMPLES_DIR, SWEEP_BUDGETS, DemoService, load_examples

if TYPE_CHECKING:
    from par_demo.predict import Prediction

log = logging.getLogger("par_demo.demo")

# What the per-patch and per-layer scores of each method are (shown on hover and in the colour bar).
# FastV's patch scores are attention to the image (the default name); DivPrune and downsampling have none.
TOKEN_SCORE_NAMES = {"par": "router score", "par-tokens": "router score", "visionzip": "vision-tower attention",
                     "cdpruner": "question relevance", "cdpruner-absorb": "question relevance",
                     "par-drop": "router score"}
LAYER_SCORE_NAMES = {"par": "router score", "par-layers": "router score", "par-drop": "router score",
                     "layerdrop": "block influence", "par-prior": "block influence"}
PATCH_VIEWS = ("kept / dropped", "per-patch scores")
KEPT_DOWNLOADS = 64  # all-methods runs kept as JSON files for the download button


# ---------------------------------------------------------------------------------------------------------------
# Errors: whatever happens, the visitor sees one clear line, never a traceback.


def refuse(message: str) -> gr.Error:
    """The `gr.Error` for a problem with the input: one warning line in the server log, no traceback."""
    log.warning("input refused: %s", message)
    return gr.Error(message, print_exception=False)


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
    """Maps any exception to the `gr.Error` shown to the visitor; logs a traceback only for unexpected ones."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, UserError):
        return refuse(str(exc))
    if _is_out_of_memory(exc):
        _free_device_memory()
        return refuse("The model ran out of memory on this request; try a smaller image or a lower budget.")
    log.exception("unexpected error in the demo", exc_info=exc)
    return gr.Error(f"Something went wrong while answering ({type(exc).__name__}); please try again or another input.",
                    print_exception=False)  # logged just above, once


def friendly_errors(fn: Callable, refused: tuple | None = None) -> Callable:
    """Decorator for event handlers (plain functions and generators): every exception becomes a `gr.Error`.

    With `refused` (the outputs to give instead, usually `gr.skip()`s), an input the app refuses (`UserError`) is a
    warning pop-up that leaves the page as it was, instead of an "Error" badge over every output with the last
    result still under them. The API endpoints keep the error: a script must see it."""

    def refusal(exc: Exception) -> tuple:
        if refused is None or not isinstance(exc, UserError):
            raise as_user_message(exc) from None
        log.warning("input refused: %s", exc)
        gr.Warning(str(exc))
        return refused

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args: Any, **kwargs: Any) -> Iterator:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                yield refusal(exc)

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            return refusal(exc)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# Input widgets whose own checks (run by Gradio before a handler) also answer with one line and one log line.


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
            raise refuse("Upload the image; paths on the server are not read.")
        try:
            return super().preprocess(payload)
        except gr.Error as exc:
            raise refuse(str(exc.message)) from None
        except Image.DecompressionBombError:
            limit = images.MAX_PIXELS // 10**6
            raise refuse(f"The image has too many pixels; the limit is {limit} megapixels.") from None
        except UnidentifiedImageError:
            raise refuse("This file is not an image in a format we can read (try PNG or JPEG).") from None
        except Exception:
            raise refuse("The uploaded image could not be read; please upload it again (PNG or JPEG).") from None


class CheckedSlider(gr.Slider):
    """`gr.Slider` that answers a non-number or out-of-range value from the API with one clear line.

    A plain slider compares the raw value with its bounds and fails with a generic error on a string.
    """

    def get_block_name(self) -> str:
        return "slider"  # render with Gradio's own slider widget

    def preprocess(self, payload: Any) -> float:
        if isinstance(payload, bool) or not isinstance(payload, (int, float)) or not math.isfinite(payload):
            raise refuse(f"{self.label or 'The value'} must be a number from {self.minimum:g} to {self.maximum:g}.")
        try:
            return super().preprocess(payload)
        except gr.Error as exc:
            raise refuse(str(exc.message)) from None


class CheckedRadio(gr.Radio):
    """`gr.Radio` whose "not in the list of choices" answer to an API caller is logged as one line."""

    def get_block_name(self) -> str:
        return "radio"  # render with Gradio's own radio widget

    def preprocess(self, payload: Any) -> Any:
        try:
            return super().preprocess(payload)
        except gr.Error as exc:
            raise refuse(str(exc.message)) from None


class CheckedCheckboxGroup(gr.CheckboxGroup):
    """`gr.CheckboxGroup` whose ticked values are checked by the handler, so an API caller's unknown value gets the
    handler's one clear line (Gradio's own check fails with a generic error and a logged traceback)."""

    def get_block_name(self) -> str:
        return "checkboxgroup"  # render with Gradio's own widget

    def preprocess(self, payload: Any) -> Any:
        return list(payload) if isinstance(payload, (list, tuple)) else payload


# ---------------------------------------------------------------------------------------------------------------
# Handlers: the functions app.py wires to events. Each returns exactly the outputs listed in its docstring.


def patch_view_figure(view: Image.Image, pruned: Prediction, show_scores: bool) -> Any:
    score_name = TOKEN_SCORE_NAMES.get(pruned.method, "attention score")
    title = None
    if show_scores and pruned.token_scores is None:
        n_kept = len(pruned.kept_visual_tokens)
        label = METHOD_LABELS.get(pruned.method, pruned.method)
        why = (f"{label} kept every token here: it scored none" if n_kept == pruned.n_visual_tokens
               else f"{label} has no per-patch scores")
        title = f"Visual tokens: kept {n_kept}/{pruned.n_visual_tokens}" + viz.subtitle(why)
    # The grid is the prediction's own: each model family lays out its patches its own way.
    return viz.patch_figure(view, tuple(pruned.grid), pruned.kept_visual_tokens, pruned.token_scores,
                            show_scores=show_scores, score_name=score_name, title=title, empty=pruned.empty_cells)


def skip(n: int) -> tuple:
    """Outputs left as they are."""
    return tuple(gr.skip() for _ in range(n))


def _show_notices(*notices: str | None) -> None:
    for notice in dict.fromkeys(notices):
        if notice:
            gr.Warning(notice)


class DemoApp:
    """Event handlers for app.py. Holds the service; per-user data travels in a `gr.State`, never on `self`."""

    def __init__(self, service: DemoService, sweep_budgets: Sequence[float] = SWEEP_BUDGETS):
        self.service = service
        self.sweep_budgets = tuple(sweep_budgets)
        self.downloads = Path(tempfile.mkdtemp(prefix="par-demo-runs-"))  # the all-methods runs as JSON

    # -- what app.py needs to build the layout
    def method_choices(self) -> list[tuple[str, str]]:
        available = self.service.available_methods()
        return [(label if not available.get(value) else f"{label} (unavailable)", value)
                for label, value in METHOD_CHOICES]

    def model_markdown(self) -> str:
        """The model card, then one line per method that is unavailable and why."""
        s = self.service
        if s.card is not None:
            lines = [panels.model_card_markdown(s.card)]
        else:
            described = f" · {s.description}" if s.description else ""
            lines = [f"**Model: {self.shown_model_name()}**{described} · up to {s.n_visual_tokens} visual tokens "
                     f"per image · {s.n_layers} decoder layers"]
        unavailable: dict[str, list[str]] = {}  # one line per reason: PAR's ablations share PAR's
        for label, value in METHOD_CHOICES:
            reason = s.available_methods().get(value)
            if reason:
                unavailable.setdefault(reason, []).append(label)
        for reason, labels in unavailable.items():
            lines.append(f"**Unavailable: {', '.join(labels)}:** {reason}")
        return "  \n".join(lines)

    @staticmethod
    def examples() -> list[list[str]]:
        return load_examples()

    @staticmethod
    def empty_outputs() -> tuple:
        """Placeholder figures shown before the first query (patches, layers, latency, sweep latency, agreement)."""
        return (viz.empty_figure("Run a query to see which image patches were kept", 440),
                viz.empty_figure("Run a query to see which decoder layers ran", 190),
                viz.empty_figure("Latency appears here", 250),
                viz.empty_figure("Press “Sweep budgets” for latency vs FLOPs", 340),
                viz.empty_figure("…and agreement with the full answer against measured time", 340))

    # -- one method against the full model
    def run(self, image: Any, question: Any, method: Any, budget: Any, tokens: Any, layers: Any, start_layer: Any,
            patch_view: str, progress: gr.Progress = gr.Progress()) -> tuple:
        """Outputs: full answer, full timing, pruned answer, pruned timing, image notice, stats table, patch figure,
        layer figure, latency figure, stats JSON, view state."""
        return friendly_errors(self._run, refused=skip(self.N_RUN_OUTPUTS))(
            image, question, method, budget, tokens, layers, start_layer, patch_view, progress)

    def _run(self, image, question, method, budget, tokens, layers, start_layer, patch_view, progress) -> tuple:
        result = self.service.compare(image, question, method, budget, tokens, layers, start_layer,
                                      progress=lambda fraction, text: progress(fraction, desc=text))
        full, pruned = result.full, result.pruned
        _show_notices(result.question_notice, *full.notices, *pruned.notices)
        by_hand = [what for value, what in ((tokens, "visual tokens"), (layers, "layers")) if value]  # 0: budget's
        pruned_label = METHOD_LABELS.get(pruned.method, pruned.method) + (
            f", {' and '.join(by_hand)} set by hand (budget not used)" if by_hand else f" at budget {pruned.budget:.2f}")
        state = {"view": result.model_view, "pruned": pruned}
        return (
            panels.display_answer(full.answer),
            panels.timing_markdown(full, cached=result.full_from_cache),
            gr.update(value=panels.display_answer(pruned.answer), label=f"Pruned answer — {pruned_label}"),
            panels.timing_markdown(pruned),
            f"⚠ {result.image_notice}" if result.image_notice else "",
            panels.stats_markdown(pruned),
            patch_view_figure(result.model_view, pruned, patch_view == PATCH_VIEWS[1]),
            viz.layer_figure(pruned.n_layers, pruned.kept_layers, pruned.layer_scores,
                             LAYER_SCORE_NAMES.get(pruned.method, "score")),
            viz.latency_figure(full.to_dict(), pruned.to_dict(), METHOD_LABELS.get(pruned.method, pruned.method)),
            pruned.to_dict(),
            state,
        )

    N_RUN_OUTPUTS = 11

    def rerun(self, image: Any, question: Any, method: Any, budget: Any, tokens: Any, layers: Any,
              start_layer: Any, patch_view: str, progress: gr.Progress = gr.Progress()) -> tuple:
        """Like `run`, for the slider: before an image and a question are there it quietly does nothing
        (moving the slider first is not a mistake worth an error pop-up)."""
        if image is None or not (isinstance(question, str) and question.strip()):
            return skip(self.N_RUN_OUTPUTS)
        return self.run(image, question, method, budget, tokens, layers, start_layer, patch_view, progress)

    def budget_note(self, method: Any) -> Any:
        """Output: the budget slider's note, the smallest budget the chosen method reached on an example at
        start-up (none until the warm-up has measured it, or for a method that is unavailable)."""
        reach = self.service.reach.get(method) if isinstance(method, str) else None
        if reach is None:
            return gr.update(info=None)
        label = METHOD_LABELS.get(method, method)
        return gr.update(info=f"{label} goes down to about {reach:.2f} here (on an example; lower is refused)")

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
        stats, full_stats = result.pruned.to_dict(), result.full.to_dict()
        for data in (stats, full_stats):  # API callers see no pop-ups: the notices travel with the stats
            data["notices"] = [*result.notices, *data.get("notices", [])]
        return result.full.answer, result.pruned.answer, stats, full_stats

    # -- every method at one budget
    def compare_all(self, image: Any, question: Any, budget: Any, start_layer: Any, extras: Any = (),
                    progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:
        """Streams outputs: the grid (HTML), its summary line, the download button (shown once all are timed)."""
        yield from friendly_errors(self._compare_all, refused=skip(3))(image, question, budget, start_layer, extras,
                                                                       progress)

    def _compare_all(self, image, question, budget, start_layer, extras, progress) -> Iterator[tuple]:
        for state in self.service.compare_all(image, question, budget, start_layer, extras=extras):
            if not state.results and not state.timed:
                _show_notices(*state.notices)
            total = len(state.results) + len(state.skipped) + len(state.pending)
            progress((total - len(state.pending)) / max(total, 1), desc="all methods")
            download = gr.update(value=str(self.save_run(state)), visible=True) if state.timed else gr.skip()
            yield panels.all_methods_html(state), panels.all_methods_summary(state), download

    def save_run(self, state: Any) -> Path:
        """The run as JSON (the `/compare_all` reply), in a file for the download button."""
        data = {"model": self.shown_model_name(), **state.to_dict()}
        path = self.downloads / f"all-methods-budget-{state.budget:.2f}-{time.strftime('%H%M%S')}-{id(state)}.json"
        path.write_text(json.dumps(data, indent=1))
        # A public demo runs for weeks: keep the newest files only, so the folder stays small.
        for old in sorted(self.downloads.glob("*.json"), key=lambda f: f.stat().st_mtime)[:-KEPT_DOWNLOADS]:
            old.unlink(missing_ok=True)
        return path

    def shown_model_name(self) -> str:
        """The model as the page names it: the model card's name, never a file path."""
        card = self.service.card
        return card.name if card is not None else Path(self.service.model_name).name

    def api_compare_all(self, image: Any, question: Any, budget: Any, extras: Any = ()) -> dict:
        """The public `compare_all` endpoint. Output: {model, question, budget, full, methods, skipped, notices,
        left_out}; `full` and each entry of `methods` have exactly the `predict --json` keys. `extras` (optional,
        default none): groups of extra methods to run as well, any of "baseline", "ablation"."""
        return friendly_errors(self._api_compare_all)(image, question, budget, extras)

    def _api_compare_all(self, image, question, budget, extras) -> dict:
        state = None
        for state in self.service.compare_all(image, question, budget, extras=extras):
            pass
        return {"model": self.shown_model_name(), **state.to_dict()}

    # -- one method over many budgets
    def sweep(self, image: Any, question: Any, method: Any, start_layer: Any,
              progress: gr.Progress = gr.Progress()) -> Iterator[tuple]:
        """Streams outputs: latency figure, agreement figure, sweep table (markdown), after every budget."""
        # `yield from` keeps this a generator function, which is how Gradio knows to stream it.
        # refused: the status line ("Sweeping …") is cleared, the last sweep's figures stay
        yield from friendly_errors(self._sweep, refused=(gr.skip(), gr.skip(), ""))(image, question, method,
                                                                                     start_layer, progress)

    def _sweep(self, image, question, method, start_layer, progress) -> Iterator[tuple]:
        label = METHOD_LABELS.get(check_method(method), str(method))
        points: list[dict] = []
        budgets = self.sweep_budgets
        yield (viz.sweep_latency_figure(points, label), viz.sweep_agreement_figure(points, label),
               f"Sweeping {label} over {len(budgets)} budgets…")
        started = time.perf_counter()
        for point in self.service.sweep(image, question, method, start_layer, budgets):
            points.append(point)
            progress(len(points) / len(budgets), desc=f"budget {point['budget']:.1f}")
            done = [p for p in points if "skipped" not in p]
            yield (viz.sweep_latency_figure(done, label), viz.sweep_agreement_figure(done, label),
                   panels.sweep_table(points, started, len(budgets), label))
