"""Self-supervised training of the PAR meta-router: the frozen model's own outputs are the only target.

    python -m par_demo train-router --model assets/models/shapes-llava --data train/data.jsonl \
        --out assets/routers/shapes-llava --steps 300

Per query (image + question; answers in the data are never read):
  1. the full model answers greedily; the answer is teacher-forced through the full model once more, which gives
     the target distributions p (m, vocab), one per answer token;
  2. for a few sampled budgets, `--flows` pruning flows are sampled around the current scores + Gaussian noise:
     the attention prior (FastV's last-row attention at layer K-1 for tokens, block influence for layers) at
     first, the router's own logits more and more after it (`--warmup`). Each flow draws a layer count L, skips
     the lowest-scored routable layers and keeps as many top-scored tokens T as its budget allows in FLOPs
     (router included);
  3. each flow runs the frozen model with the answer teacher-forced; its score is KL(p || q) averaged over the
     answer tokens;
  4. best vs worst of the noisy flows of each budget is a preference pair; the router, read as a policy over bits,
     is pushed towards the better one:   -log sigmoid(beta * (log pi(S+) - log pi(S-)))
     where log pi averages the bits' log-likelihoods within each group (tokens, layers) and adds the two groups,
     so 576 token bits do not drown 30 layer bits. A second term keeps the mean keep probability of each group at
     the better flow's kept fraction: without it the preference loss alone only sharpens the logits, and the
     scores lose their meaning as keep probabilities.
At the end a Pareto table is measured on held-out queries: for each budget of a grid, the layer count L (and
the tokens it leaves) whose router-pruned model most often gives the full model's answer, the lower KL breaking
ties. It is saved with the router.

`accelerate` places the model and router (CPU, one GPU, or several with `accelerate launch`: each process takes
its own queries, gradients are averaged). Checkpoints every `--save-every` steps; `--resume` continues one.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from par_demo.engine import PruningPlan
from par_demo.errors import UserError
from par_demo.flops import Shape
from par_demo.images import load_image
from par_demo.methods.par import router_inputs
from par_demo.router import (
    MetaRouter, RouterConfig, auto_width, fingerprint, load_router, read_meta, router_flops, save_router,
)
from par_demo.shapes import COLORS, SHAPES, load_jsonl

STATE_FILE = "train_state.pt"  # optimizer + step, for --resume (weights only: loaded with weights_only=True)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch: int = 4  # queries per optimizer step (gradient accumulation)
    budgets_per_query: int = 2  # budgets sampled per query (one router forward scores them all)
    flows: int = 6  # pruning flows sampled per budget
    budget_low: float = 0.15
    budget_high: float = 0.9
    noise: float = 1.0  # std of the Gaussian noise on standardised scores
    warmup: int = 60  # steps over which flows move from the attention prior to the router's own scores
    beta: float = 5.0
    fraction_weight: float = 1.0  # the kept-fraction regulariser
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_new_tokens: int = 8
    val: int = 12  # held-out queries for the Pareto table
    save_every: int = 50
    seed: int = 0


# ------------------------------------------------------------------------------------------------ data
GENERIC_QUESTIONS = (
    lambda r: "How many objects are there?",
    lambda r: f"How many {r.choice(SHAPES)}s are there?",
    lambda r: f"What color is the {r.choice(SHAPES)}?",
    lambda r: f"What shape is the {r.choice(list(COLORS))} object?",
    lambda r: f"Is there a {r.choice(list(COLORS))} {r.choice(SHAPES)}?",
    lambda r: f"Where is the {r.choice(list(COLORS))} {r.choice(SHAPES)}?",
)


def read_queries(data, questions_per_image: int = 2, seed: int = 0) -> list[tuple[str, str]]:
    """(image path, question) pairs from a JSONL file (image + question per line; answers are not read) or from
    an image folder (each image gets ShapesVQA-style questions that need no answer to ask)."""
    path = Path(data)
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
        rng = random.Random(seed)
        return [(str(p), rng.choice(GENERIC_QUESTIONS)(rng)) for p in images for _ in range(questions_per_image)]
    if not path.is_file():
        raise UserError(f"--data must be a JSONL file or an image folder; not found: {path}")
    return [(row["image"], row["question"]) for row in load_jsonl(path, require=("image", "question"))]


# ------------------------------------------------------------------------------------------------ targets
@dataclass
class Target:
    """One query with the full model's answer teacher-forced, and everything training needs from it."""

    query: object  # Query with the answer appended (all but its last token)
    shape: Shape  # the prompt's token counts and vision FLOPs (what the FLOPs of a pruned prefill count)
    m: int  # answer tokens scored
    log_p: torch.Tensor  # (m, vocab) full model's log-probabilities
    answer: list[int]
    prior: torch.Tensor  # (n_v,) attention of the last prompt position to the image at layer K-1
    visual: torch.Tensor  # (n_v, D) router input
    text: torch.Tensor  # (n_t, D) router input
    layout: object  # each visual token's row and column (router input)

    @property
    def n_text(self) -> int:
        return self.shape.n_text


def make_target(predictor, image_path: str, question: str, start_layer: int, max_new_tokens: int) -> Target:
    engine = predictor.engine
    inputs = predictor.encode(load_image(image_path), question)
    query = engine.prepare(inputs)
    # keep_visual_count = every token: nothing is pruned, but the engine computes the attention row at K-1.
    prior_plan = PruningPlan(start_layer=max(start_layer, 1), keep_visual_count=query.n_visual)
    pre = engine.prefill(query, prior_plan, reserve=max_new_tokens)
    eos = predictor.loaded.processor.tokenizer.eos_token_id
    answer = [int(pre.logits.argmax())]
    position = pre.next_position
    while len(answer) < max_new_tokens and answer[-1] != eos:
        answer.append(int(engine.decode_step(answer[-1], position, pre.cache, PruningPlan()).argmax()))
        position += 1
    forced = engine.extend(query, answer[:-1])
    m = len(answer)
    logits = engine.prefill(forced, PruningPlan(), n_logits=m).logits.reshape(m, -1)
    visual, text = router_inputs(query)
    return Target(forced, Shape.of(query), m, F.log_softmax(logits, dim=-1), answer,
                  pre.attention_to_image.float(), visual, text, query.layout)


def flow_kl(engine, target: Target, keep: torch.Tensor | None, skip: frozenset[int], start_layer: int):
    """(KL(full || pruned) averaged over the answer tokens, all answer tokens still argmax?) for one flow."""
    plan = PruningPlan(start_layer=start_layer, keep_visual=keep, skip_layers=skip)
    logits = engine.prefill(target.query, plan, n_logits=target.m).logits.reshape(target.m, -1)
    log_q = F.log_softmax(logits, dim=-1)
    kl = (target.log_p.exp() * (target.log_p - log_q)).sum(-1).mean().item()
    agree = bool((logits.argmax(-1) == torch.tensor(target.answer, device=logits.device)).all())
    return kl, agree


# ------------------------------------------------------------------------------------------------ flows
class Budgeter:
    """Which (tokens, skipped layers) fit a FLOPs budget, for one model and router size."""

    def __init__(self, flops, config: RouterConfig):
        self.flops, self.config = flops, config

    def max_tokens(self, target: Target, skip, budget: float) -> int:
        """The most visual tokens that fit `budget` with `skip` skipped; -1 when even none fit."""
        n_v = target.visual.shape[0]
        extra = router_flops(self.config, n_v, target.n_text)
        limit = budget * self.flops.full(target.shape)

        def cost(tokens):
            kept = None if tokens >= n_v else tokens
            return self.flops.prefill(target.shape, kept, skip, self.config.start_layer, router=extra)

        if cost(0) > limit:
            return -1
        low, high = 0, n_v  # invariant: cost(low) fits
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cost(mid) <= limit else (low, mid - 1)
        return low


def standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std() + 1e-6)


def sample_flows(target: Target, token_scores, layer_scores, budget: float, n_flows: int, noise: float,
                 budgeter: Budgeter, generator: torch.Generator):
    """Flows around (token_scores (n_v,), layer_scores (N,)): list of (keep (T,), skip set, T, L). The first is
    noise-free (the current scores' own choice at a random split)."""
    cfg = budgeter.config
    routable = torch.tensor(cfg.routable(), dtype=torch.long)
    n_protected = cfg.n_layers - len(routable)
    tok = standardise(token_scores.float().cpu())
    lay = standardise(layer_scores.float().cpu()[routable]) if len(routable) > 1 else layer_scores.float().cpu()[routable]
    flows = []
    for i in range(n_flows * 3):  # a few retries for layer counts that leave no room for tokens
        if len(flows) == n_flows:
            break
        scale = 0.0 if not flows else noise
        noisy_tok = tok + scale * torch.randn(tok.shape, generator=generator)
        noisy_lay = lay + scale * torch.randn(lay.shape, generator=generator)
        n_run = int(torch.randint(0, len(routable) + 1, (1,), generator=generator))  # routable layers that run
        order = routable[noisy_lay.argsort()]  # lowest score first
        skip = frozenset(int(i) for i in order[:len(routable) - n_run])
        tokens = budgeter.max_tokens(target, skip, budget)
        if tokens < 1:
            continue
        keep = noisy_tok.topk(tokens).indices.sort().values if tokens < tok.numel() else None
        flows.append((keep, skip, tokens, n_protected + n_run))
    return flows


def log_pi(token_logits, layer_logits, keep, skip, routable: list[int]) -> torch.Tensor:
    """Mean log-likelihood of the keep bits of tokens plus that of the run bits of routable layers."""
    bits = torch.zeros_like(token_logits)
    if keep is None:
        bits.fill_(1.0)
    else:
        bits[keep.to(bits.device)] = 1.0
    tokens = (bits * F.logsigmoid(token_logits) + (1 - bits) * F.logsigmoid(-token_logits)).mean()
    if not routable:
        return tokens
    z = layer_logits[routable]
    run = torch.tensor([0.0 if i in skip else 1.0 for i in routable], device=z.device)
    layers = (run * F.logsigmoid(z) + (1 - run) * F.logsigmoid(-z)).mean()
    return tokens + layers


def kept_fraction_loss(token_logits, layer_logits, tokens: int, layers_run: int, routable: list[int],
                       n_protected: int) -> torch.Tensor:
    """Squared gap between the mean keep probability and the better flow's kept fraction, per group."""
    loss = (torch.sigmoid(token_logits).mean() - tokens / token_logits.numel()) ** 2
    if routable:
        want = (layers_run - n_protected) / len(routable)
        loss = loss + (torch.sigmoid(layer_logits[routable]).mean() - want) ** 2
    return loss


def query_loss(router, target: Target, train: TrainConfig, budgeter: Budgeter, engine, layer_prior,
               use_router_prob: float, generator: torch.Generator, stats: dict) -> torch.Tensor:
    """The preference loss of one query over `budgets_per_query` sampled budgets (one router forward)."""
    cfg = budgeter.config
    routable = cfg.routable()
    n_protected = cfg.n_layers - len(routable)
    u = torch.rand(train.budgets_per_query, generator=generator)
    budgets = train.budget_low + (train.budget_high - train.budget_low) * u
    device = next(router.parameters()).device
    token_logits, layer_logits = router(target.visual.to(device), target.text.to(device), budgets.to(device),
                                        target.layout)
    losses = []
    for b, budget in enumerate(budgets.tolist()):
        if float(torch.rand(1, generator=generator)) < use_router_prob:
            tok_base, lay_base = token_logits[b].detach(), layer_logits[b].detach()
        else:
            tok_base, lay_base = (target.prior + 1e-6).log(), layer_prior
        flows = sample_flows(target, tok_base, lay_base, budget, train.flows, train.noise, budgeter, generator)
        if len(flows) < 2:
            continue
        scored = [(flow_kl(engine, target, keep, skip, cfg.start_layer)[0], keep, skip, t, n)
                  for keep, skip, t, n in flows]
        stats["kl_current"].append(scored[0][0])  # the noise-free flow: how good the current scores are
        # Pairs come from the noisy flows only: against the noise-free flow (the router's own mode) the margin
        # would be large before any learning, and the loss would saturate by sharpening the logits.
        noisy = scored[1:] if len(scored) > 2 else scored
        best, worst = min(noisy, key=lambda s: s[0]), max(noisy, key=lambda s: s[0])
        stats["kl_best"].append(best[0])
        if worst[0] - best[0] < 1e-6:
            continue  # no preference to learn from
        margin = log_pi(token_logits[b], layer_logits[b], best[1], best[2], routable) \
            - log_pi(token_logits[b], layer_logits[b], worst[1], worst[2], routable)
        preference = -F.logsigmoid(train.beta * margin)
        fraction = kept_fraction_loss(token_logits[b], layer_logits[b], best[3], best[4], routable, n_protected)
        losses.append(preference + train.fraction_weight * fraction)
        stats["preference"].append(float(preference.detach()))
    if not losses:
        return token_logits.sum() * 0.0  # keeps every process's backward in step under DDP
    return torch.stack(losses).mean()


# ------------------------------------------------------------------------------------------------ Pareto
def measure_pareto(router, targets: list[Target], engine, budgeter: Budgeter, budgets: list[float],
                   progress: bool = False) -> tuple[list[dict], list[dict]]:
    """For each budget: the layer count whose router-pruned model agrees most often with the full model's answer
    (lowest KL among equals).

    Returns (pareto rows {budget, tokens, layers, kl, agreement}, every measured (budget, layers) row)."""
    cfg = budgeter.config
    routable = cfg.routable()
    n_protected = cfg.n_layers - len(routable)
    device = next(router.parameters()).device
    logits = []
    with torch.no_grad():
        for t in targets:
            z_tok, z_lay = router(t.visual.to(device), t.text.to(device), torch.tensor(budgets, device=device),
                                  t.layout)
            logits.append((z_tok.float().cpu(), z_lay.float().cpu()))
    rows, pareto = [], []
    bar = tqdm(total=len(budgets) * (len(routable) + 1), desc="pareto", disable=not progress, file=sys.stderr)
    for bi, budget in enumerate(budgets):
        best = None
        for n_run in range(len(routable), -1, -1):
            kls, agrees, kept = [], [], []
            for t, (z_tok, z_lay) in zip(targets, logits):
                order = sorted(routable, key=lambda i: float(z_lay[bi, i]))
                skip = frozenset(order[:len(routable) - n_run])
                tokens = budgeter.max_tokens(t, skip, budget)
                if tokens < 1:
                    break
                keep = z_tok[bi].topk(tokens).indices.sort().values if tokens < z_tok.shape[1] else None
                kl, agree = flow_kl(engine, t, keep, skip, cfg.start_layer)
                kls.append(kl), agrees.append(agree), kept.append(tokens)
            bar.update()
            if len(kls) < len(targets):
                continue  # this many layers leave no room for tokens at this budget
            row = {"budget": round(budget, 4), "layers": n_protected + n_run, "tokens": int(np.median(kept)),
                   "kl": float(np.mean(kls)), "agreement": float(np.mean(agrees))}
            rows.append(row)
            # agreement with the full model's answer first (what accuracy measures), KL to break ties
            if best is None or (-row["agreement"], row["kl"]) < (-best["agreement"], best["kl"]):
                best = row
        if best is not None:
            pareto.append(best)
    bar.close()
    return pareto, rows


def baseline_kl(targets: list[Target], engine, budgeter: Budgeter, budget: float, kind: str, seed: int = 0):
    """Mean KL of token-only baselines at a budget (all layers run; router FLOPs not charged): 'prior' (the
    attention prior's top-T, i.e. FastV at layer K) or 'random'."""
    rng = torch.Generator().manual_seed(seed)
    kls = []
    for t in targets:
        n_v = t.visual.shape[0]
        tokens = budgeter.max_tokens(t, frozenset(), budget)
        if tokens < 1:
            return None  # tokens alone cannot reach this budget at layer K
        scores = t.prior if kind == "prior" else torch.rand(n_v, generator=rng)
        keep = scores.topk(tokens).indices.sort().values if tokens < n_v else None
        kls.append(flow_kl(engine, t, keep, frozenset(), budgeter.config.start_layer)[0])
    return float(np.mean(kls))


# ------------------------------------------------------------------------------------------------ training
def build_router_config(predictor, args, sample: Target) -> RouterConfig:
    loaded = predictor.loaded
    n_layers = predictor.engine.n_layers
    n_visual = sample.visual.shape[0]
    width = args.width or auto_width(loaded.config.text_config.hidden_size, n_layers, n_visual, sample.n_text,
                                     predictor.flops.full(sample.shape), share=0.01)
    heads = max(1, width // 16)
    protected_first = args.protected_first if args.protected_first is not None else max(1, round(n_layers / 16))
    return RouterConfig(lm_width=loaded.config.text_config.hidden_size, n_layers=n_layers, width=width,
                        depth=args.depth, heads=heads, protected_first=protected_first,
                        protected_last=args.protected_last, start_layer=args.start_layer, model=fingerprint(loaded))


class TargetCache:
    """Targets are deterministic per query; they are kept in memory up to a byte limit, else recomputed."""

    def __init__(self, predictor, queries, train: TrainConfig, start_layer: int, limit_bytes: float = 2e9):
        self.predictor, self.queries, self.train, self.start_layer = predictor, queries, train, start_layer
        self.limit, self.used, self.store = limit_bytes, 0, {}

    def __getitem__(self, index: int) -> Target:
        if index in self.store:
            return self.store[index]
        image, question = self.queries[index]
        target = make_target(self.predictor, image, question, self.start_layer, self.train.max_new_tokens)
        size = target.log_p.numel() * 4 + target.query.inputs_embeds.numel() * target.query.inputs_embeds.element_size()
        if self.used + size <= self.limit:
            self.store[index] = target
            self.used += size
        return target


def make_accelerator(train: TrainConfig, device: str | None):
    from accelerate import Accelerator

    return Accelerator(gradient_accumulation_steps=train.batch, cpu=device == "cpu")


def train_router(predictor, queries, out: Path, train: TrainConfig, args, progress: bool = True,
                 resume: bool = False, accelerator=None) -> dict:
    """Train (or continue) a router for `predictor`'s model; writes checkpoints to `out`; returns a summary."""
    accelerator = accelerator or make_accelerator(train, str(predictor.loaded.device.type))
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(train.seed)
    n_val = min(train.val, max(len(queries) // 5, 1)) if len(queries) > 1 else 0
    val_queries, train_queries = queries[:n_val], queries[n_val:] or queries
    cache = TargetCache(predictor, train_queries, train, args.start_layer)
    first = cache[0]

    if resume and (out / "router.json").is_file():
        router, meta = load_router(out, predictor.loaded)
        config = meta["config"]
        router.train()
    else:
        config = build_router_config(predictor, args, first)
        router = MetaRouter(config)
    budgeter = Budgeter(predictor.flops, config)
    optimizer = torch.optim.AdamW(router.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    step = 0
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    router, optimizer = accelerator.prepare(router, optimizer)
    layer_prior = torch.tensor(predictor.method("layerdrop").influence())  # block influence: high = keep

    generator = torch.Generator().manual_seed(train.seed * 1000 + rank + 7919 * step)
    order_rng = np.random.default_rng(train.seed + 104729 * step)
    stats = {"kl_current": [], "kl_best": [], "preference": []}
    history = []
    # Not on a terminal (a log file), the bar updates every 30 s instead of redrawing many times a second.
    bar = tqdm(total=train.steps, initial=step, desc="train-router", disable=not (progress and
               accelerator.is_main_process), file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30)
    started = time.time()
    while step < train.steps:
        router.train()
        use_router = min(1.0, step / max(train.warmup, 1))
        for j in range(train.batch):
            index = int(order_rng.integers(len(train_queries)) + rank) % len(train_queries)
            with accelerator.accumulate(router):
                loss = query_loss(router, cache[index], train, budgeter, predictor.engine, layer_prior, use_router,
                                  generator, stats)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        step += 1
        bar.update()
        recent = {k: float(np.mean(v[-train.batch * train.budgets_per_query * 5:])) if v else float("nan")
                  for k, v in stats.items()}
        bar.set_postfix(pref=f"{recent['preference']:.3f}", kl_now=f"{recent['kl_current']:.4f}",
                        kl_best=f"{recent['kl_best']:.4f}", router=f"{use_router:.2f}")
        if step % 10 == 0 or step == train.steps:
            history.append({"step": step, **recent, "router_share": use_router})
        if accelerator.is_main_process and (step % train.save_every == 0 or step == train.steps):
            save_checkpoint(accelerator.unwrap_model(router), optimizer, step, out, train, history)
    bar.close()
    accelerator.wait_for_everyone()
    summary = {"steps": step, "seconds": round(time.time() - started, 1), "history": history}
    if accelerator.is_main_process:
        router = accelerator.unwrap_model(router).eval()
        summary.update(validate(router, predictor, val_queries, train, budgeter, args, progress))
        save_router(router, out, summary.get("pareto"), {"training": summary, "train_config": asdict(train)})
    return summary


def save_checkpoint(router, optimizer, step: int, out: Path, train: TrainConfig, history) -> None:
    previous = read_meta(out).get("pareto", []) if (out / "router.json").is_file() else []
    save_router(router, out, previous, {"training": {"steps": step, "history": history}, "train_config": asdict(train)})
    tmp = out / (STATE_FILE + ".tmp")
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp)
    tmp.replace(out / STATE_FILE)


def validate(router, predictor, val_queries, train: TrainConfig, budgeter: Budgeter, args, progress) -> dict:
    """Pareto table + KL of the router vs the attention prior and random tokens on held-out queries."""
    if not val_queries:
        return {"pareto": []}
    targets = [make_target(predictor, image, question, args.start_layer, train.max_new_tokens)
               for image, question in val_queries]
    grid = [round(b, 2) for b in np.arange(args.pareto_low, args.pareto_high + 1e-9, args.pareto_step)]
    pareto, rows = measure_pareto(router, targets, predictor.engine, budgeter, grid, progress)
    comparison = []
    for row in pareto:
        comparison.append({"budget": row["budget"], "router_kl": row["kl"], "router_agreement": row["agreement"],
                           "prior_tokens_kl": baseline_kl(targets, predictor.engine, budgeter, row["budget"], "prior"),
                           "random_tokens_kl": baseline_kl(targets, predictor.engine, budgeter, row["budget"],
                                                           "random")})
    return {"pareto": pareto, "pareto_all": rows, "validation": comparison, "val_queries": len(targets)}


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    from par_demo.predict import add_model_arguments

    add_model_arguments(parser)
    defaults = TrainConfig()
    parser.add_argument("--data", required=True, help="JSONL with image + question per line, or an image folder")
    parser.add_argument("--out", required=True, help="output folder (router.safetensors + router.json)")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N queries")
    parser.add_argument("--questions-per-image", type=int, default=2, help="for an image folder")
    for name in ("steps", "batch", "budgets_per_query", "flows", "warmup", "max_new_tokens", "val", "save_every",
                 "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("budget_low", "budget_high", "noise", "beta", "fraction_weight", "lr", "weight_decay"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--width", type=int, default=None, help="router width (default: widest within 1%% FLOPs)")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--protected-first", type=int, default=None, help="default: max(1, N/16)")
    parser.add_argument("--protected-last", type=int, default=1)
    # K=0: the router reads the projected image and the question itself, so unlike FastV it needs no LM layer
    # before it. Measured on the embedded model (48 held-out queries, agreement with the full answer): K=0
    # 0.90 at budget 0.25 and 0.98 at 0.4, against 0.73 and 0.96 with K=2, whose two full layers eat the budget.
    parser.add_argument("--start-layer", type=int, default=0, help="K: the layer visual tokens are dropped at")
    parser.add_argument("--pareto-low", type=float, default=0.15)
    parser.add_argument("--pareto-high", type=float, default=0.9)
    parser.add_argument("--pareto-step", type=float, default=0.05)


def train_config_from_args(args) -> TrainConfig:
    return TrainConfig(**{name: getattr(args, name) for name in TrainConfig.__dataclass_fields__})


def check_args(args, train: TrainConfig) -> None:
    if train.steps < 1 or train.batch < 1 or train.flows < 2 or train.budgets_per_query < 1:
        raise UserError("--steps, --batch, --budgets-per-query must be >= 1 and --flows >= 2")
    if not 0 < train.budget_low <= train.budget_high <= 1:
        raise UserError("budgets must satisfy 0 < --budget-low <= --budget-high <= 1")
    if train.max_new_tokens < 1 or train.save_every < 1 or train.val < 0:
        raise UserError("--max-new-tokens and --save-every must be >= 1, --val >= 0")
    if args.start_layer < 0:
        raise UserError("--start-layer must be >= 0")
    if args.width is not None and (args.width < 4 or args.width % 4):
        raise UserError("--width must be a multiple of 4, at least 4")
    if not 0 < args.pareto_low <= args.pareto_high <= 1 or args.pareto_step <= 0:
        raise UserError("the Pareto grid needs 0 < --pareto-low <= --pareto-high <= 1 and --pareto-step > 0")


def run(args) -> int:
    from par_demo.predict import Predictor, load_from_args

    train = train_config_from_args(args)
    check_args(args, train)
    queries = read_queries(args.data, args.questions_per_image, train.seed)
    if args.limit:
        queries = queries[:args.limit]
    out = Path(args.out)
    if not args.resume and (out / STATE_FILE).is_file():
        raise UserError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(train, args.device)
    # Under `accelerate launch` each process loads the frozen model onto its own device.
    device = args.device or str(accelerator.device)
    args.device = device
    predictor = Predictor(load_from_args(args))
    if predictor.engine.n_layers < 2:
        raise UserError("a router needs a model with at least 2 decoder layers")
    for p in predictor.loaded.model.parameters():
        p.requires_grad_(False)  # the LVLM stays frozen
    summary = train_router(predictor, queries, out, train, args, progress=True, resume=args.resume,
                           accelerator=accelerator)
    print(json.dumps({k: summary[k] for k in ("steps", "seconds", "pareto", "validation") if k in summary},
                     indent=1))
    print(f"router saved to {out}", file=sys.stderr)
    return 0
