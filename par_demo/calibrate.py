"""`python -m par_demo calibrate`: measure (or show the cached) prefill cost model of a model as loaded, and check
its predictions against splits it was not fitted on.

    python -m par_demo calibrate                                  # the embedded model
    python -m par_demo calibrate --model random:llava-mid --recalibrate --json

The cost model (`par_demo.cost`) predicts how long a prefill keeping T visual tokens and running L layers takes on
this machine; this command prints its fitted terms, then times a second grid of splits between the calibration
points (each right after a full prefill, as the page times a method) and prints predicted against measured time and
the median relative error.
"""

from __future__ import annotations

import json
import statistics
import sys

from par_demo.errors import UserError


def add_arguments(parser) -> None:
    from par_demo.arguments import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--recalibrate", action="store_true", help="measure again even if a cached fit exists")
    parser.add_argument("--no-check", action="store_true", help="skip timing the check splits")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each check split (between the calibration grid's points), in turns, medians "
                             "used; the grid's own splits are timed 3 times each, as the app's calibration does")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from par_demo import cost
    from par_demo.bench import environment
    from par_demo.arguments import predictor_from_args

    if not 1 <= args.rounds <= 50:
        raise UserError(f"--rounds must be between 1 and 50, got {args.rounds}")
    predictor = predictor_from_args(args)

    def progress(text: str) -> None:
        print(text, file=sys.stderr)

    fitted, cached = cost.load_or_calibrate(predictor, args.recalibrate, progress)
    result = {"model": predictor.loaded.name, "environment": environment(predictor), "cached": cached,
              "cost": fitted.to_dict(), "check": []}
    if not args.no_check:
        splits = cost.check_grid(fitted.n_visual, fitted.n_layers)
        # each right after a full prefill: the regime the predictions are for (`PrefillCost.after_full_s`)
        seconds = cost.measure_splits(predictor, cost.calibration_image(), splits, args.rounds, progress,
                                      after_full=True)
        result["check"] = [{"tokens": t, "layers": l, "measured_s": s, "predicted_s": fitted.predict(t, l)}
                           for (t, l), s in zip(splits, seconds)]
        errors = cost.relative_errors(fitted, [(t, l, s) for (t, l), s in zip(splits, seconds)])
        result["median_error"] = statistics.median(errors)
    if args.json:
        print(json.dumps(result))
    else:
        print_human(result, fitted)
    return 0


def print_human(result: dict, fitted) -> None:
    source = "cached" if result["cached"] else "measured now"
    print(f"{result['model']}: prefill cost model ({source}), {fitted.n_visual} visual + {fitted.n_text} text tokens, "
          f"{fitted.n_layers} layers")
    print(f"  fixed {fitted.fixed_s * 1e3:.2f} ms + per layer {fitted.per_layer_s * 1e3:.3f} ms "
          f"+ {fitted.per_row_s * 1e6:.2f} us/row + {fitted.per_row2_s * 1e9:.3f} ns/row^2")
    print(f"  full prefill predicted {fitted.full() * 1e3:.1f} ms; absorbing's attention bias "
          f"+{fitted.absorb_row2_s * 1e9:.3f} ns/row^2 per layer")
    if fitted.overheads:
        print("  each method's own work: " + ", ".join(
            f"{name} {seconds * 1e3:.2f} ms" for name, seconds in fitted.overheads.items() if name != "full"))
    if result["check"]:
        print(f"  {'tokens':>6} {'layers':>6} {'measured ms':>11} {'predicted ms':>12} {'error':>6}")
        for row in result["check"]:
            error = abs(row["predicted_s"] - row["measured_s"]) / row["measured_s"]
            print(f"  {row['tokens']:>6} {row['layers']:>6} {row['measured_s'] * 1e3:>11.2f} "
                  f"{row['predicted_s'] * 1e3:>12.2f} {error:>6.1%}")
        print(f"  median error {result['median_error']:.1%} over {len(result['check'])} splits it was not fitted on")
