"""Stage B: the vision tower frozen and its features precomputed once; the projector and the Llama LM learn to answer
many packed questions per image, one attention head taught where to look, LayerDrop on request."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.models.llama.modeling_llama import rotate_half

from par_demo.base_training.config import TrainConfig, grid_of
from par_demo.base_training.held_out import accuracy, format_accuracy, held_out
from par_demo.base_training.model import to_pixels, vision_features
from par_demo.base_training.packing import READ_SIZES, QuestionPacker
from par_demo.base_training.scenes import IGNORE, Pool
from par_demo.base_training.steps import autocast, checkpoint_path, lr_at, optimizer_step, save_state
from par_demo.router import RouterConfig

LOOK_LAYER, LOOK_HEAD = 2, 0  # the one attention head taught where to look


def look_logits(attn, captured: dict, rows: torch.Tensor, queries: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Attention logits of one head from each supervised answer position to the prefix, as the layer computes
    them: [queries, n_prefix]."""
    hidden = captured["hidden_states"]
    cos, sin = captured["position_embeddings"]
    d = attn.head_dim
    sl = slice(LOOK_HEAD * d, (LOOK_HEAD + 1) * d)
    q = F.linear(hidden[rows, queries], attn.q_proj.weight[sl], None if attn.q_proj.bias is None else attn.q_proj.bias[sl])
    k = F.linear(hidden[:, :n_prefix], attn.k_proj.weight[sl], None if attn.k_proj.bias is None else attn.k_proj.bias[sl])
    q = q * cos[rows, queries] + rotate_half(q) * sin[rows, queries]
    k = k * cos[:, :n_prefix] + rotate_half(k) * sin[:, :n_prefix]
    return torch.einsum("nd,npd->np", q, k[rows]) * attn.scaling


def skippable_layers(n_layers: int) -> list[int]:
    """The decoder layers LayerDrop may leave out: those PAR's router may skip (by its default protection), less
    the look layer (its losses need it; the router learns to keep it)."""
    routable = RouterConfig(lm_width=0, n_layers=n_layers).routable()
    return [i for i in routable if i != LOOK_LAYER]


def dropped_layers(n_layers: int, share: float, rng: np.random.Generator, shallow: float = 0.0) -> list[int]:
    """One step's LayerDrop: k of the skippable layers, k uniform in 0 .. share of them, so that the model sees
    every depth from full to its shallowest; with probability `shallow` (and a share > 0), all of them."""
    skippable = skippable_layers(n_layers)
    if share > 0 and shallow > 0 and rng.random() < shallow:
        return skippable
    k = int(rng.integers(0, round(share * len(skippable)) + 1))
    return sorted(int(i) for i in rng.choice(skippable, size=k, replace=False))


def packed_loss(model, read_head, feats, ids, targets, rows, queries, looks, reads, pos, mask, image_start: int,
                dropped: Sequence[int] = ()):
    """Answer-token cross-entropy of the stock LLaVA computation (image features supplied precomputed), plus
    a cross-entropy teaching one head of layer LOOK_LAYER where the answer is in the image, plus a linear
    read-out of the looked-at object's colour, shape and quadrant from that head's output.

    Measured without the read-out: the head attended to the right patches (91% of its weight on colour
    questions) but its value projection carried almost no colour (a linear probe on it: 30%, against 86% on
    the residual it reads), and colour answers stayed at chance. The read-out gives the value path its own
    short gradient, so what the head finds is what it returns. `dropped`: decoder layers this step leaves out."""
    lm = model.model.language_model
    embeds = lm.embed_tokens(ids)
    image = model.model.multi_modal_projector(feats)
    n = image.shape[1]
    embeds = torch.cat([embeds[:, :image_start], image, embeds[:, image_start + n:]], dim=1)
    b = ids.shape[0]
    attn = lm.layers[LOOK_LAYER].self_attn
    captured = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    hook_out = attn.o_proj.register_forward_pre_hook(lambda m, a: captured.update(heads_out=a[0]))
    every_layer = lm.layers
    lm.layers = torch.nn.ModuleList([layer for i, layer in enumerate(every_layer) if i not in dropped])
    try:
        out = lm(
            inputs_embeds=embeds, position_ids=pos.unsqueeze(0).expand(b, -1),
            attention_mask=mask.view(1, 1, *mask.shape).expand(b, 1, -1, -1),
        )
    finally:
        lm.layers = every_layer
        hook.remove()
        hook_out.remove()
    hidden = out.last_hidden_state
    where = targets != IGNORE
    answer_loss = F.cross_entropy(model.lm_head(hidden[where]), targets[where])
    logits = look_logits(attn, captured, rows, queries, looks.shape[1])
    look_loss = -(looks * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    d = attn.head_dim
    head_out = captured["heads_out"][rows, queries, LOOK_HEAD * d:(LOOK_HEAD + 1) * d]  # [questions, head_dim]
    read_logits = read_head(head_out).split(READ_SIZES, dim=-1)
    read_loss = sum(F.cross_entropy(lg, reads[:, j], ignore_index=IGNORE) for j, lg in enumerate(read_logits))
    return answer_loss, look_loss, read_loss


@torch.no_grad()
def precompute_features(model, pool: Pool) -> torch.Tensor:
    model.eval()
    out = []
    for s in tqdm(range(0, len(pool.images), 128), desc="precompute vision features", leave=False):
        out.append(vision_features(model, to_pixels(pool.images[s:s + 128])))
    return torch.cat(out)


@torch.no_grad()
def init_projector_from_heads(model, heads: torch.nn.Linear) -> None:
    """Start the projector's first layer as stage A's per-patch heads: its units are their logits, the rest 0.

    Measured: through a random projector, the colour of a patch is a small difference inside a large vector
    (between-colour distance 7 against a spread of 40), and the LM never learnt to read colour. Seeded with
    the heads, every image token starts as clean colour, shape, centre and quadrant evidence; the other
    units start at zero and grow only if the loss wants them.
    """
    first = model.model.multi_modal_projector.linear_1
    n = heads.out_features
    first.weight.zero_()
    first.bias.zero_()
    first.weight[:n] = heads.weight
    first.bias[:n] = heads.bias


def train_stage_b(model, processor, pool: Pool, heads, tc: TrainConfig, work: Path, log,
                  carried: dict | None = None) -> None:
    """Projector + LM on precomputed features, many questions per image; resumes from work/stage_B.pt. `heads`
    None: the projector is the one the model has (a warm start, `--init-from`); `carried`: the stage-B checkpoint
    it came from, whose read probe and optimizer moments go on (its step count does not: the schedule is fresh)."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    if heads is not None:
        init_projector_from_heads(model, heads)
    feats = precompute_features(model, pool)
    packer = QuestionPacker(processor, tc.b_questions, grid_of(model.config.vision_config.patch_size))
    pos, mask = packer.layout()
    head_dim = model.model.language_model.layers[LOOK_LAYER].self_attn.head_dim
    n_layers = model.config.text_config.num_hidden_layers
    read_head = torch.nn.Linear(head_dim, sum(READ_SIZES))  # a training-only probe, not part of the saved model
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    params += list(read_head.parameters())
    # beta2 0.95: steadier second-moment estimates at the high learning rate a from-scratch LM this small wants
    opt = torch.optim.AdamW(params, lr=tc.b_lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    path, start = checkpoint_path(work, "B"), 0
    if carried is not None and not path.exists():
        read_head.load_state_dict(carried["read_head"]), opt.load_state_dict(carried["opt"])
        log("stage B: read probe and optimizer moments carried over from the checkpoint")
    if path.exists():
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"]), read_head.load_state_dict(state["read_head"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"stage B: resumed at step {start}")
    eval_rows = held_out(tc.eval_per_type, seed=10_000 + tc.seed)
    bar = tqdm(range(start, tc.b_steps), desc="stage B (projector + LM)", initial=start, total=tc.b_steps)
    for step in bar:
        model.train()
        rng = np.random.default_rng([tc.seed, 3, step])
        idx = rng.choice(len(pool.images), size=tc.b_batch, replace=False)
        ids, targets, rows, queries, looks, reads = packer.batch(pool, idx, rng)
        # its own stream: the batches stay those of a run without LayerDrop
        layer_rng = np.random.default_rng([tc.seed, 4, step])
        dropped = dropped_layers(n_layers, tc.layer_drop, layer_rng, tc.layer_drop_shallow)
        with autocast(tc):
            answer_loss, look_loss, read_loss = packed_loss(
                model, read_head, feats[idx], ids, targets, rows, queries, looks, reads, pos, mask, packer.image_start,
                dropped,
            )
        loss = answer_loss + tc.look_weight * look_loss + tc.read_weight * read_loss
        optimizer_step(opt, loss, params, lr_at(step, tc.b_steps, tc.b_lr, tc.warmup))
        bar.set_postfix(answer=f"{answer_loss.item():.3f}", look=f"{look_loss.item():.3f}",
                        read=f"{read_loss.item():.3f}")
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.b_steps:
            acc = accuracy(model, processor, eval_rows)
            log(f"stage B step {step + 1}: answer loss {answer_loss.item():.3f}, look loss {look_loss.item():.3f}, "
                f"read loss {read_loss.item():.3f}; held-out {format_accuracy(acc)}")
            save_state(path, model=model.state_dict(), read_head=read_head.state_dict(), opt=opt.state_dict(),
                       step=step + 1)
