"""Measured prefill cost: how long a (visual tokens kept, decoder layers run) split takes on this machine.

FLOPs are exact but they are not time. On a small model a decoder layer costs nearly the same with 20 rows as with
160, and part of every prefill is fixed (vision tower, projector, LM head, per-call overhead); on a GPU a short
sequence leaves the chip idle. So the time of a split is measured, not derived: `calibrate` times a grid of splits
on the model as it is loaded (its dtype, quantization, device and thread count) and fits

    prefill(T, L) = fixed + L * (per_layer + per_row * rows + per_row2 * rows**2),   rows = text tokens + T

by non-negative least squares (T visual tokens kept from the first layer on, L layers run; `per_row2` is
attention's share, which grows with the square of the sequence). Layers before a start layer K see every token:
`predict` charges them at the full row count. A fit is cached on disk per model weights, image options, dtype,
quantization, device (the CPU or GPU by name), thread count, CPU-kernel and allocator choices and torch and
transformers versions (`cost_key`, `load_or_calibrate`); any change measures it again.

Each grid point is the median of a few runs taken in turns with the others (the rule of `par_demo.timing`), timed
as the page times a prefill: from pixels to the first token (`Engine.generate` with one new token).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import nnls

from par_demo import allocator
from par_demo.disk_cache import cache_path, read_json, write_json
from par_demo.engine import Generation, PruningPlan
from par_demo.timing import time_interleaved

CACHE_KIND = "prefill-cost"
FORMAT = 6  # 6: runs after the full model's (`after_full_s`); 5: a method's planning timed inside its runs
# The calibration query: one of the app's examples (a model answers any picture; only its token count matters).
CALIBRATION_QUESTION = "What color is the circle?"


@dataclass(frozen=True)
class PrefillCost:
    """A fitted prefill time model for one query shape (n_visual visual tokens, n_text text tokens)."""

    n_visual: int
    n_text: int
    n_layers: int
    fixed_s: float
    per_layer_s: float
    per_row_s: float
    per_row2_s: float
    key: str = ""  # what it was measured on (`cost_key`)
    points: tuple[tuple[int, int, float], ...] = ()  # the measured grid: (tokens kept, layers run, seconds)
    # Dynamic-resolution models (Qwen2.5-VL): the vision path's time per visual token of another image than the
    # calibration one (`fixed_s` holds the calibration image's); 0 where every image gives the same tokens
    per_visual_s: float = 0.0
    # Absorbing (proportional attention, `methods/absorb.py`): attention with a bias on the kept keys instead of the
    # plain causal kernel costs this much more per layer per row**2 from the start layer on (`absorb_rate`)
    absorb_row2_s: float = 0.0
    # A pruned prefill run right after the full model's (as the page and `bench` time every method: in turns with
    # it) finds the caches holding the full model's weights and activations, and pays this much more than the grid's
    # splits, which run in turns with each other (`after_full_rate`; 0.5 ms of 39 on the default model). Every
    # prediction but the full model's own carries it: the full model after a small run pays nothing measurable.
    after_full_s: float = 0.0
    # Each method's own work (router pass, similarity search, the budget search), which runs inside the timed
    # prefill: seconds beyond the bare split the method chose (`method_overhead`)
    overheads: dict[str, float] = field(default_factory=dict)
    # What each overhead was measured with, where a method has more than its code (`Method.timing_identity`: PAR's
    # router); an overhead whose method now has another one is measured again. None stored: measured before these
    # were kept, taken as it is
    overhead_ids: dict[str, str] = field(default_factory=dict)

    def layer_s(self, rows: int) -> float:
        return self.per_layer_s + self.per_row_s * rows + self.per_row2_s * rows * rows

    def predict(self, tokens: int, layers_run: int, start_layer: int = 0, n_visual: int | None = None,
                n_text: int | None = None, absorbed: bool = False) -> float:
        """Seconds for a prefill keeping `tokens` visual tokens from layer `start_layer` on and running
        `layers_run` layers (those before the start layer are counted among them and see every token). `n_visual`
        / `n_text`: another query's shape (default: the calibration query's). `absorbed`: the kept tokens carry
        proportional attention's bias from the start layer on."""
        n_visual = self.n_visual if n_visual is None else n_visual
        n_text = self.n_text if n_text is None else n_text
        before = min(start_layer, layers_run)
        fixed = self.fixed_s + self.per_visual_s * (n_visual - self.n_visual)
        rows = n_text + min(tokens, n_visual)
        after = self.layer_s(rows) + (self.absorb_row2_s * rows * rows if absorbed and tokens < n_visual else 0.0)
        pruned = self.after_full_s if tokens < n_visual or layers_run < self.n_layers else 0.0
        return fixed + pruned + before * self.layer_s(n_text + n_visual) + (layers_run - before) * after

    def full(self, n_visual: int | None = None, n_text: int | None = None) -> float:
        n_visual = self.n_visual if n_visual is None else n_visual
        return self.predict(n_visual, self.n_layers, 0, n_visual, n_text)

    def to_dict(self) -> dict:
        return asdict(self) | {"format": FORMAT}

    @classmethod
    def from_dict(cls, data: dict) -> PrefillCost | None:
        if data.get("format") != FORMAT:
            return None
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["points"] = tuple(tuple(p) for p in fields.get("points", ()))
        fields["overheads"] = dict(fields.get("overheads", {}))
        fields["overhead_ids"] = dict(fields.get("overhead_ids", {}))
        try:
            return cls(**fields)
        except TypeError:
            return None


def cost_key(predictor) -> str:
    """Everything a measured time depends on: the model's weights (name, quantization and a weight fingerprint),
    its image options, its dtype and device (the processor or GPU by name), the threads torch uses, the CPU kernels
    (oneDNN or stock), the CPU allocator's settings (`par_demo.allocator`) and the torch and transformers versions."""
    import transformers

    from par_demo.bench import cpu_name

    loaded = predictor.loaded
    dtype = str(next(loaded.model.parameters()).dtype).replace("torch.", "")
    kernels = os.environ.get("PAR_DEMO_CPU_KERNELS", "onednn")
    if loaded.device.type == "cpu":
        kernels += f"-malloc-{allocator.mode()}"
    device = loaded.device
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    options = ",".join(f"{k}={v}" for k, v in sorted(loaded.options.items()))
    return (f"{predictor.cache_key}-{options}-{dtype}-{device}-{chip}-threads{torch.get_num_threads()}-{kernels}-"
            f"torch{torch.__version__}-transformers{transformers.__version__}")


def grid(n_visual: int, n_layers: int) -> list[tuple[int, int]]:
    """(tokens kept, layers run) pairs: every combination of five token counts and five layer counts."""
    tokens = sorted({0, n_visual // 8, n_visual // 4, n_visual // 2, n_visual})
    layers = sorted({1, max(1, n_layers // 4), max(1, n_layers // 2), max(1, 3 * n_layers // 4), n_layers})
    return [(t, l) for t in tokens for l in layers]


def split_plan(n_visual: int, n_layers: int, tokens: int, layers_run: int) -> PruningPlan:
    """Evenly spread visual tokens kept from the first layer, the last layers skipped (which ones does not change
    the time: every layer has the same shape)."""
    keep = None if tokens >= n_visual else torch.linspace(0, n_visual - 1, tokens).round().long().unique()
    return PruningPlan(start_layer=0, keep_visual=keep, skip_layers=frozenset(range(layers_run, n_layers)))


def measure_splits(predictor, image, splits: Sequence[tuple[int, int]], rounds: int = 3,
                   progress: Callable[[str], None] | None = None, after_full: bool = False) -> list[float]:
    """Median prefill seconds of each (tokens, layers) split, the splits run in turns for `rounds` rounds.
    `after_full`: each right after a full prefill, as the page and `bench` time them (what `predict` predicts)."""
    engine = predictor.engine
    inputs = predictor.encode(image, CALIBRATION_QUESTION)
    n_visual = engine.prepare(inputs).n_visual
    plans = [split_plan(n_visual, engine.n_layers, t, l) for t, l in splits]
    if after_full:
        plans = [p for plan in plans for p in (PruningPlan(), plan)]
    if progress:
        progress(f"timing {len(splits)} prefill splits x {rounds} rounds" + (", each after a full one" * after_full))
    samples = time_interleaved(plan_runner(engine, inputs), plans, rounds, warm_up=True)
    medians = [statistics.median(s[0] for s in own) for own in samples]
    return medians[1::2] if after_full else medians


def plan_runner(engine, inputs: dict) -> Callable[[PruningPlan], tuple[float, float]]:
    """One prefill (and first token) of `inputs` under a fixed plan, as `time_interleaved` runs it: (prefill s,
    total s)."""

    def run(plan: PruningPlan) -> tuple[float, float]:
        generation = engine.generate(inputs, lambda query: plan, max_new_tokens=1)
        return generation.prefill_s, generation.total_s

    return run


def fit(points: Sequence[tuple[int, int, float]], n_visual: int, n_text: int, n_layers: int,
        key: str = "") -> PrefillCost:
    """Non-negative least squares of the model in the module docstring on measured (tokens, layers, seconds),
    weighted by 1/seconds so that short splits count as much as long ones (the error that matters is relative)."""
    rows = np.array([n_text + t for t, _, _ in points], dtype=float)
    layers = np.array([l for _, l, _ in points], dtype=float)
    seconds = np.array([s for _, _, s in points], dtype=float)
    features = np.stack([np.ones_like(rows), layers, layers * rows, layers * rows ** 2], axis=1)
    weights = 1.0 / np.maximum(seconds, 1e-9)
    scale = features.max(axis=0)  # columns of similar size: nnls is better conditioned
    coef, _ = nnls(features * weights[:, None] / scale, seconds * weights)
    fixed, per_layer, per_row, per_row2 = (coef / scale).tolist()
    return PrefillCost(n_visual, n_text, n_layers, fixed, per_layer, per_row, per_row2, key,
                       tuple((int(t), int(l), float(s)) for t, l, s in points))


CALIBRATION_SIDE = 448  # px: what `bench` runs by default (a fixed-size model resizes it to its own size anyway)


def calibration_image(side: int = CALIBRATION_SIDE):
    from par_demo.images import load_image
    from par_demo.models import PROJECT_ROOT

    return load_image(PROJECT_ROOT / "assets" / "examples" / "shapes_color.png").resize((side, side))


def calibrate(predictor, image=None, rounds: int = 3, progress: Callable[[str], None] | None = None,
              methods: bool = True) -> PrefillCost:
    """Time the grid of splits on this model as loaded and fit the cost model (no cache); with `methods`, also each
    available method's own work (else `TimeBudget` times a method when it is first used)."""
    image = image if image is not None else calibration_image()
    query = predictor.engine.prepare(predictor.encode(image, CALIBRATION_QUESTION))
    n_layers = predictor.engine.n_layers
    splits = grid(query.n_visual, n_layers)
    seconds = measure_splits(predictor, image, splits, rounds, progress)
    fitted = fit([(t, l, s) for (t, l), s in zip(splits, seconds)], query.n_visual, query.n_text, n_layers,
                 cost_key(predictor))
    fitted = dataclasses.replace(fitted, per_visual_s=vision_rate(predictor, fitted, rounds, progress),
                                 absorb_row2_s=absorb_rate(predictor, fitted, image, rounds, progress),
                                 after_full_s=after_full_rate(predictor, fitted, image, rounds, progress))
    if not methods:
        return fitted
    if progress:
        progress("timing each method's own work")
    available = [name for name, reason in predictor.available_methods().items() if reason is None]
    overheads = {name: method_overhead(predictor, fitted, name, image) for name in available}
    ids = {name: predictor.method(name).timing_identity for name in available}
    return dataclasses.replace(fitted, overheads=overheads, overhead_ids={k: v for k, v in ids.items() if v})


def vision_rate(predictor, fitted: PrefillCost, rounds: int = 3,
                progress: Callable[[str], None] | None = None) -> float:
    """Seconds per visual token of the part of the prefill the grid cannot vary (vision tower, projector): the full
    prefill of a half-size image, timed, against the fit's prediction for it. 0 when the model gives every image the
    same number of tokens (its tower's cost does not change)."""
    small = calibration_image(CALIBRATION_SIDE // 2)
    query = predictor.engine.prepare(predictor.encode(small, CALIBRATION_QUESTION))
    if query.n_visual == fitted.n_visual:
        return 0.0
    if progress:
        progress("timing the full prefill of a half-size image (the vision path's share)")
    full = measure_splits(predictor, small, [(query.n_visual, fitted.n_layers)], rounds)[0]
    decoder = fitted.n_layers * fitted.layer_s(query.n_text + query.n_visual)
    return max(0.0, (fitted.fixed_s + decoder - full) / (fitted.n_visual - query.n_visual))


def absorb_rate(predictor, fitted: PrefillCost, image, rounds: int = 3,
                progress: Callable[[str], None] | None = None) -> float:
    """Seconds per layer per row**2 that proportional attention's bias adds: half the visual tokens through every
    layer, with and without a bias on the kept keys, timed in turns. Attention with a bias cannot use the plain
    causal kernel, so the extra grows with the square of the sequence."""
    engine = predictor.engine
    inputs = predictor.encode(image, CALIBRATION_QUESTION)
    kept = fitted.n_visual // 2
    if kept < 1:
        return 0.0
    plain = split_plan(fitted.n_visual, fitted.n_layers, kept, fitted.n_layers)
    biased = dataclasses.replace(plain, kept_sizes=torch.full((plain.keep_visual.numel(),), 2.0))
    if progress:
        progress("timing absorbing's attention bias")
    without, with_bias = time_interleaved(plan_runner(engine, inputs), [plain, biased], max(rounds, 5), warm_up=True)
    extra = statistics.median(s[0] for s in with_bias) - statistics.median(s[0] for s in without)
    rows = fitted.n_text + plain.keep_visual.numel()
    return max(0.0, extra / (fitted.n_layers * rows * rows))


def after_full_rate(predictor, fitted: PrefillCost, image, rounds: int = 3,
                    progress: Callable[[str], None] | None = None) -> float:
    """Seconds a pruned prefill takes more right after the full model's prefill than right after its own (a quarter
    of the visual tokens through half the layers, the median of paired rounds): what `after_full_s` adds."""
    split = split_plan(fitted.n_visual, fitted.n_layers, fitted.n_visual // 4, max(1, fitted.n_layers // 2))
    if progress:
        progress("timing a pruned prefill right after the full one")
    run = plan_runner(predictor.engine, predictor.encode(image, CALIBRATION_QUESTION))
    _, after_full, after_itself = time_interleaved(run, [PruningPlan(), split, split], max(rounds, 7), warm_up=True)
    return max(0.0, statistics.median(a[0] - b[0] for a, b in zip(after_full, after_itself)))


# A cached fit whose full prefill is this far off a fresh timing is measured again. A calibration taken while the
# machine was busy (one of this project's read 0.36 s of fixed cost for a 40 ms prefill) would otherwise make every
# time budget wrong for as long as the cache lives (it was 10x off). A machine that changed speed does it too, more
# quietly: this project's 2-core AMD EPYC ran the default model's full prefill in 68 ms for its first 20 minutes and
# in 46 ms after, and the shares did not scale alike (fixed part 8.2 -> 9.3 % of the full prefill, PAR's planning
# 3.0 -> 4.5 %), so the old fit let PAR's time-0.25 splits overrun. From one process to the next the same machine
# drifts about 1.1x (`par_demo.allocator`'s settings; 1.4x with glibc's default allocator).
STALE = 1.25


def cache_drift(predictor, cost: PrefillCost, rounds: int = 3) -> float:
    """The full prefill of the calibration query, timed now (median of `rounds` after a warm-up run), over the cached
    fit's prediction for it."""
    run = plan_runner(predictor.engine, predictor.encode(calibration_image(), CALIBRATION_QUESTION))
    run(PruningPlan())
    measured = statistics.median(run(PruningPlan())[0] for _ in range(rounds))
    predicted = cost.full()
    return measured / predicted if predicted > 0 else math.inf


def load_or_calibrate(predictor, recalibrate: bool = False, progress: Callable[[str], None] | None = None,
                      methods: bool = True) -> tuple[PrefillCost, bool]:
    """(the cost model of this model as loaded, whether it came from the cache). Measured and cached when there is
    none for exactly this model, dtype, quantization, device, thread count, kernels and torch, when the cached one
    is more than `STALE` times off a full prefill timed now, or when asked."""
    key = cost_key(predictor)
    path = cache_path(CACHE_KIND, key)
    if not recalibrate:
        cached = read_json(path)
        cost = PrefillCost.from_dict(cached) if cached else None
        if cost is not None and cost.key == key and cost.n_layers == predictor.engine.n_layers:
            off = cache_drift(predictor, cost)
            if 1 / STALE <= off <= STALE:
                return cost, True
            if progress:
                progress(f"the cached cost model is {off:.2f}x off this machine's full prefill now: measuring it again")
    cost = calibrate(predictor, progress=progress, methods=methods)
    write_json(path, cost.to_dict())
    return cost, False


def check_grid(n_visual: int, n_layers: int) -> list[tuple[int, int]]:
    """Splits between the calibration grid's points, to test the fit where it was not measured."""
    tokens = sorted({max(1, n_visual // 3), max(1, 2 * n_visual // 3), max(1, 3 * n_visual // 8)})
    layers = sorted({max(1, n_layers // 3), max(1, 2 * n_layers // 3), max(1, n_layers - 1)})
    return [(t, l) for t in tokens for l in layers]


def relative_errors(cost: PrefillCost, points: Sequence[tuple[int, int, float]]) -> list[float]:
    """|predicted - measured| / measured for each (tokens, layers, seconds)."""
    return [abs(cost.predict(t, l) - s) / s for t, l, s in points if s > 0 and not math.isnan(s)]


def method_overhead(predictor, fitted: PrefillCost, name: str, image=None, rounds: int = 3) -> float:
    """Seconds a method's prefill takes beyond the bare split it chose: its planning (a router pass, a similarity
    search, the budget search) and what its plan adds inside the prefill (FastV's attention row and top-k). Measured
    at FLOPs budgets 0.5 and 0.25 on the calibration query, the mean of the two, never below 0; 0 for the full model.

    A plan that names its whole split (the visual tokens kept, their sizes and merged features, the layers skipped)
    leaves the prefill exactly the bare split's work, which the fit predicts (absorbing's bias included:
    `absorb_row2_s`): its overhead is the planner's own time, timed inside each run (`Generation.plan_s`), the median
    of the rounds (three: a planner's time varies little; the app's warm-up times every method this way). Taken as
    the difference of two whole prefills instead, it carries their noise (on the 576-token model, +-1 ms on PAR's
    2.4 ms). A plan that leaves work to the prefill (`keep_visual_count`: tokens chosen there from attention scores)
    runs in turns with the bare split it ended with (`prefill_work`).

    Either way against the bare split, not against `fitted`'s prediction for it, whose error at that split would be
    charged to the method at every split it considers; and each run right after the full model's, as the page and
    `bench` time a method (a router's weights are then out of the caches too: PAR's planning on the default model
    took 2.0-2.2 ms run after itself, 2.4 ms right after the full model). A method that chooses which views of a
    tiled image are encoded (`routes_views`) encodes fewer views than a replay would, and its planner runs the tower:
    on a tiled calibration image it is measured against the prediction."""
    from par_demo.errors import BudgetOutOfReach

    if name == "full":
        return 0.0
    image = image if image is not None else calibration_image()
    inputs = predictor.encode(image, CALIBRATION_QUESTION)

    def generate(budget: float):
        return predictor.generate(image, CALIBRATION_QUESTION, name, budget, max_new_tokens=1,
                                  encoded=inputs).generation

    extra = []
    for budget in (0.5, 0.25):
        try:  # the first run warms up (and makes any one-time measurement)
            chosen = generate(budget)
        except BudgetOutOfReach:
            continue
        kept, skip, start, plan = chosen.kept_visual, chosen.plan.skip_layers, chosen.plan.start_layer, chosen.plan
        n_kept = int(kept.numel())
        replay = plan_runner(predictor.engine, inputs)

        def after_full() -> Generation:  # the method's run right after the full model's, as the page times it
            replay(PruningPlan())
            return generate(budget)

        if predictor.method(name).routes_views and chosen.views[1] > 1:  # views of a tiled image chosen
            own = [after_full().prefill_s for _ in range(rounds)]
            predicted = fitted.predict(n_kept, fitted.n_layers - len(skip), start if n_kept < fitted.n_visual else 0,
                                       absorbed=plan.kept_sizes is not None)
            extra.append(statistics.median(own) - predicted)
        elif plan.keep_visual_count is None:  # the split is the plan's: only the planning is the method's
            extra.append(statistics.median(after_full().plan_s for _ in range(rounds)))
        else:
            extra.append(prefill_work(lambda: generate(budget), replay, plan, kept, rounds + 2))  # noisier
    return max(0.0, statistics.fmean(extra)) if extra else 0.0


def prefill_work(generate, replay, plan: PruningPlan, kept: torch.Tensor, rounds: int) -> float:
    """A method whose plan leaves work to the prefill: its runs against the bare split it ended with (the tokens the
    prefill chose kept from the same layer, the same layers skipped), each right after the full model's."""
    bare = PruningPlan(start_layer=plan.start_layer, skip_layers=plan.skip_layers, keep_visual=kept)

    def run(setting: str) -> tuple[float, float]:
        if setting != "own":
            return replay(bare if setting == "bare" else PruningPlan())
        generation = generate()
        return generation.prefill_s, generation.total_s

    # paired: the runs of a round saw the same moment of the machine
    _, own, _, replayed = time_interleaved(run, ["full", "own", "full", "bare"], rounds, warm_up=True)
    return statistics.median(o[0] - r[0] for o, r in zip(own, replayed))


class TimeBudget:
    """Predicted prefill seconds of any method's setting on one model as loaded: the fitted cost model plus the
    method's own work (measured with the grid; a method that became available since, e.g. PAR after a router was
    trained, is timed on first use)."""

    def __init__(self, predictor, recalibrate: bool = False, progress: Callable[[str], None] | None = None,
                 methods: bool = True):
        self.predictor = predictor
        self.cost, self.cached = load_or_calibrate(predictor, recalibrate, progress, methods)
        self.overheads = dict(self.cost.overheads)
        self.overhead_ids = dict(self.cost.overhead_ids)

    def full(self, query) -> float:
        """The full model's predicted prefill on this query's whole image (a query cut down to some views keeps the
        whole image's counts in `whole`: budgets stay fractions of the full model's time, as of its FLOPs)."""
        shape = getattr(query, "whole", None) or query
        return self.cost.full(shape.n_visual, shape.n_text)

    def setting(self, method, query, setting) -> float:
        layers_run = self.cost.n_layers - len(setting.skip)
        return self.overhead(method) + self.cost.predict(setting.tokens, layers_run, setting.start_layer,
                                                         query.n_visual, query.n_text, absorbed=method.absorbs)

    def overhead(self, method) -> float:
        name, identity = method.name, method.timing_identity
        measured_with = self.overhead_ids.get(name)
        if name not in self.overheads or (measured_with is not None and measured_with != identity):
            # measured once (again for a router of PAR's retrained since), kept with the fit for the next process
            self.overheads[name] = method_overhead(self.predictor, self.cost, name)
            self.overhead_ids[name] = identity
            self.cost = dataclasses.replace(self.cost, overheads=dict(self.overheads),
                                            overhead_ids={k: v for k, v in self.overhead_ids.items() if v})
            write_json(cache_path(CACHE_KIND, self.cost.key), self.cost.to_dict())
        return self.overheads[name]
