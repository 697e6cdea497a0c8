"""The embedded model's architecture and its training run's settings: every field is a `train-base` flag."""

from __future__ import annotations

from dataclasses import dataclass

from par_demo.errors import UserError
from par_demo.shapes import IMAGE_SIZE


@dataclass
class ModelConfig:
    # Proportions of LLaVA-1.5-7B: the vision tower is ~5% of prefill FLOPs and text ~10% of the tokens, so
    # FLOPs budgets down to 0.25 are reachable by pruning tokens, skipping layers, or both.
    # 192 / 16 = 12x12 = 144 image tokens; 8 gives LLaVA-1.5's 24x24 = 576, whose prefill is compute-bound on a CPU
    # (`docs/embedded-model.md`, "Which model's time looks like an LVLM's")
    patch_size: int = 16
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_width: int = 128
    text_layers: int = 12
    text_heads: int = 4
    text_mlp: int = 512


@dataclass
class TrainConfig:
    seed: int = 0
    pool_size: int = 10_000  # scenes rendered once; stage B precomputes their vision features
    # stage A: vision tower with per-patch heads
    a_steps: int = 2000
    a_batch: int = 64
    a_lr: float = 2e-3
    # stage B: projector + LM on precomputed features
    b_steps: int = 2200
    b_batch: int = 12  # images per step
    b_questions: int = 24  # questions per image (4 of each type)
    b_lr: float = 3e-3
    look_weight: float = 2.0  # weight of the "where to look" attention loss
    read_weight: float = 1.0  # weight of reading the looked-at object's attributes from that head's output
    warmup: int = 100
    weight_decay: float = 0.01
    eval_every: int = 275
    eval_per_type: int = 20  # quick held-out check during training
    final_per_type: int = 100  # held-out check printed at the end
    threads: int = 2
    # bf16 autocast on CPU (the weights and the optimizer stay fp32): on an AMX CPU a stage-B step of a 256-wide
    # LM takes about half the time; off by default, the shipped checkpoint was trained in fp32
    bf16: bool = False
    # LayerDrop (Fan et al., 2019): each stage-B step leaves out k of the decoder layers a pruning method may skip
    # (not the first, the last or the look layer), k drawn uniformly from 0 to this share of them. A 12-layer model
    # trained without it has none of the spare depth a 32-layer LVLM has: skipping two thirds of its layers, as a
    # time budget of 0.25 must, loses a third of its answers. 0: every step runs every layer.
    layer_drop: float = 0.0
    # The share of stage-B steps (with --layer-drop) that run the shallowest depth, every skippable layer left out:
    # the first, look and last layers, the network PAR runs at the smallest time budgets. Drawn uniformly, that depth
    # is one step in ten; the rest of the steps draw k as above.
    layer_drop_shallow: float = 0.0


def grid_of(patch_size: int) -> int:
    """Patches per side of the 192-px scene."""
    if patch_size <= 0 or IMAGE_SIZE % patch_size:
        raise UserError(f"--patch-size must divide the {IMAGE_SIZE}-px image, got {patch_size}")
    return IMAGE_SIZE // patch_size


GRID = grid_of(ModelConfig.patch_size)  # the shipped model's
