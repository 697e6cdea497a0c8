"""Timing the full and the pruned model alike: in the same request, warm, interleaved; medians and their spread.

One timing on a shared CPU varies about 2x from run to run, so a speed-up built from two single timings taken at
different moments (say, the full model's on the first, cold request and the pruned model's now) can be off by 2x
either way. Every speed-up the project reports therefore comes from here: the settings being compared run in
turns (full, pruned, full, pruned, ...) for a few rounds, each figure is the median over the rounds, a speed-up is
the ratio of the medians, and the spread (min–max over the rounds) travels with every figure.

`Predictor.measure` (`par_demo.predict`) applies it to answered predictions (`predict --json`, the app's
`/compare`, `/compare_all` and its sweep, the Python API); `bench` runs the same `time_interleaved` rounds on its
own rows. This module knows nothing of models: it times callables.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_ROUNDS = 5  # embedded model: ~5 x 2 x 40 ms, well under a second per query on 2 CPU cores
# The page times the full model and one setting in turns on every request: as many rounds as fit about half a second
# of runs, so that a slower model or machine still answers within a second, and never fewer than MIN_ROUNDS (the
# median of fewer is one noisy run)
MIN_ROUNDS = 3
ROUNDS_WINDOW_S = 0.5
UNSTEADY = 3.0  # see `Timing.unsteady`
FULL = {"method": "full", "budget": 1.0}  # the reference setting every speed-up is measured against

Sample = tuple[float, float]  # (prefill seconds, total seconds) of one run


def rounds_for(full_s: float) -> int:
    """Timing rounds for a page request on a model whose full run takes `full_s` seconds (a round: the full run and a
    pruned one, which takes at most as long), from MIN_ROUNDS to DEFAULT_ROUNDS."""
    if not full_s > 0:
        return DEFAULT_ROUNDS
    return max(MIN_ROUNDS, min(DEFAULT_ROUNDS, int(ROUNDS_WINDOW_S / (2 * full_s))))


@dataclass(frozen=True)
class Spread:
    """A measured value: the median over the rounds and the lowest and highest round."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float], median: float | None = None) -> Spread:
        middle = statistics.median(values) if median is None else median
        # `low`/`high` always bracket the median, also when the median is a ratio of two other medians.
        return cls(float(middle), float(min(*values, middle)), float(max(*values, middle)))


@dataclass(frozen=True)
class Timing:
    """How long one setting took over `rounds` interleaved rounds, and its speed-up over the full model."""

    rounds: int
    prefill_s: Spread
    total_s: Spread
    prefill_speedup: Spread | None = None  # full / this, per round and of the medians; None for the full model
    total_speedup: Spread | None = None
    speedup_bound: float | None = None  # 1 / FLOPs ratio: the most the saved FLOPs can explain
    # The measured prefill speed-up lies above the FLOPs bound by more than its own spread (even its slowest round
    # beats the bound): that is machine noise, not a result, and is shown as such.
    noise: bool = False

    @property
    def unsteady(self) -> bool:
        """The rounds' prefill speed-ups differ by more than UNSTEADY times and disagree on whether the setting was
        faster at all (some rounds below 1x, some above): the machine's load changed while they ran (a quiet 2-core
        CPU keeps them within about 1.2x), and neither "faster" nor "slower" can be said."""
        s = self.prefill_speedup
        return s is not None and 0 < s.low < 1 < s.high and s.high / s.low > UNSTEADY


def time_interleaved(run: Callable[[dict], Sample], settings: Sequence[dict], rounds: int,
                     warm_up: bool = False) -> list[list[Sample]]:
    """Runs every setting once per round, in turns, for `rounds` rounds; returns each setting's samples.

    Interleaving puts a busy moment of the machine on all settings alike instead of on whichever ran then.
    `warm_up` first runs every setting once untimed (for a process whose model has not run those shapes yet).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if warm_up:
        for setting in settings:
            run(setting)
    samples: list[list[Sample]] = [[] for _ in settings]
    for _ in range(rounds):
        for i, setting in enumerate(settings):
            samples[i].append(run(setting))
    return samples


def summarize(samples: Sequence[Sequence[Sample]], flops_ratios: Sequence[float]) -> list[Timing]:
    """Each setting's `Timing`; the first setting is the full model, the reference of every speed-up."""
    reference = samples[0]
    timings = []
    for i, (own, ratio) in enumerate(zip(samples, flops_ratios)):
        prefill = Spread.of([s[0] for s in own])
        total = Spread.of([s[1] for s in own])
        if i == 0:
            timings.append(Timing(len(own), prefill, total))
            continue
        full_prefill = Spread.of([s[0] for s in reference])
        full_total = Spread.of([s[1] for s in reference])
        prefill_speedup = _speedup(reference, own, 0, full_prefill.median / max(prefill.median, 1e-12))
        total_speedup = _speedup(reference, own, 1, full_total.median / max(total.median, 1e-12))
        bound = 1.0 / max(ratio, 1e-12)
        timings.append(Timing(len(own), prefill, total, prefill_speedup, total_speedup, bound,
                              noise=prefill_speedup.low > bound))
    return timings


def _speedup(reference: Sequence[Sample], own: Sequence[Sample], stage: int, of_medians: float) -> Spread:
    # Per-round ratios pair each run with the full run next to it in time; their range is the speed-up's spread.
    per_round = [full[stage] / max(mine[stage], 1e-12) for full, mine in zip(reference, own)]
    return Spread.of(per_round, median=of_medians)
