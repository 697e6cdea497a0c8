"""The one timing helper: settings run in turns, medians, spread, speed-up of medians, and the noise flag.

Nothing here measures speed: the samples are made up, so each rule is checked exactly.
"""

from __future__ import annotations

import pytest

from par_demo import panels
from par_demo.timing import Spread, Timing, summarize, time_interleaved


def test_settings_run_in_turns_for_every_round():
    order = []

    def run(setting):
        order.append(setting["name"])
        return 0.01, 0.02

    samples = time_interleaved(run, [{"name": "full"}, {"name": "pruned"}], rounds=3, warm_up=True)
    assert order == ["full", "pruned"] + ["full", "pruned"] * 3  # one untimed warm-up pass, then in turns
    assert [len(s) for s in samples] == [3, 3]


def test_speedup_is_the_ratio_of_medians_with_the_per_round_range():
    full = [(0.10, 0.20), (0.12, 0.22), (0.30, 0.40)]  # one slow round: the median ignores it
    pruned = [(0.05, 0.10), (0.06, 0.12), (0.05, 0.11)]
    reference, timed = summarize([full, pruned], [1.0, 0.5])
    assert reference.prefill_speedup is None and reference.prefill_s == Spread(0.12, 0.10, 0.30)
    assert timed.rounds == 3 and timed.prefill_s == Spread(0.05, 0.05, 0.06)
    assert timed.prefill_speedup.median == pytest.approx(0.12 / 0.05)
    assert timed.prefill_speedup.low == pytest.approx(0.10 / 0.05) and timed.prefill_speedup.high == pytest.approx(6)
    assert timed.speedup_bound == pytest.approx(2.0)
    assert not timed.noise  # 2.4x at a 2x bound, but the slowest round (2.0x) is within it


def test_a_speedup_above_the_flops_bound_by_more_than_its_spread_is_noise():
    full = [(0.10, 0.2)] * 3
    pruned = [(0.02, 0.1), (0.025, 0.1), (0.03, 0.1)]  # 3.3x-5x every round, with FLOPs that allow 2x
    _, timed = summarize([full, pruned], [1.0, 0.5])
    assert timed.noise
    assert "noise" in panels.speedup_text(timed) and "faster" not in panels.speedup_text(timed)


def test_the_page_shows_each_time_with_its_spread():
    timing = Timing(5, Spread(0.021, 0.019, 0.024), Spread(0.05, 0.04, 0.06), Spread(1.9, 1.7, 2.1),
                    Spread(1.5, 1.4, 1.6), 2.0)
    assert panels.spread_seconds(timing.prefill_s) == "21 ms (19–24)"
    assert panels.speedup_text(timing) == "1.90× (1.70–2.10) faster"


def test_measure_needs_the_full_model_first(predictor, scene):
    pruned = predictor.predict(scene, "What color is the circle?", "fastv", 0.5, max_new_tokens=2)
    with pytest.raises(ValueError, match="full model"):
        predictor.measure(scene, "What color is the circle?", [pruned], [{"method": "fastv", "budget": 0.5}])


def test_measure_replaces_single_run_times_by_medians(predictor, scene):
    question = "What color is the circle?"
    full = predictor.predict(scene, question, "full", 1.0, max_new_tokens=2)
    pruned = predictor.predict(scene, question, "random", 0.5, max_new_tokens=2)
    timed_full, timed = predictor.measure(scene, question, [full, pruned],
                                          [{"method": "full", "budget": 1.0}, {"method": "random", "budget": 0.5}],
                                          rounds=3, max_new_tokens=2)
    assert timed.answer == pruned.answer and timed.kept_visual_tokens == pruned.kept_visual_tokens
    assert timed.prefill_s == timed.timing.prefill_s.median and timed.timing.rounds == 3
    assert timed_full.timing.prefill_speedup is None and timed.timing.prefill_speedup is not None


def test_answers_given_just_now_count_as_the_first_timing_round(predictor, scene):
    question = "What color is the circle?"
    full = predictor.predict(scene, question, "full", 1.0, max_new_tokens=2)
    pruned = predictor.predict(scene, question, "random", 0.5, max_new_tokens=2)
    calls = []
    real_generate = predictor.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["method"])
        return real_generate(*args, **kwargs)

    predictor.generate = counted
    try:
        timed_full, timed = predictor.measure(scene, question, [full, pruned],
                                              [{"method": "full", "budget": 1.0}, {"method": "random", "budget": 0.5}],
                                              rounds=3, max_new_tokens=2, answers_are_a_round=True)
    finally:
        del predictor.generate
    assert calls == ["full", "random"] * 2  # two more rounds in turns: the answers were the first
    assert timed.timing.rounds == timed_full.timing.rounds == 3
    assert timed_full.timing.prefill_s.low <= full.prefill_s <= timed_full.timing.prefill_s.high  # one of the three


def test_the_page_marks_noise_and_says_why_in_one_line(predictor, scene):
    import dataclasses

    pruned = predictor.predict(scene, "What color is the circle?", "random", 0.5, max_new_tokens=2)
    noisy = Timing(5, Spread(0.02, 0.02, 0.03), Spread(0.03, 0.03, 0.04), Spread(4.0, 3.0, 5.0),
                   Spread(3.0, 2.5, 3.5), 2.0, noise=True)
    text = panels.timing_markdown(dataclasses.replace(pruned, timing=noisy))
    assert "⚠ 4.00× (3.00–5.00): noise" in text and text.endswith(panels.NOISE_NOTE)
    assert "faster" not in text.split("·")[0]  # the prefill figure is not presented as a result


def test_rounds_that_disagree_more_than_three_times_are_marked_unsteady(predictor, scene):
    import dataclasses

    pruned = predictor.predict(scene, "What color is the circle?", "random", 0.5, max_new_tokens=2)
    busy = Timing(5, Spread(0.2, 0.02, 2.0), Spread(0.3, 0.03, 3.0), Spread(0.37, 0.07, 11.1),
                  Spread(0.4, 0.1, 9.0), 2.0)  # a machine whose load came and went: 0.07x to 11x
    steady = dataclasses.replace(busy, prefill_speedup=Spread(1.9, 1.7, 2.1))
    wide = dataclasses.replace(busy, prefill_speedup=Spread(1.6, 1.2, 4.8))  # every round faster: it was, by how much
    assert busy.unsteady and not busy.noise and not steady.unsteady and not wide.unsteady
    text = panels.timing_markdown(dataclasses.replace(pruned, timing=busy))
    assert "⚠ 0.37× (0.07–11.10): unsteady" in text and text.endswith(panels.UNSTEADY_NOTE)
    assert panels.UNSTEADY_NOTE not in panels.timing_markdown(dataclasses.replace(pruned, timing=steady))


def test_page_rounds_fit_half_a_second_of_runs_and_never_fall_below_three():
    from par_demo.timing import DEFAULT_ROUNDS, MIN_ROUNDS, rounds_for

    assert rounds_for(0.040) == DEFAULT_ROUNDS  # the 128-wide default: 5 rounds of full + pruned in 0.4 s
    assert rounds_for(0.080) == MIN_ROUNDS  # twice as slow: 3 rounds
    assert rounds_for(2.0) == MIN_ROUNDS and rounds_for(0.0) == DEFAULT_ROUNDS
