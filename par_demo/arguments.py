"""The command-line options every command that loads a model shares (`--model`, `--quant`, `--device`, `--dtype`,
the image options, `--budget-unit`), and the model or predictor they name."""

from __future__ import annotations

from par_demo.methods.base import BUDGET_UNITS
from par_demo.models import DEFAULT_MODEL, LoadedModel, load_model

IMAGE_OPTIONS = ("min_pixels", "max_pixels", "max_tiles")  # per-model image options; each family takes its own


def add_model_arguments(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="local model folder, hub id, or random:<preset> (default: the embedded model)")
    parser.add_argument("--quant", default="none", choices=["none", "4bit", "8bit"], help="bitsandbytes quantization")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="auto, fp32, bf16, fp16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="dynamic-resolution models (Qwen2.5-VL): smallest image area the model is given")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="dynamic-resolution models (Qwen2.5-VL): largest image area; fewer pixels, fewer "
                             "visual tokens, faster (one token per 28 x 28 px)")
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="tiled models (SmolVLM, InternVL3): at most this many tiles per image, besides the "
                             "global view; fewer tiles, fewer visual tokens, faster")


def add_budget_unit_argument(parser) -> None:
    parser.add_argument("--budget-unit", default="flops", choices=BUDGET_UNITS,
                        help="what a budget is a fraction of: the full prefill's FLOPs (as papers report), or its "
                             "time on this machine, predicted by the measured cost model (see `calibrate`)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="with --budget-unit time: measure the cost model again instead of reading the cache")


def load_from_args(args) -> LoadedModel:
    """The model the shared model arguments name."""
    options = {k: getattr(args, k, None) for k in IMAGE_OPTIONS}
    return load_model(args.model, args.quant, args.device, args.dtype,
                      options={k: v for k, v in options.items() if v is not None})


def predictor_from_args(args):
    """The `Predictor` of the model the arguments name; with `--budget-unit time`, its cost model measured (or read
    from the cache) before any query, with a progress line."""
    from par_demo.predict import Predictor

    predictor = Predictor(load_from_args(args))
    if getattr(args, "budget_unit", "flops") == "time":
        predictor.time_budget(recalibrate=args.recalibrate)
    return predictor
