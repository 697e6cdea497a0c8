"""The model side of the app: one predictor on its own thread (`par_demo.model_thread`), a bounded cache of full
answers, and the three things the page asks of it: one method against the full model (`compare`), every method at
one budget (`compare_all`) and one method over many budgets (`sweep`).

Inputs are checked here (`par_demo.inputs`), so the app and its API give the same one-line messages. Every
latency this module reports is measured in the request that reports it (`par_demo.timing`): the full model's
*answer* may come from the cache, its *timing* never does.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from par_demo import timing
from par_demo.comparison import COMPARE_ALL_ROUNDS, AllMethods, compare_methods
from par_demo.errors import BudgetOutOfReach, UserError
from par_demo.inputs import (
    METHOD_CHOICES, METHOD_LABELS, check_budget, check_count, check_extras, check_method, check_question, load_image,
)
from par_demo.methods import REGISTRY
from par_demo.methods.base import check_unit
from par_demo.model_card import ModelCard
from par_demo.model_thread import ModelThread
from par_demo.zerogpu import answer_or_raise, measure_on_device, predict_on_device, register, zerogpu_enabled

if TYPE_CHECKING:  # the engine is imported lazily: building a service for tests needs no model code
    from par_demo.predict import Prediction, Predictor

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "assets" / "examples"
SWEEP_BUDGETS = tuple(round(1.0 - 0.1 * i, 1) for i in range(10))  # 1.0, 0.9, ..., 0.1
DEFAULT_START_LAYER = 2  # the paper prunes tokens from layer K=2 on
DEFAULT_CACHE_ITEMS = 64
# Requests that time many settings use fewer rounds each, so the whole request stays short: the sweep (10 budgets,
# each in turns with the full model), like all methods at one budget (`COMPARE_ALL_ROUNDS`).
SWEEP_ROUNDS = 3


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
    """One query answered twice, by the full model (answer maybe from cache) and by a pruning method, both timed
    in this request."""

    full: Prediction
    pruned: Prediction
    full_from_cache: bool
    model_view: Image.Image
    question_notice: str | None = None
    image_notice: str | None = None  # e.g. a visitor's own photo on a model that only knows synthetic scenes

    @property
    def prefill_speedup(self) -> float:
        return self.pruned.timing.prefill_speedup.median

    @property
    def agreement(self) -> float:
        return answer_agreement(self.full.answer, self.pruned.answer)

    @property
    def notices(self) -> list[str]:
        return [n for n in (self.question_notice, self.image_notice) if n]


class DemoService:
    """The model side of the demo: one predictor, a bounded cache of full answers, a lock around the model."""

    def __init__(self, predictor: Predictor, model_name: str, n_layers: int, max_visual_tokens: int,
                 cache_items: int = DEFAULT_CACHE_ITEMS, max_new_tokens: int = 16, description: str = "",
                 card: ModelCard | None = None, rounds: int | None = None, budget_unit: str = "flops",
                 model_thread: ModelThread | None = None):
        self.predictor = predictor
        # What the page's budget is a fraction of: the full prefill's FLOPs, or its time on this machine (the
        # measured cost model, `par_demo.cost`, made or read from the cache when the service is built)
        self.budget_unit = check_unit(budget_unit)
        self.description = description  # the architecture in words (from the model's family)
        self.model_name = model_name
        self.n_layers = int(n_layers)
        self.max_visual_tokens = int(max_visual_tokens)  # per image; a dynamic-resolution model gives fewer
        self.max_new_tokens = max_new_tokens
        self.card = card
        # Timing rounds per request: given, or chosen by the warm-up from the model's speed (`timing.rounds_for`)
        self.rounds = timing.DEFAULT_ROUNDS if rounds is None else rounds
        self.rounds_given = rounds is not None
        self.full_cache = LRUCache(cache_items)
        self.view_cache = LRUCache(cache_items)
        # One model, many users: model calls run one at a time (the app's queue also serialises them), all on one
        # thread, the one that loaded the model, so that a CPU runs one OpenMP thread team (`par_demo.model_thread`).
        self.model_thread = model_thread or ModelThread(inline=zerogpu_enabled())
        # Why a method is unavailable, as the page shows it: paths inside the project relative to it.
        self._available = {name: reason and reason.replace(f"{ROOT}/", "")
                           for name, reason in predictor.available_methods().items()}
        self._example_prints: set[str] | None = None
        # The smallest budget each method reached on the first example (the warm-up's measure): what the page says
        # under its budget slider, whose scale starts lower than most methods can go
        self.reach: dict[str, float] = {}

    @property
    def predictor(self) -> Predictor:
        return self._predictor

    @predictor.setter
    def predictor(self, predictor: Predictor) -> None:
        self._predictor = predictor
        self._key = register(predictor)  # what the GPU-side functions are given instead of the model

    @classmethod
    def from_model(cls, spec: str | None = None, quant: str = "none", options: dict | None = None,
                   **kwargs: Any) -> DemoService:
        from par_demo.model_card import card_for
        from par_demo.models import DEFAULT_MODEL, load_model
        from par_demo.predict import Predictor

        if kwargs.get("budget_unit") == "time" and zerogpu_enabled():
            # no GPU is attached outside requests there: nothing to time when the app starts
            raise UserError("time budgets need the model's device at start-up to measure it; ZeroGPU attaches "
                            "one only during requests: use --budget-unit flops there")

        def load() -> Predictor:
            # time budgets' cost model is measured by the warm-up (`start_warm_up`), while the page is served
            return Predictor(load_model(spec or DEFAULT_MODEL, quant=quant, options=options))

        model_thread = ModelThread(inline=zerogpu_enabled())
        predictor = model_thread.call(load)
        loaded = predictor.loaded
        return cls(predictor, loaded.name, loaded.n_layers, loaded.max_visual_tokens,
                   description=loaded.family.describe(loaded), card=card_for(loaded), model_thread=model_thread,
                   **kwargs)

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

    # -- model calls, one at a time, on the model thread
    def _run(self, image: Image.Image, question: str, **kwargs: Any) -> Prediction:
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        kwargs.setdefault("budget_unit", self.budget_unit)
        return answer_or_raise(self.model_thread.call(predict_on_device, self._key, image, question, kwargs))

    def _measure(self, image: Image.Image, question: str, predictions: list, settings: list,
                 rounds: int, answers_are_a_round: bool = False) -> list[Prediction]:
        return answer_or_raise(self.model_thread.call(measure_on_device, self._key, image, question, predictions,
                                                      settings, rounds, self.max_new_tokens, answers_are_a_round))

    def model_view(self, image: Image.Image, fingerprint: str | None = None) -> Image.Image:
        key = (fingerprint or image_fingerprint(image), self.model_name)
        view = self.view_cache.get(key)
        if view is None:
            view = self.model_thread.call(self.predictor.model_view, image).convert("RGB")
            self.view_cache.put(key, view)
        return view

    def full_answer(self, image: Image.Image, question: str, fingerprint: str | None = None) -> tuple[Prediction, bool]:
        """The unpruned prediction, computed once per (image, question, model) and then served from the cache.
        Its timing is that one run's: callers that show a latency time it again (`_measure`)."""
        key = self._full_key(fingerprint or image_fingerprint(image), question)
        cached = self.full_cache.get(key)
        if cached is not None:
            return cached, True
        prediction = self._run(image, question, method="full", budget=1.0)
        self.full_cache.put(key, prediction)
        return prediction, False

    def _full_key(self, fingerprint: str, question: str) -> tuple:
        return fingerprint, question, self.model_name, self.max_new_tokens

    def image_notice(self, fingerprint: str) -> str | None:
        """What to say next to the answers about the image itself: a model that knows only synthetic scenes is
        asked about a picture that is not one of them."""
        if self.card is None or not self.card.synthetic_only or fingerprint in self._examples():
            return None
        return (f"Your own image: {self.card.name} was trained on synthetic shape scenes only, so on other pictures "
                "its answers are guesses. The examples show what it knows.")

    def vocabulary_notice(self, question: str) -> str | None:
        """What to say about the question itself: a model that knows only the words of its shape questions (the
        embedded one's tokenizer has 50 words) is asked with others, which it reads as one unknown token."""
        if self.card is None or not self.card.synthetic_only:
            return None
        tokenizer = self.predictor.loaded.processor.tokenizer
        unknown = [word for word in dict.fromkeys(re.findall(r"\w+", question))
                   if tokenizer.unk_token_id in tokenizer(word, add_special_tokens=False)["input_ids"]]
        if not unknown:
            return None
        shown = ", ".join(f"“{word}”" for word in unknown[:3]) + (" …" if len(unknown) > 3 else "")
        return (f"Your question: {self.card.name} knows only the words of its six kinds of shape question, not "
                f"{shown}; its answer is a guess. The examples show what it can answer.")

    def question_notices(self, question: Any) -> tuple[str, str | None]:
        """The cleaned question and what to say about it (shortened, words the model does not know), if anything."""
        text, clipped = check_question(question)
        said = " ".join(n for n in (clipped, self.vocabulary_notice(text)) if n)
        return text, said or None

    def _examples(self) -> set[str]:
        if self._example_prints is None:
            self._example_prints = {image_fingerprint(load_image(path)) for path, _ in load_examples()}
        return self._example_prints

    # -- what the page asks
    def compare(self, image: Any, question: Any, method: Any, budget: Any, tokens: Any = None, layers: Any = None,
                start_layer: Any = DEFAULT_START_LAYER, progress: Callable[[float, str], None] | None = None,
                ) -> Comparison:
        """Checks every input, answers with the full model (cached) and with `method` at `budget`, then times the
        two in turns (`self.rounds` rounds)."""
        report = progress or (lambda fraction, text: None)
        pil_image = load_image(image)
        text, notice = self.question_notices(question)
        name = check_method(method, self._available)
        value = check_budget(budget)
        overrides = self.check_overrides(tokens, layers, start_layer)
        fingerprint = image_fingerprint(pil_image)
        report(0.1, "full model")
        full, from_cache = self.full_answer(pil_image, text, fingerprint)
        report(0.3, f"{METHOD_LABELS[name]} at budget {value:.2f}")
        setting = {"method": name, "budget": value, **overrides, "budget_unit": self.budget_unit}
        pruned = self._run(pil_image, text, **setting)
        report(0.5, f"timing both, {self.rounds} rounds in turns")
        full, pruned = self._measure(pil_image, text, [full, pruned], [dict(timing.FULL), setting], self.rounds)
        view = self.model_view(pil_image, fingerprint)
        return Comparison(full, pruned, from_cache, view, notice, self.image_notice(fingerprint))

    def compare_all(self, image: Any, question: Any, budget: Any, start_layer: Any = DEFAULT_START_LAYER,
                    rounds: int = COMPARE_ALL_ROUNDS, extras: Any = ()) -> Iterator[AllMethods]:
        """Every method of the field at one budget: yields the state after each method answers, then once more
        after all of them and the full model were timed together, in turns. The simple baselines and PAR's
        ablations run only when `extras` names their group ("baseline", "ablation"): each method costs `rounds`
        more runs, and a visitor waits for all of them.

        The answering pass (the full model, then every method, one after another) is the first timing round, so
        the full model answers afresh here rather than from the cache; `rounds - 1` more rounds follow."""
        pil_image = load_image(image)
        text, notice = self.question_notices(question)
        value = check_budget(budget)
        start = self.check_overrides(None, None, start_layer)["start_layer"]
        groups = check_extras(extras)
        fingerprint = image_fingerprint(pil_image)
        names = [name for _, name in METHOD_CHOICES if REGISTRY[name].extra in (None, *groups)]

        def run(**setting: Any) -> Prediction:
            return self._run(pil_image, text, **setting)

        def measure(predictions: list, settings: list) -> list:
            return self._measure(pil_image, text, predictions, settings, rounds, answers_are_a_round=True)

        states = compare_methods(run, measure, text, value, names, self._available, start, self.budget_unit)
        state = next(states)  # the full model has answered: what the page shows first
        self.full_cache.put(self._full_key(fingerprint, text), state.full)
        state.model_view = self.model_view(pil_image, fingerprint)
        state.notices = [n for n in (notice, self.image_notice(fingerprint)) if n]
        state.left_out = [n for _, n in METHOD_CHOICES if n not in names]
        yield state
        yield from states

    def check_overrides(self, tokens: Any, layers: Any, start_layer: Any) -> dict[str, int | None]:
        start = check_count(start_layer, "Pruning start layer", 0, self.n_layers - 1, zero_means_auto=False)
        return {
            "tokens": check_count(tokens, "Tokens kept", 1, self.n_visual_tokens),
            "layers": check_count(layers, "Layers kept", 1, self.n_layers),
            "start_layer": DEFAULT_START_LAYER if start is None else start,
        }

    def sweep(self, image: Any, question: Any, method: Any, start_layer: Any = DEFAULT_START_LAYER,
              budgets: Sequence[float] = SWEEP_BUDGETS, rounds: int = SWEEP_ROUNDS) -> Iterator[dict]:
        """Runs `method` at each budget (1.0 → 0.1 by default); yields one point per budget as it finishes. Each
        point is timed in turns with the full model, so the full model is measured all along the sweep."""
        pil_image = load_image(image)
        text, _ = check_question(question)
        name = check_method(method, self._available)
        overrides = self.check_overrides(None, None, start_layer)
        full, _ = self.full_answer(pil_image, text, image_fingerprint(pil_image))
        for budget in budgets:
            setting = {"method": name, "budget": check_budget(budget), **overrides, "budget_unit": self.budget_unit}
            try:
                pruned = self._run(pil_image, text, **setting)
            except BudgetOutOfReach as exc:  # a budget below the method's cheapest setting: note it, go on
                yield {"budget": float(budget), "skipped": str(exc), "reach": exc.reach, "full_answer": full.answer}
                continue
            timed_full, timed = self._measure(pil_image, text, [full, pruned], [dict(timing.FULL), setting], rounds)
            yield sweep_point(timed_full, timed)

    # -- start-up
    def start_warm_up(self) -> threading.Thread:
        """`warm_up` in a background thread; a query arriving meanwhile waits its turn on the model thread."""

        def run() -> None:
            try:
                log.info("warm-up done in %.1f s", self.warm_up())
            except Exception:  # a failed warm-up only costs the first user some latency
                log.exception("warm-up failed")

        thread = threading.Thread(target=run, name="par-demo-warm-up", daemon=True)
        thread.start()
        return thread

    def warm_up(self) -> float:
        """With time budgets the cost model's split grid, then the full model and every available method once on an
        example, so that no visitor's request pays for a first run (kernel set-up, a method's one-time calibration,
        the cost model) and every timing the page shows is warm. The full model's second run sets the timing rounds
        of a request (unless they were given): as many as fit about half a second."""
        started = time.perf_counter()
        if self.budget_unit == "time":
            # the split grid first (a cached fit is read and checked), then each method's own work as each method
            # first runs; `app.py` starts the warm-up as soon as the page is served (not while it is being built,
            # which would slow these timings), so this is queued on the model thread ahead of nearly every
            # visitor's request (one that comes first measures the cost model itself, through the same call)
            self.model_thread.call(self.predictor.time_budget, methods=False)
        examples = load_examples()
        image = load_image(examples[0][0]) if examples else Image.new("RGB", (64, 64), (200, 200, 200))
        question = examples[0][1] if examples else "What is in the image?"
        self._run(image, question, method="full", budget=1.0)
        warm = self._run(image, question, method="full", budget=1.0)  # the first run pays for kernel set-up
        if not self.rounds_given:
            self.rounds = timing.rounds_for(warm.total_s)
        self._examples()  # the examples' fingerprints, read on every request's image notice
        for _, name in METHOD_CHOICES:
            if not self._available.get(name):
                try:
                    self._run(image, question, method=name, budget=0.5)
                except UserError:  # e.g. a budget this model's method cannot reach: nothing to warm
                    pass
                lowest = self.lowest_budget(image, question, name)
                if lowest is not None:
                    self.reach[name] = lowest
        return time.perf_counter() - started

    def lowest_budget(self, image: Image.Image, question: str, name: str) -> float | None:
        """The smallest budget `name` reaches on this query: its cheapest setting's cost, which a budget below it
        is refused with (planning only, nothing generated). 0.01 when even that budget is within reach; None when
        the method refuses the query for another reason."""
        try:
            self._run(image, question, method=name, budget=0.01)
        except BudgetOutOfReach as exc:
            return exc.reach  # None: no setting could be costed
        except UserError:
            return None
        return 0.01


def sweep_point(full: Prediction, pruned: Prediction) -> dict:
    """One budget of a sweep: the pruned run and the full model timed in the same rounds."""
    return {
        "budget": pruned.budget, "flops_ratio": pruned.flops_ratio, "answer": pruned.answer,
        "agreement": answer_agreement(full.answer, pruned.answer), "full_answer": full.answer,
        "timing": pruned.timing, "full_timing": full.timing,
        # what a visitor waits, not what the FLOPs model says: the pruned prefill's median over the full model's,
        # both from the same interleaved rounds
        "time_ratio": pruned.timing.prefill_s.median / full.timing.prefill_s.median,
    }


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
