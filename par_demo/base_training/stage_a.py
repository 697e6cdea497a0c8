"""Stage A: the CLIP vision tower alone, with dense per-patch labels read by linear heads from the feature layer
LLaVA uses (the last). No language model, so a step is cheap, and every patch of every image is a training signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from par_demo.base_training.config import TrainConfig
from par_demo.base_training.model import to_pixels, vision_features
from par_demo.base_training.scenes import IGNORE, Pool
from par_demo.base_training.steps import autocast, checkpoint_path, lr_at, optimizer_step, save_state
from par_demo.shapes import COLORS, SHAPES

HEAD_SIZES = (len(COLORS) + 1, len(SHAPES) + 1, 2, 5)  # colour, shape, centre, quadrant


def patch_loss(heads: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list]:
    logits = heads(feats).split(HEAD_SIZES, dim=-1)
    losses, accs = [], []
    for j, lg in enumerate(logits):
        y = labels[..., j].reshape(-1)
        losses.append(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y, ignore_index=IGNORE))
        keep = y > 0 if j != 2 else y != IGNORE  # accuracy on object patches (centre: on all patches)
        pred = lg.reshape(-1, lg.shape[-1]).argmax(-1)
        accs.append(((pred == y) & keep).sum().item() / max(1, keep.sum().item()))
    return sum(losses), accs


def train_stage_a(model, pool: Pool, tc: TrainConfig, work: Path, log) -> torch.nn.Linear:
    """Vision tower + linear per-patch heads; resumes from work/stage_A.pt."""
    vt = model.model.vision_tower
    heads = torch.nn.Linear(model.config.vision_config.hidden_size, sum(HEAD_SIZES))
    params = list(vt.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=tc.a_lr, weight_decay=tc.weight_decay)
    path, start = checkpoint_path(work, "A"), 0
    if path.exists():
        state = torch.load(path, weights_only=False)
        vt.load_state_dict(state["vision"]), heads.load_state_dict(state["heads"]), opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"stage A: resumed at step {start}")
    n_train = len(pool.images) - 512  # the last 512 scenes measure per-patch accuracy
    vt.train()
    bar = tqdm(range(start, tc.a_steps), desc="stage A (vision, per-patch)", initial=start, total=tc.a_steps)
    for step in bar:
        rng = np.random.default_rng([tc.seed, 2, step])
        idx = rng.choice(n_train, size=tc.a_batch, replace=False)
        with autocast(tc):
            feats = vision_features(model, to_pixels(pool.images[idx]))
            loss, accs = patch_loss(heads, feats, torch.from_numpy(pool.labels[idx]))
        optimizer_step(opt, loss, params, lr_at(step, tc.a_steps, tc.a_lr, tc.warmup))
        bar.set_postfix(loss=f"{loss.item():.3f}", color=f"{accs[0]:.2f}", shape=f"{accs[1]:.2f}")
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.a_steps:
            accs = patch_accuracy(model, heads, pool, n_train)
            log(f"stage A step {step + 1}: held-out patch accuracy colour={accs[0]:.3f} shape={accs[1]:.3f} "
                f"centre={accs[2]:.3f} quadrant={accs[3]:.3f}")
            save_state(path, vision=vt.state_dict(), heads=heads.state_dict(), opt=opt.state_dict(), step=step + 1)
    vt.eval()
    return heads


@torch.no_grad()
def patch_accuracy(model, heads, pool: Pool, first: int) -> list[float]:
    vt_was_training = model.model.vision_tower.training
    model.model.vision_tower.eval()
    totals = np.zeros(4)
    n = 0
    for s in range(first, len(pool.images), 128):
        idx = np.arange(s, min(s + 128, len(pool.images)))
        feats = vision_features(model, to_pixels(pool.images[idx]))
        _, accs = patch_loss(heads, feats, torch.from_numpy(pool.labels[idx]))
        totals += np.array(accs) * len(idx)
        n += len(idx)
    model.model.vision_tower.train(vt_was_training)
    return list(totals / n)
