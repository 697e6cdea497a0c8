"""The method interface and the budget search every method shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Protocol

import torch

from par_demo.engine import Engine, PruningPlan, Query
from par_demo.errors import BudgetOutOfReach, UserError
from par_demo.flops import FlopsModel
from par_demo.methods.absorb import absorb_flops, absorbed_sizes


class MethodContext(Protocol):
    """What a method may use of the model it prunes (a `Predictor` is one). Methods never see the app or the CLI."""

    loaded: object  # LoadedModel: name, family, processor
    engine: Engine
    flops: FlopsModel
    cache_key: str  # names the model's weights, for measurements cached on disk (layer drop)

    def encode(self, image, question: str) -> dict: ...  # model inputs for calibration queries

    def method(self, name: str) -> "Method": ...  # another method of the same model (par-prior reads layer drop)

    # Time budgets: predicted prefill seconds of a method's setting, and of the full model (`par_demo.cost`)
    def setting_time(self, method: "Method", query: Query, setting: "Setting") -> float: ...

    def full_time(self, query: Query) -> float: ...


@dataclass(frozen=True)
class Setting:
    """How much a plan keeps: `tokens` visual tokens from layer `start_layer` (K) on; the layers in `skip` not run."""

    tokens: int
    skip: frozenset[int]
    start_layer: int = 2


BUDGET_UNITS = ("flops", "time")


def check_unit(unit: str) -> str:
    if unit not in BUDGET_UNITS:
        raise UserError(f"budget unit must be one of: {', '.join(BUDGET_UNITS)}; got {unit!r}")
    return unit


def check_budget(budget: float) -> float:
    if isinstance(budget, bool):  # float(True) is 1.0: a flag passed where a number belongs
        raise UserError(f"budget must be a number in (0, 1], got {budget!r}")
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise UserError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if math.isnan(value) or not 0 < value <= 1:
        raise UserError(f"budget must be in (0, 1], got {budget!r}")
    return value


class Method:
    """Subclasses set `name`, list candidate settings (most expensive first) and turn a setting into a plan."""

    name = "method"
    uses_tokens = False  # accepts an explicit `tokens` override
    uses_layers = False  # accepts an explicit `layers` override
    min_start_layer = 0  # the earliest layer this method can drop tokens at (FastV needs layer K-1's attention)
    # None: a method of the field, always in "compare all". Else the group that "compare all" runs only when asked:
    # "baseline" (a simple reference: random, pooled, layers by a fixed prior) or "ablation" (one part of PAR).
    extra: str | None = None
    # Dropped visual tokens are absorbed by their look-alikes, with proportional attention (`methods/absorb.py`)
    absorbs = False
    # Chooses which views of a tiled image the vision tower runs on: its queries arrive with the overview encoded
    # only (`Engine.prepare(..., overview_only=True)`) and it encodes what it keeps (`Query.encode_views`)
    routes_views = False
    # What the method's measured planning time depends on beyond its code (PAR: its router's files); the cost model
    # measures that time again when it changes
    timing_identity = ""

    def __init__(self, context: MethodContext):
        self.context = context
        self.flops = context.flops
        self.n_layers = context.engine.n_layers

    def available(self) -> str | None:
        """None when usable, else the reason it is not."""
        return None

    # ---- to override
    def candidates(self, query: Query, start_layer: int) -> Iterable[Setting]:
        raise NotImplementedError

    def fixed(self, query: Query, tokens: int | None, layers: int | None, start_layer: int) -> Setting:
        raise UserError(f"{self.name} takes no --tokens/--layers")

    def make_plan(self, query: Query, setting: Setting) -> PruningPlan:
        raise NotImplementedError

    def extra_flops(self, query: Query, setting: Setting) -> float:
        """FLOPs this method adds to the prefill to choose what it keeps (a router, a similarity search)."""
        return 0.0

    def attention_rows(self) -> int:
        return 0

    # ---- shared
    def setting_flops(self, query: Query, setting: Setting) -> float:
        kept = None if setting.tokens >= query.n_visual else setting.tokens
        rows = self.attention_rows() if kept is not None else 0
        extra = self.extra_flops(query, setting)
        if self.absorbs:
            extra += absorb_flops(query.n_visual, setting.tokens, query.image_features.shape[1])
        return self.flops.prefill(query, kept, setting.skip, setting.start_layer, router=extra, attention_rows=rows)

    def setting_cost(self, query: Query, setting: Setting, unit: str = "flops") -> float:
        """What a setting costs in the budget's unit: prefill FLOPs, or predicted prefill seconds on this machine
        (the context's measured cost model, this method's own planning work included)."""
        if unit == "flops":
            return self.setting_flops(query, setting)
        return self.context.setting_time(self, query, setting)

    def full_cost(self, query: Query, unit: str = "flops") -> float:
        return self.flops.full(query) if unit == "flops" else self.context.full_time(query)

    def choose(self, query: Query, budget: float, start_layer: int, unit: str = "flops") -> Setting:
        """The first (most expensive) candidate whose prefill cost (FLOPs, or predicted time) fits the budget.

        Candidates are searched at the requested start layer K first. A budget that no setting meets there (the
        layers before K always see every token) is searched again at K-1, ... down to the method's earliest layer.
        """
        full = self.full_cost(query, unit)
        limit = check_budget(budget) * full * (1 + 1e-9)
        cheapest = None
        for k in range(start_layer, min(self.min_start_layer, start_layer) - 1, -1):
            candidates = list(self.candidates(query, k))
            costs: dict[int, float] = {}

            def cost(i: int) -> float:
                if i not in costs:
                    costs[i] = self.setting_cost(query, candidates[i], unit)
                return costs[i]

            found = self.first_fitting(cost, len(candidates), limit)
            if found is not None:
                return candidates[found]
            cheapest = min([*costs.values()] + ([] if cheapest is None else [cheapest]), default=None)
        raise BudgetOutOfReach(self.name, budget, None if cheapest is None else cheapest / full, unit)

    # Candidates after the first cost less and less (fewer tokens, nothing else changing): the search bisects
    # instead of costing every candidate, a few hundred Python calls saved on every query (`tests/test_methods.py`
    # checks the order on real models). The first candidate (every token kept) is tried on its own.
    monotone_costs = False

    def first_fitting(self, cost: Callable[[int], float], n: int, limit: float) -> int | None:
        """The index of the first of n candidates whose cost fits `limit`, or None (every candidate costed then,
        or with `monotone_costs` both ends, so the cheapest is known for the message)."""
        if n == 0:
            return None
        if not self.monotone_costs:
            return next((i for i in range(n) if cost(i) <= limit), None)
        if cost(0) <= limit:
            return 0
        if n == 1 or cost(n - 1) > limit:
            return None
        low, high = 1, n - 1  # cost(high) fits; the first that fits is in [low, high]
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if cost(middle) <= limit else (middle + 1, high)
        return low

    def plan(self, query: Query, budget: float = 1.0, tokens: int | None = None, layers: int | None = None,
             start_layer: int = 2, unit: str = "flops") -> tuple[PruningPlan, Setting]:
        if tokens is not None and not self.uses_tokens:
            raise UserError(f"{self.name} does not prune tokens; a number of visual tokens to keep applies to: "
                            + ", ".join(methods_that("uses_tokens")))
        if layers is not None and not self.uses_layers:
            raise UserError(f"{self.name} does not skip layers; a number of layers to run applies to: "
                            + ", ".join(methods_that("uses_layers")))
        # a method that reads layer K-1 (FastV) starts at its earliest layer when asked for an earlier one (the page's
        # slider and `compare` give one start layer to every method; random tokens can drop at 0, FastV cannot)
        start_layer = max(check_count(start_layer, 0, self.n_layers, "pruning start layer"), self.min_start_layer)
        if tokens is not None or layers is not None:
            setting = self.fixed(query, tokens, layers, start_layer)
        else:
            setting = self.choose(query, budget, start_layer, unit)
        plan = self.make_plan(query, setting)
        if self.absorbs and plan.keep_visual is not None and 0 < plan.keep_visual.numel() < query.n_visual:
            plan = replace(plan, kept_sizes=absorbed_sizes(query.image_features, plan.keep_visual))
        return plan, setting


def methods_that(flag: str) -> list[str]:
    """The registered methods with this class flag set (`uses_tokens`, `uses_layers`)."""
    from par_demo.methods import REGISTRY  # the registry imports every method, this module among them

    return [name for name, cls in REGISTRY.items() if getattr(cls, flag)]


def check_count(value, low: int, high: int, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be an integer in [{low}, {high}], got {value!r}") from None
    if number != value or not low <= number <= high:
        raise UserError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return number


class TokenMethod(Method):
    """A method that only prunes visual tokens: its settings are token counts, every layer runs."""

    uses_tokens = True

    @property
    def monotone_costs(self) -> bool:
        # fewer tokens cost less, unless absorbing adds cosines that grow as tokens are dropped
        return not self.absorbs

    def candidates(self, query: Query, start_layer: int) -> list[Setting]:
        """All visual tokens kept, then one fewer, ... down to none."""
        return [Setting(t, frozenset(), start_layer) for t in range(query.n_visual, -1, -1)]

    def fixed(self, query: Query, tokens: int | None, layers: int | None, start_layer: int) -> Setting:
        return Setting(check_count(tokens, 0, query.n_visual, "tokens kept"), frozenset(), start_layer)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


@dataclass
class Selection:
    """What a pre-LLM method keeps: visual token indices, new input features for them (merged or pooled tokens; None
    = their own), and a per-token score to show (None = the method has none)."""

    keep: torch.Tensor
    features: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class PreLLMMethod(TokenMethod):
    """Chooses visual tokens before the language model (K = 0) from what the vision path gave: VisionZip, DivPrune,
    CDPruner, downsampling. The start layer asked for does not apply; the method's own work counts in its FLOPs
    (`extra_flops`), and none is done when every token is kept."""

    def plan(self, query, budget=1.0, tokens=None, layers=None, start_layer=2, unit="flops"):
        return super().plan(query, budget, tokens, layers, start_layer=0, unit=unit)

    def select(self, query: Query, tokens: int) -> Selection:
        raise NotImplementedError

    def make_plan(self, query, setting):
        if setting.tokens >= query.n_visual:
            return PruningPlan(start_layer=0)
        device = query.image_positions.device
        if setting.tokens == 0:  # nothing to choose: no work done, none counted
            return PruningPlan(start_layer=0, keep_visual=torch.zeros(0, dtype=torch.long, device=device))
        chosen = self.select(query, setting.tokens)
        return PruningPlan(start_layer=0, keep_visual=chosen.keep.to(device), visual_features=chosen.features,
                           token_scores=chosen.scores)
