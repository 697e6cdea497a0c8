"""Train the embedded ShapesVQA LLaVA from scratch on CPU in well under an hour.

Training a tiny LLaVA end-to-end on answer tokens alone stays at chance for an hour on 2 cores: the language
model learns the answer priors long before the vision path gets a useful signal. So training is split:

  Stage A  the CLIP vision tower alone, with DENSE per-patch labels (colour, shape, "holds an object centre",
           quadrant of the covering object) read by linear heads from the feature layer LLaVA uses (the last).
           No language model, so a step is cheap, and every patch of every image is a training signal.
  Stage B  the vision tower frozen; its features are precomputed once for a pool of scenes. The projector and
           the Llama LM learn to answer many questions per image at once: the image prefix is shared and each
           question block only sees the prefix and itself (a block-diagonal mask with repeated position ids),
           which is exactly the computation of separate sequences, at a fraction of the cost.

The result is saved with `save_pretrained` (model + processor) and answers with stock `generate`.
`python -m par_demo train-base --out assets/models/shapes-llava --seed 0` reproduces the shipped checkpoint.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import rotate_half

from par_demo.errors import UserError, first_line
from par_demo.model_card import write_embedded_card
from par_demo.router import RouterConfig
from par_demo.shapes import (
    COLORS, IMAGE_SIZE, MAX_OBJECTS, QUADRANTS, QUESTION_TYPES, SHAPES, draw_object, is_correct, quadrant, render_scene,
    sample_example, sample_question,
)
from par_demo.tokenizer import IMAGE_MEAN, IMAGE_STD, build_processor
from par_demo.widen import widen_into


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
COLOR_NAMES = list(COLORS)
IGNORE = -100


# ----------------------------------------------------------------------------------------------------------
# model


def build_model(mc: ModelConfig, processor) -> LlavaForConditionalGeneration:
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=mc.vision_width, intermediate_size=4 * mc.vision_width, num_hidden_layers=mc.vision_layers,
        num_attention_heads=mc.vision_heads, image_size=IMAGE_SIZE, patch_size=mc.patch_size,
        projection_dim=mc.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=mc.text_width, intermediate_size=mc.text_mlp,
        num_hidden_layers=mc.text_layers, num_attention_heads=mc.text_heads, num_key_value_heads=mc.text_heads,
        max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=grid_of(mc.patch_size) ** 2, tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gen.do_sample, gen.max_new_tokens = False, 8
    return model


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What LLaVA feeds its projector: the last vision layer's hidden states without the CLS token."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def to_pixels(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised [B, 3, H, W]; identical to the processor on 192x192 images."""
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------
# scene pool and per-patch labels


def patch_labels(objects: list[dict], grid: int = GRID) -> np.ndarray:
    """[grid*grid, 4] int labels per patch: colour (0=bg), shape (0=bg), centre (0/1), quadrant (0=bg).

    A patch belongs to an object when the object covers >= 1/4 of it, to the background when < 1/16;
    in between it is ambiguous and ignored. The patch holding an object's box centre is always that object's.
    """
    p = IMAGE_SIZE // grid
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for k, obj in enumerate(objects):
        draw_object(draw, obj, k + 1)
    ids = np.asarray(canvas).reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid * grid, p * p)
    cover = np.stack([(ids == k + 1).sum(1) for k in range(len(objects))], 1)  # [patches, objects]
    owner = cover.argmax(1)
    best = cover.max(1)
    labels = np.zeros((grid * grid, 4), dtype=np.int64)
    labels[(best >= p * p // 16) & (best < p * p // 4)] = IGNORE

    def assign(patch: int, k: int) -> None:
        obj = objects[k]
        quad = quadrant(obj)
        labels[patch, 0] = COLOR_NAMES.index(obj["color"]) + 1
        labels[patch, 1] = SHAPES.index(obj["shape"]) + 1
        labels[patch, 3] = IGNORE if quad is None else QUADRANTS.index(quad) + 1
        if labels[patch, 2] != 1:
            labels[patch, 2] = 0

    for patch in np.nonzero(best >= p * p // 4)[0]:
        assign(int(patch), int(owner[patch]))
    for k, obj in enumerate(objects):
        cx, cy = obj["center"]
        patch = min(int(cy // p), grid - 1) * grid + min(int(cx // p), grid - 1)
        labels[patch, 2] = 1
        assign(patch, k)
    labels[labels[:, 0] == 0, 2] = 0
    return labels


@dataclass
class Pool:
    images: np.ndarray  # uint8 [N, H, W, 3]
    objects: list  # list of object lists
    labels: np.ndarray  # int64 [N, patches, 4]


def make_pool(n: int, seed: int, grid: int = GRID) -> Pool:
    rng = np.random.default_rng([seed, 1])
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    objects, labels = [], np.empty((n, grid * grid, 4), dtype=np.int64)
    for i in tqdm(range(n), desc="render scenes", leave=False):
        image, objs = render_scene(rng)
        images[i] = np.asarray(image)
        objects.append(objs)
        labels[i] = patch_labels(objs, grid)
    return Pool(images, objects, labels)


# ----------------------------------------------------------------------------------------------------------
# stage A: dense per-patch supervision of the vision tower

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


def optimizer_step(opt, loss: torch.Tensor, params, lr: float) -> None:
    """One AdamW step at learning rate `lr`, gradients clipped to norm 1 (both stages train this way)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ----------------------------------------------------------------------------------------------------------
# stage B: many questions per image, packed behind one shared image prefix


class QuestionPacker:
    """Turns (image index, questions) into packed token ids, position ids, a block mask and loss targets."""

    def __init__(self, processor, questions_per_image: int, grid: int = GRID):
        self.tok = processor.tokenizer
        self.q = questions_per_image
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "QUESTION"}]}],
            add_generation_prompt=True,
        )
        head, tail = prompt.split("QUESTION")
        image_token = self.tok.convert_tokens_to_ids("<image>")
        head_ids = self.tok(head)["input_ids"]  # <s> user : <image>
        i = head_ids.index(image_token)
        self.prefix = head_ids[:i] + [image_token] * (grid * grid) + head_ids[i + 1:]
        self.image_start = i
        self.tail = self.tok(tail, add_special_tokens=False)["input_ids"]  # assistant :
        self.block_len = 12
        self.cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.cache[text]

    def block(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of one block and its targets (answer tokens then </s>, predicted from the position before)."""
        prompt = self.words(question) + self.tail
        answer_ids = self.words(answer) + [self.tok.eos_token_id]
        ids = prompt + answer_ids
        targets = [IGNORE] * (len(prompt) - 1) + answer_ids + [IGNORE]
        pad = self.block_len - len(ids)
        assert pad >= 0, question
        return ids + [self.tok.pad_token_id] * pad, targets + [IGNORE] * pad

    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids and the boolean attention mask shared by every packed sequence."""
        p, b, q = len(self.prefix), self.block_len, self.q
        total = p + b * q
        mask = torch.zeros(total, total, dtype=torch.bool)
        mask[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        pos = list(range(p))
        for j in range(q):
            s = p + j * b
            mask[s:s + b, :p] = True
            mask[s:s + b, s:s + b] = torch.ones(b, b, dtype=torch.bool).tril()
            pos += list(range(p, p + b))
        return torch.tensor(pos), mask

    def batch(self, pool: Pool, idx: np.ndarray, rng: np.random.Generator):
        """Token ids and targets, and the supervised answer positions ("queries"): for each, the sequence it is
        in, its position, where it should look and what it should read there.

        Every question's first answer position is a query; a "where" question's second one too: "left"/"right"
        is predicted after "top"/"bottom" and needs the object's quadrant just as much."""
        ids, targets, rows, queries, looks, reads = [], [], [], [], [], []
        per_type = self.q // len(QUESTION_TYPES)
        for row, i in enumerate(idx):
            seq, tgt = list(self.prefix), [IGNORE] * len(self.prefix)
            for qtype in [t for t in QUESTION_TYPES for _ in range(per_type)]:
                qa = sample_question(pool.objects[i], qtype, rng)
                while qa is None:  # this scene cannot ask that type: ask an askable one instead
                    qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
                    qa = sample_question(pool.objects[i], qtype, rng)
                b_ids, b_tgt = self.block(*qa)
                first = len(seq) + len(self.words(qa[0])) + len(self.tail) - 1
                look = self.look_target(qtype, qa[0], pool.labels[i])
                read = read_target(qtype, qa[0], pool.objects[i])
                for position in ([first, first + 1] if qtype == "where" else [first]):
                    rows.append(row), queries.append(position), looks.append(look), reads.append(read)
                seq += b_ids
                tgt += b_tgt
            ids.append(seq)
            targets.append(tgt)
        return (torch.tensor(ids), torch.tensor(targets), torch.tensor(rows), torch.tensor(queries),
                torch.from_numpy(np.stack(looks)), torch.tensor(reads))

    def look_target(self, qtype: str, question: str, labels: np.ndarray) -> np.ndarray:
        """Where the answer position should look: a distribution over the prefix tokens.

        Uniform over the patches of the object(s) the question is about; counting questions look at object
        centres plus <s>, so the share left on <s> encodes the count; nothing to find (a "no", a zero) means <s>.
        """
        words = question.lower().rstrip("?").split()
        color = next((COLOR_NAMES.index(w) + 1 for w in words if w in COLORS), None)
        shape = next((SHAPES.index(w.rstrip("s")) + 1 for w in words if w.rstrip("s") in SHAPES), None)
        hit = np.ones(len(labels), dtype=bool)
        if qtype in ("count_shape", "count_all"):
            hit &= labels[:, 2] == 1
        if color is not None and qtype != "color":
            hit &= labels[:, 0] == color
        if shape is not None and qtype != "shape":
            hit &= labels[:, 1] == shape
        target = np.zeros(len(self.prefix), dtype=np.float32)
        target[self.image_start:self.image_start + len(labels)] = hit
        if qtype in ("count_shape", "count_all") or not hit.any():
            target[0] = 1.0  # <s>, the attention sink
        return target / target.sum()


def read_target(qtype: str, question: str, objects: list[dict]) -> list[int]:
    """What the look head must carry back: colour, shape and quadrant of the object the question is about, or
    for counting questions the count.

    Index 0 means "no such object" (a "no" to an existence question); what a question does not ask is IGNORE.
    """
    words = question.lower().rstrip("?").split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w.rstrip("s") for w in words if w.rstrip("s") in SHAPES), None)
    hits = [o for o in objects if color in (None, o["color"]) and shape in (None, o["shape"])]
    if qtype in ("count_shape", "count_all"):
        return [IGNORE, IGNORE, IGNORE, len(hits)]
    if not hits:
        return [0, 0, 0, IGNORE]
    obj = hits[0]
    quad = quadrant(obj)
    return [COLOR_NAMES.index(obj["color"]) + 1, SHAPES.index(obj["shape"]) + 1,
            IGNORE if quad is None else QUADRANTS.index(quad) + 1, IGNORE]


READ_SIZES = (len(COLORS) + 1, len(SHAPES) + 1, len(QUADRANTS) + 1, MAX_OBJECTS + 1)
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


# ----------------------------------------------------------------------------------------------------------
# evaluation with the stock generate path


def held_out(per_type: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, 7])
    rows = []
    for qtype in QUESTION_TYPES:
        for _ in range(per_type):
            image, _, question, answer = sample_example(qtype, rng)
            rows.append({"image": image, "question": question, "answer": answer, "type": qtype})
    return rows


@torch.no_grad()
def answer_batch(model, processor, images: list, questions: list[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers from stock `generate` on the processor's output (left padding when prompts differ)."""
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [s.strip() for s in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def evaluate(model, processor, rows: list[dict], batch_size: int = 32, desc: str = "eval") -> dict:
    """Accuracy overall and per type; prompts of equal token length are batched together (no padding)."""
    model.eval()
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_len.setdefault(len(processor.tokenizer(r["question"])["input_ids"]), []).append(i)
    correct = [False] * len(rows)
    bar = tqdm(total=len(rows), desc=desc, leave=False)
    for group in by_len.values():
        for s in range(0, len(group), batch_size):
            chunk = group[s:s + batch_size]
            preds = answer_batch(model, processor, [rows[i]["image"] for i in chunk], [rows[i]["question"] for i in chunk])
            for i, p in zip(chunk, preds):
                correct[i] = is_correct(p, rows[i]["answer"])
            bar.update(len(chunk))
    bar.close()
    result = {"overall": sum(correct) / len(rows)}
    for t in QUESTION_TYPES:
        hits = [c for c, r in zip(correct, rows) if r["type"] == t]
        if hits:
            result[t] = sum(hits) / len(hits)
    return result


def format_accuracy(acc: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())


# ----------------------------------------------------------------------------------------------------------
# the two stages


def autocast(tc: TrainConfig):
    """The forward passes of a training step in bf16 when asked (`TrainConfig.bf16`); losses come out fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16)


def checkpoint_path(work: Path, stage: str) -> Path:
    return work / f"stage_{stage}.pt"


def save_state(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


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
            acc = evaluate(model, processor, eval_rows)
            log(f"stage B step {step + 1}: answer loss {answer_loss.item():.3f}, look loss {look_loss.item():.3f}, "
                f"read loss {read_loss.item():.3f}; held-out {format_accuracy(acc)}")
            save_state(path, model=model.state_dict(), read_head=read_head.state_dict(), opt=opt.state_dict(),
                       step=step + 1)


# ----------------------------------------------------------------------------------------------------------
# CLI


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
    acc = evaluate(model, processor, rows, desc="final held-out eval")
    log(f"final held-out accuracy ({tc.final_per_type} per type): {format_accuracy(acc)}")
    log(f"total wall time {(time.time() - t0) / 60:.1f} min")
    return 0
