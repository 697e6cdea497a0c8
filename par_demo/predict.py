"""One question about one image under one pruning method: the library call (`Predictor`) and the `predict` command.

    python -m par_demo predict --image assets/examples/shapes_where.png --question "Where is the blue square?" \
        --method fastv --budget 0.5 --json

The command times the method and the full model alike (`par_demo.timing`: interleaved rounds, medians, spread),
so the speed-up it prints is measured, not assembled from two unrelated runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from PIL import Image

from par_demo.disk_cache import weights_digest
from par_demo.engine import Engine, Generation
from par_demo.errors import UserError
from par_demo.families import Layout
from par_demo.flops import FlopsModel
from par_demo.images import load_image
from par_demo.methods import METHODS, Method, method_class
from par_demo.methods.base import check_budget, check_unit
from par_demo.models import LoadedModel, clip_question, encode_query
from par_demo.timing import DEFAULT_ROUNDS, FULL, Sample, Timing, summarize, time_interleaved

__all__ = ["METHODS", "Prediction", "Predictor"]


class Answered(NamedTuple):
    """What `Predictor.generate` returns."""

    generation: Generation
    flops: float
    flops_full: float
    layout: Layout
    time_ratio: float | None  # predicted prefill time / the full model's (time budgets only)


@dataclass
class Prediction:
    """One answered query and everything about how it was pruned: what `Pruner.generate` returns, and (as
    `to_dict()`) what `predict --json` prints. Its fields are explained in the documentation's Python API page,
    under "What a result holds"."""

    answer: str
    method: str
    budget: float
    flops: float
    flops_full: float
    flops_ratio: float
    n_visual_tokens: int  # what this image gave (it varies with the image for dynamic-resolution models)
    kept_visual_tokens: list[int]  # row-major cell indices (row * cols + col) in `grid`
    grid: tuple[int, int]  # (rows, cols) of image cells, one visual token each but `empty_cells`
    n_layers: int
    kept_layers: list[int]  # 0-based
    start_layer: int  # K: the layer from which dropped visual tokens left the sequence
    prefill_s: float
    total_s: float
    new_tokens: int
    token_scores: list[float] | None = None
    layer_scores: list[float] | None = None
    kv_cache_bytes: int = 0
    empty_cells: list[int] = field(default_factory=list)  # cells of `grid` without a token (between a tiled image's views)
    absorbed: bool = False  # the dropped visual tokens were absorbed by kept look-alikes (proportional attention)
    # Views (tiles + the global view) the vision tower ran on, and the image's views: PAR leaves out tiles it drops
    views_encoded: int = 1
    views: int = 1
    family: str = ""  # the model family (llava, qwen2.5-vl, ...)
    notices: list[str] = field(default_factory=list)  # things the user should know (e.g. a clipped question)
    budget_unit: str = "flops"  # what `budget` is a fraction of: the full prefill's FLOPs, or its time here
    time_ratio: float | None = None  # time budgets: predicted prefill time / the full model's (`par_demo.cost`)
    # Rounds, spread and speed-up over the full model timed in the same rounds (`par_demo.timing`); None when the
    # prediction was run once and not timed against anything (then prefill_s / total_s are that one run's).
    timing: Timing | None = None

    @property
    def text(self) -> str:
        """The answer (the library's name for it; `answer` in `to_dict()` and `predict --json`)."""
        return self.answer

    def setting(self, tokens: int | None = None, layers: int | None = None, start_layer: int = 2) -> dict:
        """The `Predictor.generate` arguments that reproduce this prediction (`tokens`/`layers`/`start_layer`: the
        overrides it was asked with)."""
        if self.method == "full":
            return dict(FULL)
        return {"method": self.method, "budget": self.budget, "tokens": tokens, "layers": layers,
                "start_layer": start_layer, "budget_unit": self.budget_unit}

    def with_timing(self, timing: Timing) -> Prediction:
        """This prediction with its one run's times replaced by the medians of `timing` (and `timing` attached)."""
        return dataclasses.replace(self, prefill_s=timing.prefill_s.median, total_s=timing.total_s.median,
                                   timing=timing)

    def to_dict(self) -> dict:
        """Every field as plain JSON values: exactly what `predict --json` prints."""
        data = asdict(self)
        data["grid"] = list(self.grid)
        return data


class Predictor:
    """A loaded model with its engine, FLOPs model and one instance of each method."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.engine = Engine(loaded.model, loaded.family)
        self.flops = FlopsModel.from_config(loaded.config)
        self.methods: dict[str, Method] = {}
        self._time_budget = None  # `par_demo.cost.TimeBudget`, made when a time budget first asks for it
        # The weights as loaded, named before any forward: on a CPU bitsandbytes repacks its 4-bit weights on their
        # first forward, and a key taken after it would miss every cached measurement.
        self._weights = weights_digest(loaded.model)

    def time_budget(self, recalibrate: bool = False, methods: bool = True):
        """The measured prefill cost model of this model as loaded (calibrated, or read from the cache, once).
        `methods=False`: a new calibration leaves each method's own work to be timed when the method is first
        used (the app's warm-up, which then runs every method)."""
        if self._time_budget is None or recalibrate:
            from par_demo.cost import TimeBudget

            self._time_budget = TimeBudget(self, recalibrate, progress=lambda text: print(text, file=sys.stderr),
                                           methods=methods)
        return self._time_budget

    def setting_time(self, method: Method, query, setting) -> float:
        return self.time_budget().setting(method, query, setting)

    def full_time(self, query) -> float:
        return self.time_budget().full(query)

    @property
    def cache_key(self) -> str:
        """Names this model's weights as loaded, so a cached measurement (layer drop's block influence, the cost
        model) is not reused after the model at the same path is retrained."""
        return f"{self.loaded.name}-{self.loaded.quant}-{self._weights}"

    def method(self, name: str) -> Method:
        cls = method_class(name)
        if cls.name not in self.methods:
            self.methods[cls.name] = cls(self)
        return self.methods[cls.name]

    def available_methods(self) -> dict[str, str | None]:
        return {name: self.method(name).available() for name in METHODS}

    def encode(self, image: Image.Image, question: str) -> dict[str, torch.Tensor]:
        return encode_query(self.loaded, image, question)

    def model_view(self, image: Image.Image) -> Image.Image:
        """The image as the model saw it (resized, and cropped where the family crops), aligned with its grid."""
        return self.loaded.family.model_view(self.loaded, image)

    def generate(self, image: Image.Image, question: str, method: str = "full", budget: float = 1.0,
                 tokens: int | None = None, layers: int | None = None, start_layer: int = 2,
                 max_new_tokens: int = 16, stop_at_eos: bool = True, encoded: dict | None = None,
                 budget_unit: str = "flops") -> Answered:
        """Run one query; returns the generation, its (flops, flops_full), where its visual tokens came from and,
        with a time budget, its predicted prefill time against the full model's. `budget_unit`: "flops" (a budget
        is a fraction of the full prefill FLOPs) or "time" (of its predicted time on this machine, `par_demo.cost`).
        `encoded`: `encode(image, question)` done already (timing rounds reuse it; it is outside the timed part)."""
        budget = check_budget(budget)
        check_unit(budget_unit)
        check_max_new_tokens(max_new_tokens)
        chosen = self.method(method)
        reason = chosen.available()
        if reason:
            raise UserError(f"{chosen.name} is unavailable: {reason}")
        if budget >= 1.0 and tokens is None and layers is None:
            # Nothing to prune, nothing to pay: the full model's own path (no router pass, no scores, no mask), so
            # every method at budget 1 is exactly as fast as the model it prunes.
            chosen = self.method("full")
        inputs = encoded if encoded is not None else self.encode(image, question)
        if budget_unit == "time":  # measured (or read from the cache) now, never inside the timed prefill below
            self.time_budget().overhead(chosen)
        planned = {}

        def planner(query):
            plan, planned["setting"] = chosen.plan(query, budget, tokens, layers, start_layer, budget_unit)
            planned["query"] = query
            return plan

        eos = self.loaded.processor.tokenizer.eos_token_id if stop_at_eos else None
        generation = self.engine.generate(inputs, planner, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                          overview_only=chosen.routes_views)
        # What the setting costs, for the record: worked out after the timed run, not inside the planner's time
        query, setting = planned["query"], planned["setting"]
        time_ratio = None
        if budget_unit == "time":
            time_ratio = chosen.setting_cost(query, setting, "time") / chosen.full_cost(query, "time")
        return Answered(generation, chosen.setting_flops(query, setting), self.flops.full(query), query.layout,
                        time_ratio)

    def decode(self, tokens: list[int]) -> str:
        return self.loaded.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def predict(self, image: Image.Image, question: str, method: str = "full", budget: float = 1.0,
                tokens: int | None = None, layers: int | None = None, start_layer: int = 2,
                max_new_tokens: int = 16, rounds: int = 0, budget_unit: str = "flops") -> Prediction:
        """Answer one question under `method` at `budget`. `rounds` > 0: the method and the full model are then
        timed in turns for that many rounds (`par_demo.timing`) and the prediction carries the medians and the
        measured speed-up (`timing`); 0: the times are those of the one run that answered."""
        if not isinstance(rounds, int) or not 0 <= rounds <= 100:
            raise UserError(f"rounds must be a whole number from 0 to 100, got {rounds!r}")
        prediction = self._predict_once(image, question, method, budget, tokens, layers, start_layer, max_new_tokens,
                                        budget_unit)
        if rounds:
            prediction = self._timed(image, question, prediction, rounds, max_new_tokens, tokens, layers, start_layer)
        return prediction

    def _predict_once(self, image: Image.Image, question: str, method: str, budget: float, tokens: int | None,
                      layers: int | None, start_layer: int, max_new_tokens: int,
                      budget_unit: str = "flops") -> Prediction:
        question, notices = clip_question(question)
        generation, flops, flops_full, layout, time_ratio = self.generate(
            image, question, method, budget, tokens, layers, start_layer, max_new_tokens, budget_unit=budget_unit)
        plan = generation.plan
        scores = plan.token_scores if plan.token_scores is not None else generation.attention_to_image
        return Prediction(
            answer=self.decode(generation.tokens),
            method=self.method(method).name,
            budget=float(budget),
            flops=float(flops),
            flops_full=float(flops_full),
            flops_ratio=float(flops / flops_full),
            n_visual_tokens=layout.n_visual,
            kept_visual_tokens=layout.patch_indices(generation.kept_visual),
            grid=layout.grid,
            n_layers=self.engine.n_layers,
            kept_layers=[i for i in range(self.engine.n_layers) if i not in plan.skip_layers],
            start_layer=plan.start_layer,
            prefill_s=generation.prefill_s,
            total_s=generation.total_s,
            new_tokens=len(generation.tokens),
            token_scores=None if scores is None else cell_order(layout, scores),
            layer_scores=None if plan.layer_scores is None else [float(s) for s in plan.layer_scores.float().cpu()],
            kv_cache_bytes=generation.kv_cache_bytes,
            empty_cells=layout.empty_cells(),
            absorbed=plan.kept_sizes is not None,
            views_encoded=generation.views[0],
            views=generation.views[1],
            family=self.loaded.family.name,
            notices=notices,
            budget_unit=budget_unit,
            time_ratio=time_ratio,
        )

    def _timed(self, image: Image.Image, question: str, result: Prediction, rounds: int, max_new_tokens: int,
               tokens: int | None, layers: int | None, start_layer: int) -> Prediction:
        """`result` with its times measured over `rounds` rounds, interleaved with the full model's."""
        if result.method == "full":
            return self.measure(image, question, [result], [dict(FULL)], rounds, max_new_tokens, warm_up=True)[0]
        full = self._predict_once(image, question, "full", 1.0, None, None, 2, max_new_tokens)
        setting = result.setting(tokens, layers, start_layer)
        return self.measure(image, question, [full, result], [dict(FULL), setting], rounds, max_new_tokens,
                            warm_up=True)[1]

    def measure(self, image: Image.Image, question: str, predictions: Sequence[Prediction], settings: Sequence[dict],
                rounds: int = DEFAULT_ROUNDS, max_new_tokens: int = 16, warm_up: bool = False,
                answers_are_a_round: bool = False) -> list[Prediction]:
        """Times answered predictions against each other (the first must be the full model) and returns them with
        their `timing`: `rounds` interleaved rounds (`par_demo.timing`) of `generate` with each one's settings.

        `answers_are_a_round`: the predictions were answered just now, warm, one after another in this order, so
        their own runs already are one round in turns; they count as the first of the `rounds` (a request that
        answers N settings then pays for N x (rounds - 1) more runs, not N x rounds)."""
        if not predictions or predictions[0].method != "full":
            raise ValueError("the first prediction must be the full model's: it is the reference of every speed-up")
        question, _ = clip_question(question)  # exactly the text `predict` answered
        encoded = self.encode(image, question)  # pixels and token ids: the same for every run, and not timed

        def run(setting: dict) -> Sample:
            generation = self.generate(image, question, max_new_tokens=max_new_tokens, encoded=encoded,
                                       **setting).generation
            return generation.prefill_s, generation.total_s

        if answers_are_a_round:
            answered = [[(p.prefill_s, p.total_s)] for p in predictions]
            more = time_interleaved(run, settings, rounds - 1, warm_up) if rounds > 1 else [[] for _ in settings]
            samples = [first + rest for first, rest in zip(answered, more)]
        else:
            samples = time_interleaved(run, settings, rounds, warm_up)
        timings = summarize(samples, [p.flops_ratio for p in predictions])
        return [p.with_timing(t) for p, t in zip(predictions, timings)]


def check_max_new_tokens(max_new_tokens) -> int:
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 1024:
        raise UserError(f"max new tokens must be an integer in [1, 1024], got {max_new_tokens!r}")
    return max_new_tokens


def cell_order(layout: Layout, scores: torch.Tensor) -> list[float]:
    """Per-token scores rearranged into the grid's row-major cell order (what the patch view draws)."""
    cells = torch.full((layout.grid[0] * layout.grid[1],), float("nan"))
    cells[layout.patch_indices(torch.arange(layout.n_visual))] = scores.float().cpu()
    # A tiled image's grid has cells without a token (between the tiles and the global view): None, valid JSON.
    return [None if math.isnan(value) else value for value in cells.tolist()]


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    from par_demo.arguments import add_budget_unit_argument, add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True)
    parser.add_argument("--method", default=None,
                        help=f"one of: {', '.join(METHODS)} (default: par when a budget below 1 or --tokens/--layers "
                             "is given, else full)")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="fraction of the full prefill's FLOPs (or time, with --budget-unit time), in (0, 1]")
    add_budget_unit_argument(parser)
    parser.add_argument("--tokens", type=int, default=None, help="visual tokens kept (overrides the budget)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers kept (overrides the budget)")
    parser.add_argument("--start-layer", type=int, default=2, help="layer K from which visual tokens are dropped")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help="timed rounds, the method and the full model in turns (medians are reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def choose_method(predictor: Predictor, method: str | None, budget: float, tokens: int | None,
                  layers: int | None) -> str:
    """The method to run: the one asked for; else PAR when something is to be pruned, else the full model."""
    if method is not None:
        return method
    if budget >= 1.0 and tokens is None and layers is None:
        return "full"
    reason = predictor.method("par").available()
    if reason:
        choices = ", ".join(name for name in METHODS if name != "full" and not name.startswith("par"))
        raise UserError(f"a budget needs a pruning method, and par is unavailable ({reason}); "
                        f"choose one with --method: {choices}")
    return "par"


def run(args) -> int:
    from par_demo.arguments import predictor_from_args

    # Validate what is cheap to validate before the (slow) model load.
    check_budget(args.budget)
    if args.method is not None:
        method_class(args.method)
    if not args.question.strip():
        raise UserError("the question is empty")
    if not 1 <= args.rounds <= 100:
        raise UserError(f"--rounds must be between 1 and 100, got {args.rounds}")
    image = load_image(args.image)
    predictor = predictor_from_args(args)
    method = choose_method(predictor, args.method, args.budget, args.tokens, args.layers)
    result = predictor.predict(image, args.question, method, args.budget, args.tokens, args.layers,
                               args.start_layer, args.max_new_tokens, rounds=args.rounds,
                               budget_unit=args.budget_unit)
    if args.method is None and method != "full":
        result.notices.append(f"no --method given: {method} was used for the budget")
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        _print_human(result, sys.stdout)
    return 0


def _print_human(p: Prediction, out) -> None:
    for notice in p.notices:
        print(f"note: {notice}", file=out)
    print(f"answer: {p.answer}", file=out)
    unit = "" if p.budget_unit == "flops" else " of the time"
    predicted = "" if p.time_ratio is None else f"  predicted time: {p.time_ratio:.1%} of full"
    print(f"method: {p.method}  budget: {p.budget:g}{unit}  FLOPs: {p.flops_ratio:.1%} of full{predicted}", file=out)
    absorbed = " (the dropped ones absorbed)" if p.absorbed else ""
    print(f"visual tokens kept: {len(p.kept_visual_tokens)}/{p.n_visual_tokens}{absorbed}  "
          f"layers kept: {len(p.kept_layers)}/{p.n_layers}", file=out)
    if p.views_encoded < p.views:
        print(f"vision tower ran on {p.views_encoded} of the image's {p.views} views (the others dropped unseen)",
              file=out)
    t = p.timing
    if t is None:
        print(f"prefill: {p.prefill_s * 1000:.1f} ms  total: {p.total_s * 1000:.1f} ms  new tokens: {p.new_tokens}",
              file=out)
        return
    print(f"prefill: {_ms(t.prefill_s)}  total: {_ms(t.total_s)}  new tokens: {p.new_tokens}  "
          f"(medians of {t.rounds} rounds, min-max in brackets)", file=out)
    if t.prefill_speedup is not None:
        verdict = "  <- noise: above what the FLOPs allow by more than its spread" if t.noise else ""
        print(f"speed-up over full, timed in turns: prefill {_times(t.prefill_speedup)}  total "
              f"{_times(t.total_speedup)}  (FLOPs allow {t.speedup_bound:.2f}x){verdict}", file=out)


def _ms(spread) -> str:
    return f"{spread.median * 1000:.1f} ms ({spread.low * 1000:.1f}-{spread.high * 1000:.1f})"


def _times(spread) -> str:
    return f"{spread.median:.2f}x ({spread.low:.2f}-{spread.high:.2f})"
