"""The measured prefill cost model (`par_demo.cost`): the fit recovers known costs, layers before the start layer
are charged at the full row count, and a cached fit is reused only for exactly the model, dtype and threads it was
measured on. (How well it predicts real time is measured with `python -m par_demo calibrate`, not asserted here.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from par_demo import cost
from par_demo.models import load_model
from par_demo.predict import Predictor


def test_the_fit_recovers_the_terms_of_a_known_cost():
    truth = cost.PrefillCost(144, 20, 12, fixed_s=3e-3, per_layer_s=2e-4, per_row_s=3e-6, per_row2_s=1e-9)
    points = [(t, l, truth.predict(t, l)) for t, l in cost.grid(144, 12)]
    fitted = cost.fit(points, 144, 20, 12)
    for name in ("fixed_s", "per_layer_s", "per_row_s", "per_row2_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-4, abs=1e-12)
    assert max(cost.relative_errors(fitted, [(t, l, truth.predict(t, l)) for t, l in cost.check_grid(144, 12)])) < 1e-6


def test_layers_before_the_start_layer_see_every_token():
    model = cost.PrefillCost(100, 10, 8, fixed_s=1.0, per_layer_s=0.0, per_row_s=0.01, per_row2_s=0.0)
    assert model.predict(0, 8) == pytest.approx(1.0 + 8 * 0.1)  # text rows only from layer 0
    assert model.predict(0, 8, start_layer=2) == pytest.approx(1.0 + 2 * 1.1 + 6 * 0.1)
    assert model.full() == pytest.approx(1.0 + 8 * 1.1)
    assert model.predict(50, 4, n_visual=200, n_text=30) == pytest.approx(1.0 + 4 * 0.8)  # another query's shape


def test_absorbed_tokens_pay_the_attention_bias_on_the_layers_after_the_start_layer():
    model = cost.PrefillCost(100, 10, 8, fixed_s=1.0, per_layer_s=0.0, per_row_s=0.01, per_row2_s=0.0,
                             absorb_row2_s=1e-4)
    plain = model.predict(40, 8, start_layer=2)
    assert model.predict(40, 8, start_layer=2, absorbed=True) == pytest.approx(plain + 6 * 1e-4 * 50 ** 2)
    assert model.predict(100, 8, absorbed=True) == model.full()  # nothing dropped, nothing absorbed


def test_a_cached_fit_is_reused_only_for_the_same_model_dtype_and_threads(monkeypatch, tmp_path, random_models):
    monkeypatch.setenv("PAR_DEMO_CACHE", str(tmp_path))
    tiny = Predictor(random_models("llava-tiny"))
    fitted, cached = cost.load_or_calibrate(tiny)  # really timed: 25 splits of the tiny model
    assert not cached and len(fitted.points) == len(cost.grid(fitted.n_visual, fitted.n_layers))
    assert all(seconds > 0 for _, _, seconds in fitted.points) and fitted.full() > 0

    measured = []
    real_calibrate = cost.calibrate

    def counted(*args, **kwargs):
        measured.append(1)
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr(cost, "calibrate", counted)
    # the key alone decides here (a tiny model's sub-millisecond timings drift; the staleness check has its own test)
    monkeypatch.setattr(cost, "cache_drift", lambda *a, **k: 1.0)
    again, cached = cost.load_or_calibrate(tiny)
    assert cached and again == fitted and not measured

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not cost.load_or_calibrate(tiny)[1] and len(measured) == 1
    finally:
        torch.set_num_threads(threads)
    assert cost.load_or_calibrate(tiny)[1] and len(measured) == 1  # back to the first thread count: its fit

    other = Predictor(random_models("qwen2.5-vl-tiny"))
    assert not cost.load_or_calibrate(other)[1] and len(measured) == 2
    bf16 = Predictor(load_model("random:llava-tiny", device="cpu", dtype="bf16"))  # the same draw, in bf16
    assert cost.cost_key(bf16) != cost.cost_key(tiny)
    assert not cost.load_or_calibrate(bf16)[1] and len(measured) == 3
    assert cost.load_or_calibrate(tiny)[1] and len(measured) == 3  # fp32 again: its fit
    assert not cost.load_or_calibrate(tiny, recalibrate=True)[1] and len(measured) == 4


def test_a_method_timed_after_the_fit_is_kept_in_the_cache(monkeypatch, tmp_path, random_models):
    monkeypatch.setenv("PAR_DEMO_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "cache_drift", lambda *a, **k: 1.0)  # a tiny model's timing noise must not refit
    predictor = Predictor(random_models("llava-tiny"))
    budget = cost.TimeBudget(predictor)
    del budget.overheads["fastv"]  # as if fastv had not been available when the fit was made
    seconds = budget.overhead(predictor.method("fastv"))
    assert cost.TimeBudget(predictor).overheads["fastv"] == seconds  # read back, not measured again


def test_pars_cached_planning_time_is_measured_again_for_another_router(monkeypatch, tmp_path, random_models):
    """PAR's planning time depends on its router (width, pooling, token selection): kept in the cost model's cache
    with a digest of the router's files, it is measured again when they change, and read back while they do not."""
    from par_demo.router import MetaRouter, RouterConfig, fingerprint, save_router

    monkeypatch.setenv("PAR_DEMO_CACHE", str(tmp_path / "cache"))
    predictor = Predictor(random_models("llava-tiny"))
    measured = []
    monkeypatch.setattr(cost, "method_overhead", lambda predictor, fitted, name, *a, **k: measured.append(name) or 1e-3)
    monkeypatch.setattr(cost, "cache_drift", lambda *a, **k: 1.0)  # a tiny model's timing noise must not refit

    def use_router(width: int):
        torch.manual_seed(width)
        config = RouterConfig(lm_width=64, n_layers=6, width=width, heads=1, start_layer=0,
                              model=fingerprint(predictor.loaded))
        predictor.router_path = save_router(MetaRouter(config), tmp_path / f"router-{width}")
        predictor.methods.clear()
        return predictor.method("par")

    par = use_router(16)
    assert par.available() is None and par.timing_identity
    cost.TimeBudget(predictor).overhead(par)
    assert measured.count("par") == 1  # the fit's own measurement of the available methods
    assert cost.TimeBudget(predictor).overhead(par) == 1e-3 and measured.count("par") == 1  # read back
    retrained = use_router(32)
    assert retrained.available() is None and retrained.timing_identity != par.timing_identity
    cost.TimeBudget(predictor).overhead(retrained)
    assert measured.count("par") == 2 and measured.count("fastv") == 1  # PAR alone, measured again
    cost.TimeBudget(predictor).overhead(retrained)
    assert measured.count("par") == 2


def test_a_methods_overhead_is_its_own_work_whatever_the_fits_error(monkeypatch, random_models):
    """A method's overhead is timed against the same split run bare, so a fit that is off at that split does not
    make the method look slower: here `random` is given 20 ms of planning, and a fit that is 30 ms too low."""
    import time

    predictor = Predictor(random_models("llava-tiny"))
    method = predictor.method("random")
    plain = type(method).plan

    def slow_plan(self, *args, **kwargs):
        time.sleep(0.02)
        return plain(self, *args, **kwargs)

    monkeypatch.setattr(type(method), "plan", slow_plan)
    fitted = cost.calibrate(predictor, rounds=1)
    too_low = dataclasses.replace(fitted, fixed_s=fitted.fixed_s - 0.03)
    for fit in (fitted, too_low):
        assert 0.015 < cost.method_overhead(predictor, fit, "random") < 0.04


def test_embedded_time_profile_script_splits_the_prefill_of_other_grids(tmp_path):
    """scripts/embedded_time_profile.py: the cost model's fit on a random-weight copy at another grid."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "embedded_time_profile.py"
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, str(script), "--configs", "64x16,64x32", "--rounds", "1", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["width"], r["visual_tokens"]) for r in rows] == [(64, 144), (64, 36)]
    for r in rows:
        assert r["fixed_share"] + r["per_layer_share"] + r["rows_share"] == pytest.approx(1.0)
        assert r["full_prefill_ms"] > 0 and min(r["fixed_share"], r["per_layer_share"]) >= 0


def test_a_cached_fit_far_off_todays_machine_is_measured_again(monkeypatch, tmp_path, random_models):
    """A calibration taken while the machine was busy (ten times too slow), or at another speed of the machine (1.6x
    slower), is not trusted for as long as the cache lives: a fresh full prefill is timed against it when read, and a
    fit more than `STALE` off is measured again and replaces the cached one; a fit within it is kept."""
    from par_demo.disk_cache import cache_path, read_json, write_json

    monkeypatch.setenv("PAR_DEMO_CACHE", str(tmp_path))
    tiny = Predictor(random_models("llava-tiny"))
    fitted, _ = cost.load_or_calibrate(tiny)

    def scaled(factor):
        return dataclasses.replace(fitted, fixed_s=factor * fitted.fixed_s, per_layer_s=factor * fitted.per_layer_s,
                                   per_row_s=factor * fitted.per_row_s, per_row2_s=factor * fitted.per_row2_s)

    # The timing itself, where the margins are far beyond a loaded machine's noise.
    assert 1 / 3 < cost.cache_drift(tiny, fitted) < 3  # a fresh fit predicts today's full prefill, within the noise
    assert cost.cache_drift(tiny, scaled(10.0)) < 1 / cost.STALE
    # The decision, with today's full prefill pinned to the fresh fit's: a 1.6x margin is inside the noise of a CI
    # machine running the test suite on both cores (one run timed the refit 1.44x slower than the first fit).
    monkeypatch.setattr(cost, "cache_drift", lambda predictor, c, rounds=3: fitted.full() / c.full())
    for slower in (10.0, 1.6):
        busy = scaled(slower)
        write_json(cache_path(cost.CACHE_KIND, fitted.key), busy.to_dict())
        messages = []
        again, cached = cost.load_or_calibrate(tiny, progress=messages.append)
        assert not cached and again != busy
        assert any("measuring it again" in m for m in messages)
        kept = cost.PrefillCost.from_dict(read_json(cache_path(cost.CACHE_KIND, fitted.key)))
        assert kept == again  # the new fit replaced the stale one in the cache
    near = scaled(1.1)
    write_json(cache_path(cost.CACHE_KIND, fitted.key), near.to_dict())
    assert cost.load_or_calibrate(tiny) == (near, True)
