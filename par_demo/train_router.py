"""`python -m par_demo train-router`: train a PAR meta-router for a model, self-supervised.

    python -m par_demo train-router --model llava-hf/llava-1.5-7b-hf --images photos/ --out assets/routers/...
    python -m par_demo train-router --model assets/models/shapes-llava --data train/data.jsonl \
        --out assets/models/shapes-llava/router --steps 600

From a folder of photos (JPEG/PNG/WebP, recursive) the questions come from the built-in bank; from a JSONL, each
line's image and question (answers are never read). The frozen model's own answers are the targets. Several
processes or GPUs: `accelerate launch [--multi_gpu] --num_processes N -m par_demo train-router ...`. The method
is described in `par_demo/training/`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from par_demo.errors import UserError
from par_demo.router import CONFIG_FILE
from par_demo.training.loop import STATE_FILE, TrainConfig, make_accelerator, train_router
from par_demo.training.questions import read_queries


def add_arguments(parser) -> None:
    from par_demo.arguments import add_model_arguments

    add_model_arguments(parser)
    defaults = TrainConfig()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="JSONL with image + question per line (answers are not read)")
    source.add_argument("--images", help="folder of photos (JPEG/PNG/WebP, searched recursively): questions come "
                                         "from the built-in bank, answers from the model itself")
    parser.add_argument("--out", required=True, help="output folder: router.safetensors + router.json, and "
                                                       "train_state.pt (the optimizer's state, for --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N queries")
    parser.add_argument("--questions-per-image", type=int, default=2, help="with --images")
    for name in ("steps", "batch", "grad_accum", "budgets_per_query", "flows", "flow_batch", "warmup",
                 "max_new_tokens", "val", "save_every", "seed", "prior_layer"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("budget_low", "budget_high", "noise", "beta", "fraction_weight", "lr", "weight_decay",
                 "max_minutes", "prior_share"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=defaults.precision,
                        help="autocast of the router on GPU (its weights stay fp32; the model keeps its --dtype)")
    parser.add_argument("--pairs", choices=["extremes", "all"], default=defaults.pairs,
                        help="preference pairs per budget: best vs worst flow, or every ordered pair of flows")
    parser.add_argument("--prior", choices=["attention", "relevance", "cdpruner"], default=defaults.prior,
                        help="token prior of the warm-up flows: an attention row (--prior-layer), CDPruner's question "
                             "relevance, or CDPruner's selection (its greedy DPP's pick order)")
    parser.add_argument("--width", type=int, default=None, help="router width (default: widest within 1%% FLOPs)")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--pool", type=int, default=1,
                        help="the router's blocks see one token per POOL x POOL square of neighbouring visual tokens "
                             "(each token keeps its own logit); 2 makes its attention ~16x cheaper")
    parser.add_argument("--protected-first", type=int, default=None, help="default: max(1, N/16)")
    parser.add_argument("--protected-last", type=int, default=1)
    # K=0: the router reads the projected image and the question itself, so unlike FastV it needs no LM layer
    # before it. Measured on the embedded model (48 held-out queries, agreement with the full answer): K=0
    # 0.90 at budget 0.25 and 0.98 at 0.4, against 0.73 and 0.96 with K=2, whose two full layers eat the budget.
    parser.add_argument("--start-layer", type=int, default=0, help="K: the layer visual tokens are dropped at")
    parser.add_argument("--token-selection", choices=["top", "dpp"], default="top",
                        help="kept tokens from scores: the best-scored, or a diverse set weighted by the scores")
    parser.add_argument("--absorb", action=argparse.BooleanOptionalAction, default=None,
                        help="dropped tokens absorbed by their look-alikes with proportional attention, in the flows, "
                             "the Pareto table and at inference (default: on for a new router; with --resume, sets "
                             "it on the saved router, whose Pareto table is then measured that way)")
    parser.add_argument("--pareto-low", type=float, default=0.15)
    parser.add_argument("--pareto-high", type=float, default=0.9)
    parser.add_argument("--pareto-step", type=float, default=0.05)


def train_config_from_args(args) -> TrainConfig:
    return TrainConfig(**{name: getattr(args, name) for name in TrainConfig.__dataclass_fields__})


def check_args(args, train: TrainConfig) -> None:
    if train.steps < 1 or train.batch < 1 or train.flows < 2 or train.budgets_per_query < 1:
        raise UserError("--steps, --batch, --budgets-per-query must be >= 1 and --flows >= 2")
    if not 1 <= train.grad_accum <= train.batch or train.flow_batch < 0:
        raise UserError("--grad-accum must be in [1, --batch] and --flow-batch >= 0")
    if not 0 <= train.prior_share < 1:
        raise UserError("--prior-share must be in [0, 1)")
    if not 0 < train.budget_low <= train.budget_high <= 1:
        raise UserError("budgets must satisfy 0 < --budget-low <= --budget-high <= 1")
    if train.max_new_tokens < 1 or train.save_every < 1 or train.val < 0 or train.max_minutes < 0:
        raise UserError("--max-new-tokens and --save-every must be >= 1, --val and --max-minutes >= 0")
    if train.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {train.seed}")
    if args.questions_per_image < 1:
        raise UserError("--questions-per-image must be >= 1")
    if args.start_layer < 0:
        raise UserError("--start-layer must be >= 0")
    if args.pool < 1:
        raise UserError("--pool must be >= 1")
    # heads = width // 16 (at least 1), each head's size a whole number: 16, 32, 48, 64, 96, 128, ...
    if args.width is not None and (args.width < 4 or args.width % 4 or args.width % max(1, args.width // 16)):
        raise UserError("--width must be a multiple of 4, at least 4, that its heads (width // 16) divide: "
                        "e.g. 16, 32, 48, 64, 96 or 128")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if not 0.01 <= args.pareto_low <= args.pareto_high <= 1 or args.pareto_step < 0.01:
        # its budgets are kept to two decimals
        raise UserError("the Pareto grid needs 0.01 <= --pareto-low <= --pareto-high <= 1 and --pareto-step >= 0.01")


def run(args) -> int:
    from par_demo.arguments import load_from_args
    from par_demo.predict import Predictor

    train = train_config_from_args(args)
    check_args(args, train)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; a router is saved as a folder")
    if args.resume and not (out / CONFIG_FILE).is_file():  # a misspelt folder must not start a new run quietly
        raise UserError(f"--resume: {out} holds no router to continue; leave out --resume to train a new one there")
    queries = read_queries(args.data, args.images, args.questions_per_image, train.seed)
    if args.limit:
        queries = queries[:args.limit]
    if not args.resume and (out / STATE_FILE).is_file():
        raise UserError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    if not args.resume and (out / CONFIG_FILE).is_file():
        print(f"{out} holds a router: this run trains a new one and replaces it (--resume continues it instead)",
              file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(train, args.device)
    # Under `accelerate launch` each process loads the frozen model onto its own device.
    args.device = args.device or str(accelerator.device)
    predictor = Predictor(load_from_args(args))
    if predictor.engine.n_layers < 2:
        raise UserError("a router needs a model with at least 2 decoder layers")
    for p in predictor.loaded.model.parameters():
        p.requires_grad_(False)  # the LVLM stays frozen
    summary = train_router(predictor, queries, out, train, args, progress=True, resume=args.resume,
                           accelerator=accelerator)
    if accelerator.is_main_process:
        keys = ("steps", "seconds", "flows", "flows_per_s", "processes", "replicas_agree", "stopped_early", "pareto",
                "validation")
        print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=1))
        print(f"router saved to {out}", file=sys.stderr)
    return 0
