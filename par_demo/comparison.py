"""Every method at one budget on one query, then all of them timed together with the full model.

One generator, `compare_methods`, serves the library (`Pruner.compare`) and the app's "Compare all methods"
(`DemoService.compare_all`, which streams each state to the page as it comes). It is handed the two model calls it
makes, so the app can run them behind its lock (and in a ZeroGPU worker) and the library directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from par_demo import timing
from par_demo.errors import UserError
from par_demo.methods import METHODS, REGISTRY

if TYPE_CHECKING:
    from PIL import Image

    from par_demo.predict import Prediction

# The full model and every method in turns: the answering pass is the first round, two more follow. Each method
# costs `rounds` runs, so a request that compares six settings stays short.
COMPARE_ALL_ROUNDS = 3
# The methods of the field; the simple baselines and PAR's ablations (`Method.extra`) run only when named.
FIELD_METHODS: tuple[str, ...] = tuple(n for n in METHODS if n != "full" and REGISTRY[n].extra is None)


@dataclass
class AllMethods:
    """Every method at one budget, filled in as each finishes; `timed` once all were timed together."""

    question: str
    budget: float
    full: Prediction
    results: dict[str, Prediction] = field(default_factory=dict)  # method -> prediction, in the order asked
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it did not run (unavailable, out of reach)
    pending: list[str] = field(default_factory=list)
    timed: bool = False
    notices: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # extra methods (baselines, ablations) not asked for
    model_view: Image.Image | None = None  # the image as the model saw it (the app draws the kept patches on it)

    def to_dict(self) -> dict:
        """The `/compare_all` reply (and the page's download): every entry has exactly the `predict --json` keys."""
        return {
            "question": self.question, "budget": self.budget, "full": self.full.to_dict(),
            "methods": [p.to_dict() for p in self.results.values()],
            "skipped": [{"method": name, "reason": reason} for name, reason in self.skipped.items()],
            "notices": list(self.notices), "left_out": list(self.left_out),
        }


Run = Callable[..., "Prediction"]  # run(method=..., budget=..., start_layer=...) -> an answered prediction
Measure = Callable[[list, list], list]  # measure(predictions, settings) -> the same predictions, timed in turns


def compare_methods(run: Run, measure: Measure, question: str, budget: float, names: Sequence[str],
                    unavailable: dict[str, Any], start_layer: int = 2, unit: str = "flops") -> Iterator[AllMethods]:
    """Yields the state after the full model answers, after each method answers, and once more after all were
    timed together (`measure`, whose first round is the answering pass: the full model and the methods ran one
    after another, warm, in this order). A method that is unavailable (`unavailable[name]` says why), cannot
    reach the budget or refuses the setting is listed in `skipped` with the reason; the others go on."""
    full = run(**timing.FULL)
    state = AllMethods(question, budget, full, skipped={n: unavailable[n] for n in names if unavailable.get(n)})
    state.pending = [n for n in names if n not in state.skipped]
    yield state
    settings = {}
    for name in list(state.pending):
        settings[name] = {"method": name, "budget": budget, "start_layer": start_layer, "budget_unit": unit}
        try:
            state.results[name] = run(**settings[name])
        except UserError as exc:  # one method cannot go this low, or refuses this setting: say so, go on
            state.skipped[name] = str(exc)
        state.pending.remove(name)
        yield state
    ran = list(state.results)
    timed = measure([full] + [state.results[n] for n in ran], [dict(timing.FULL)] + [settings[n] for n in ran])
    state.full, state.results = timed[0], dict(zip(ran, timed[1:]))
    state.timed = True
    yield state
