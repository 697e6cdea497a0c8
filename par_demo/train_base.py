"""`python -m par_demo train-base`: train the embedded ShapesVQA LLaVA from scratch on CPU in well under an hour.

    python -m par_demo train-base --out assets/models/shapes-llava --seed 0      # reproduces the shipped checkpoint

Stage A trains the vision tower on per-patch labels, stage B the projector and the LM on many packed questions per
image (`par_demo/base_training/`); `--init-from` and `--grow-from` start stage B from a saved model instead.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from par_demo.base_training.config import ModelConfig, TrainConfig, grid_of
from par_demo.base_training.held_out import accuracy, format_accuracy, held_out
from par_demo.base_training.model import build_model
from par_demo.base_training.scenes import make_pool
from par_demo.base_training.stage_a import train_stage_a
from par_demo.base_training.stage_b import LOOK_LAYER, train_stage_b
from par_demo.base_training.steps import checkpoint_path
from par_demo.errors import UserError, first_line
from par_demo.model_card import write_embedded_card
from par_demo.shapes import IMAGE_SIZE, QUESTION_TYPES
from par_demo.tokenizer import build_processor
from par_demo.widen import widen_into


def warm_start(model, folder: Path) -> dict | None:
    """Take the weights of a model `train-base` saved with the same model flags (tower, projector and LM). `folder`
    may also be a train-base work folder: its last stage-B checkpoint then gives the weights and is returned, so
    that the read probe and the optimizer's moments carry on too (a fresh probe's random gradients would first
    undo part of what the LM learned)."""
    checkpoint = checkpoint_path(folder, "B")
    try:
        if checkpoint.exists():
            state = torch.load(checkpoint, weights_only=False)
            model.load_state_dict(state["model"])
            return state
        source = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        model.load_state_dict(source.state_dict())
        return None
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"--init-from {folder}: not a model saved with these model flags "
                        f"({first_line(exc)})") from None


def grow_from(model, folder: Path) -> None:
    """Start `model` from the narrower model saved in `folder`, widened without changing its function."""
    try:
        source = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"--grow-from {folder}: not a saved model ({first_line(exc)})") from None
    widen_into(source, model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="assets/models/shapes-llava", help="where the trained model is saved")
    parser.add_argument("--init-from", default=None,
                        help="continue from a model train-base saved, or from its --work folder (then its read "
                             "probe and optimizer moments go on too); same model flags: stage A is skipped and "
                             "stage B runs --b-steps more steps on a fresh learning-rate schedule")
    parser.add_argument("--grow-from", default=None,
                        help="start from a saved model whose decoder is narrower (the model flags give the wider "
                             "one: --text-width, --text-heads, --text-mlp): its weights are widened without changing "
                             "what it computes (par_demo/widen.py), stage A is skipped and stage B trains the whole "
                             "width for --b-steps steps")
    parser.add_argument("--work", default=None, help="checkpoints and log for resuming (default: runs/train-base-seed<S>)")
    for f in list(fields(ModelConfig)) + list(fields(TrainConfig)):
        if isinstance(f.default, bool):
            parser.add_argument("--" + f.name.replace("_", "-"), action="store_true")
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)


def run(args) -> int:
    tc = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    mc = ModelConfig(**{f.name: getattr(args, f.name) for f in fields(ModelConfig)})
    grid = grid_of(mc.patch_size)
    if mc.text_layers <= LOOK_LAYER:
        raise UserError(f"--text-layers must be at least {LOOK_LAYER + 1} (the look loss uses layer {LOOK_LAYER})")
    if not 0.0 <= tc.layer_drop <= 1.0 or not 0.0 <= tc.layer_drop_shallow <= 1.0:
        raise UserError(f"--layer-drop and --layer-drop-shallow must be between 0 and 1 (got {tc.layer_drop}, "
                        f"{tc.layer_drop_shallow})")
    if tc.b_questions % len(QUESTION_TYPES):
        raise UserError(f"--b-questions must be a multiple of {len(QUESTION_TYPES)}")
    counts = {name: getattr(tc, name) for name in ("a_batch", "b_batch", "b_questions", "eval_every", "eval_per_type",
                                                   "final_per_type", "threads")}
    small = [f"--{name.replace('_', '-')} {value}" for name, value in counts.items() if value < 1]
    small += [f"--{name.replace('_', '-')} {getattr(tc, name)}" for name in ("seed", "a_steps", "b_steps", "warmup")
              if getattr(tc, name) < 0]
    if small:
        raise UserError(f"{', '.join(small)}: the batches, questions, threads and eval counts must be at least 1, "
                        "the seed and step counts at least 0")
    if tc.pool_size < 512 + tc.a_batch:  # stage A measures on the pool's last 512 scenes, draws from the rest
        raise UserError(f"--pool-size must be at least 512 + --a-batch ({512 + tc.a_batch}), got {tc.pool_size}")
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    work = Path(args.work or f"runs/train-base-seed{tc.seed}")
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "log.txt", "a")
    t0 = time.time()

    def log(msg: str) -> None:
        line = f"[{(time.time() - t0) / 60:5.1f} min] {msg}"
        tqdm.write(line)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"config {asdict(mc)} {asdict(tc)}")
    processor = build_processor(IMAGE_SIZE, mc.patch_size)
    model = build_model(mc, processor)
    log(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    pool = make_pool(tc.pool_size, tc.seed, grid)
    log(f"rendered {tc.pool_size} training scenes")
    carried = None
    if args.init_from and args.grow_from:
        raise UserError("--init-from and --grow-from both give the starting weights: use one")
    if args.grow_from:
        grow_from(model, Path(args.grow_from))
        log(f"widened {args.grow_from} to this decoder: stage A skipped, stage B trains the whole width")
        heads = None
    elif args.init_from:
        carried = warm_start(model, Path(args.init_from))
        log(f"initialised from {args.init_from}: stage A skipped, stage B continues its projector and LM")
        heads = None
    else:
        heads = train_stage_a(model, pool, tc, work, log)
    train_stage_b(model, processor, pool, heads, tc, work, log, carried)

    out = Path(args.out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_embedded_card(out)  # the page's model card: what this model was trained on and can answer
    log(f"saved model, processor and model card to {out}")
    rows = held_out(tc.final_per_type, seed=20_000 + tc.seed)
    acc = accuracy(model, processor, rows, desc="final held-out eval")
    log(f"final held-out accuracy ({tc.final_per_type} per type): {format_accuracy(acc)}")
    log(f"total wall time {(time.time() - t0) / 60:.1f} min")
    return 0
