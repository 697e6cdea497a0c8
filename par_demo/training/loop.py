"""The training loop: preference pairs from scored flows, data parallel through accelerate, checkpoints.

Per optimizer step the processes share `batch` queries (each takes its part, in `grad_accum` micro-batches). For each query the router
scores every visual token and layer at `budgets_per_query` sampled budgets (one forward); around those scores, or
the attention prior during warm-up, `flows` pruning flows per budget are sampled; every flow of the micro-batch is
scored in one batched forward of the frozen model (`flows.score_flows`); best vs worst flow of each budget is a
preference pair:   -log sigmoid(beta * (log pi(S+) - log pi(S-)))
where log pi averages the bits' log-likelihoods within each group (tokens, layers) and adds the two groups, so 576
token bits do not drown 30 layer bits. A second term keeps the mean keep probability of each group at the better
flow's kept fraction: without it the preference loss alone only sharpens the logits.

Processes (`accelerate launch`) share nothing but the router's gradients, summed before every step: each process's
loss is its queries' part of the step's mean, so N processes take the same optimizer steps over the same queries as
one process would (the same draw of `batch` queries, split between them), in about 1/N of the time.
The frozen model runs in the dtype it was loaded in (bf16 on GPU by default, or 4-bit); the router's weights
stay fp32, and on GPU its forward runs under bf16/fp16 autocast (`--precision`).
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from par_demo.errors import UserError
from par_demo.router import (MetaRouter, RouterConfig, auto_width, fingerprint, load_router, read_meta, router_cells,
                             save_router)
from par_demo.training.flows import Budgeter, kept_fraction_loss, log_pi, sample_flows, score_flows
from par_demo.training.pareto import validate
from par_demo.training.targets import TargetCache

STATE_FILE = "train_state.pt"  # optimizer + step, for --resume (weights only: loaded with weights_only=True)


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch: int = 4  # queries per optimizer step, over all processes
    grad_accum: int = 1  # micro-batches the step's queries are split into (one batched forward each)
    budgets_per_query: int = 2  # budgets sampled per query (one router forward scores them all)
    flows: int = 6  # pruning flows sampled per budget
    flow_batch: int = 16  # flows per batched forward of the frozen model (0: each flow alone, the unbatched path)
    budget_low: float = 0.15
    budget_high: float = 0.9
    noise: float = 1.0  # std of the Gaussian noise on standardised scores
    warmup: int = 60  # steps over which flows move from the attention prior to the router's own scores
    beta: float = 5.0
    fraction_weight: float = 1.0  # the kept-fraction regulariser
    pairs: str = "extremes"  # preference pairs per budget: best vs worst flow ("extremes"), or every ordered pair ("all")
    prior: str = "attention"  # token prior: "attention" (last prompt row at `prior_layer`), "relevance", "cdpruner"
    prior_share: float = 0.0  # after warm-up, this share of the budgets still samples its flows around the prior
    prior_layer: int = -1  # decoder layer of the attention prior; -1 = K-1 (FastV's row)
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_new_tokens: int = 8
    val: int = 12  # held-out queries for the Pareto table
    save_every: int = 50
    seed: int = 0
    max_minutes: float = 0.0  # stop (and save, and validate) after this long; 0 = no limit
    precision: str = "auto"  # router autocast: auto (bf16 on a GPU that has it, else none), fp32, bf16, fp16


def new_stats() -> dict:
    return {"kl_current": [], "kl_best": [], "preference": []}


def batch_loss(router, targets, train: TrainConfig, budgeter: Budgeter, engine, layer_prior, use_router_prob: float,
               generator: torch.Generator, stats: dict, autocast=None) -> tuple[torch.Tensor, int]:
    """(the preference loss of a micro-batch of queries, summed over its queries, each query's loss the mean over its
    budgets; the number of flows scored). A sum, so that any split of a step's queries into chunks and processes adds
    up to the same step loss. One router forward per query (all its budgets), one batched forward of the frozen
    model for every flow of every query."""
    cfg = budgeter.config
    routable = cfg.routable()
    n_protected = cfg.n_layers - len(routable)
    device = next(router.parameters()).device
    routed, rows, groups = [], [], []  # groups: (query, budget index, first row, number of flows)
    for q, target in enumerate(targets):
        u = torch.rand(train.budgets_per_query, generator=generator)
        budgets = train.budget_low + (train.budget_high - train.budget_low) * u
        with autocast() if autocast else nullcontext():
            token_logits, layer_logits = router(target.visual.to(device), target.text.to(device), budgets.to(device),
                                                target.layout)
        routed.append((token_logits.float(), layer_logits.float()))
        for b, budget in enumerate(budgets.tolist()):
            if float(torch.rand(1, generator=generator)) < use_router_prob:
                tok_base, lay_base = token_logits[b].detach(), layer_logits[b].detach()
            else:
                tok_base, lay_base = (target.prior + 1e-6).log(), layer_prior
            flows = sample_flows(target, tok_base, lay_base, budget, train.flows, train.noise, budgeter, generator)
            if len(flows) >= 2:
                groups.append((q, b, len(rows), len(flows)))
                rows += [(target, f) for f in flows]
    scores = score_flows(engine, rows, cfg.start_layer, max(train.flow_batch, 1), batched=train.flow_batch > 0)
    losses: dict[int, list[torch.Tensor]] = {}  # query -> the loss of each of its budgets that had a preference
    for q, b, first, count in groups:
        token_logits, layer_logits = routed[q][0][b], routed[q][1][b]
        scored = [(scores[first + i][0], rows[first + i][1]) for i in range(count)]
        stats["kl_current"].append(scored[0][0])  # the noise-free flow: how good the current scores are
        # Pairs come from the noisy flows only: against the noise-free flow (the router's own mode) the margin
        # would be large before any learning, and the loss would saturate by sharpening the logits.
        noisy = scored[1:] if len(scored) > 2 else scored
        best, worst = min(noisy, key=lambda s: s[0]), max(noisy, key=lambda s: s[0])
        stats["kl_best"].append(best[0])
        if worst[0] - best[0] < 1e-6:
            continue  # no preference to learn from
        # every ordered pair tells the router something; best vs worst alone uses 1 of F (F - 1) / 2 of them
        pairs = [(a, z) for a in noisy for z in noisy if z[0] - a[0] >= 1e-6] if train.pairs == "all" \
            else [(best, worst)]
        log_p = {id(s): log_pi(token_logits, layer_logits, s[1].keep, s[1].skip, routable) for s in noisy}
        margins = torch.stack([log_p[id(a)] - log_p[id(z)] for a, z in pairs])
        preference = -F.logsigmoid(train.beta * margins).mean()
        fraction = kept_fraction_loss(token_logits, layer_logits, best[1].tokens, best[1].layers, routable,
                                      n_protected)
        losses.setdefault(q, []).append(preference + train.fraction_weight * fraction)
        stats["preference"].append(float(preference.detach()))
    # still a graph over every parameter when nothing was learned, so that all processes take the same steps
    anchor = sum(z.sum() + l.sum() for z, l in routed) * 0.0
    return anchor + sum(torch.stack(per_query).mean() for per_query in losses.values()), len(rows)


# ------------------------------------------------------------------------------------------------ set-up
def build_router_config(predictor, args, sample) -> RouterConfig:
    loaded = predictor.loaded
    n_layers = predictor.engine.n_layers
    n_visual = sample.visual.shape[0]
    pool = getattr(args, "pool", 1)
    width = args.width or auto_width(loaded.config.text_config.hidden_size, n_layers, n_visual, sample.n_text,
                                     predictor.flops.full(sample.shape), depth=args.depth, share=0.01,
                                     n_cells=router_cells(sample.layout, pool)[1])
    heads = max(1, width // 16)
    protected_first = args.protected_first if args.protected_first is not None else max(1, round(n_layers / 16))
    return RouterConfig(lm_width=loaded.config.text_config.hidden_size, n_layers=n_layers, width=width,
                        depth=args.depth, heads=heads, protected_first=protected_first,
                        protected_last=args.protected_last, start_layer=args.start_layer,
                        token_selection=args.token_selection, absorb=getattr(args, "absorb", None) is not False,
                        pool=pool, model=fingerprint(loaded))


def mixed_precision(precision: str, device: str | None) -> str:
    """Accelerate's mixed_precision for the router: autocast only on a GPU (on CPU it would only slow it down)."""
    on_gpu = device != "cpu" and torch.cuda.is_available()  # no --device: the GPU when there is one
    if precision == "auto":
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    return "no" if precision == "fp32" or not on_gpu else precision


# The other processes wait at a barrier while the main one measures the Pareto table alone, which on a 2-core CPU took
# over half an hour for a 256-wide model: longer than the process group's default 30-minute timeout, which then
# killed the run before the table was saved. A wait at a barrier costs nothing, so it may last a day.
BARRIER_TIMEOUT = timedelta(hours=24)


def make_accelerator(train: TrainConfig, device: str | None):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision(train.precision, device),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT)])


def sum_gradients(router, accelerator) -> None:
    """Data parallel: every process ends the step with the sum of all processes' router gradients (each process's
    loss is already its share of the step's mean over all its queries)."""
    if accelerator.num_processes == 1:
        return
    for p in router.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad = accelerator.reduce(p.grad, reduction="sum")


def replicas_agree(router, accelerator) -> bool:
    """Do all processes hold the same router weights (as summed gradients and equal steps guarantee)?"""
    checksum = torch.stack([p.detach().double().sum() for p in router.parameters()]).sum().reshape(1)
    every = accelerator.gather(checksum.to(accelerator.device)) if accelerator.num_processes > 1 else checksum
    return bool((every - every[0]).abs().max() <= 1e-9 * max(1.0, float(every[0].abs())))


def all_agree(flag: bool, accelerator) -> bool:
    """True on every process when it is true on any (so that all stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum") > 0)


def router_share(step: int, train: TrainConfig) -> float:
    """The probability that a budget's flows are sampled around the router's own scores rather than the prior:
    rising over the warm-up, then 1 - prior_share. Off-policy flows around a strong prior (CDPruner's selection)
    keep showing the router selections it would not sample itself."""
    return min(1.0 - train.prior_share, step / max(train.warmup, 1))


# ------------------------------------------------------------------------------------------------ training
def split_held_out(queries: list, val: int) -> tuple[list, list]:
    """(held-out queries for the Pareto table, training queries): up to `val`, at most a fifth, at least one when
    there are two; a held-out photo's other questions are held out too, so none of its pixels trains the router."""
    n_val = min(val, max(len(queries) // 5, 1)) if len(queries) > 1 else 0
    while 0 < n_val < len(queries) - 1 and queries[n_val].image == queries[n_val - 1].image:
        n_val += 1
    return queries[:n_val], queries[n_val:] or queries


def train_router(predictor, queries, out: Path, train: TrainConfig, args, progress: bool = True,
                 resume: bool = False, accelerator=None) -> dict:
    """Train (or continue) a router for `predictor`'s model; writes checkpoints to `out`; returns a summary."""
    accelerator = accelerator or make_accelerator(train, str(predictor.loaded.device.type))
    rank, world = accelerator.process_index, accelerator.num_processes
    if train.batch < world:
        raise UserError(f"--batch {train.batch} is the queries of one step over all processes: give at least one "
                        f"per process ({world})")
    torch.manual_seed(train.seed)
    val_queries, train_queries = split_held_out(queries, train.val)
    saved, stale_table = {}, False  # the saved run's training figures; its Pareto table no longer describes it
    if resume and (out / "router.json").is_file():
        router, meta = load_router(out, predictor.loaded)
        config, saved = meta["config"], read_meta(out).get("training", {})
        if getattr(args, "absorb", None) is not None and bool(args.absorb) != config.absorb:
            config.absorb, stale_table = bool(args.absorb), True
        if accelerator.is_main_process:
            note_kept_shape(config, args)
        cache = TargetCache(predictor, train_queries, train, config.start_layer)  # its prior is read at its K - 1
    else:
        cache = TargetCache(predictor, train_queries, train, args.start_layer)
        config = build_router_config(predictor, args, cache[0])
        router = MetaRouter(config)
    router = router.float().to(accelerator.device).train()  # full precision, whatever the model's dtype
    budgeter = Budgeter(predictor.flops, config)
    optimizer = torch.optim.AdamW(router.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    step, flows_done, history = 0, 0, []
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=True, map_location="cpu")  # saved on a GPU, resumed anywhere
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the moments go on; the rates are this run's flags
            group["lr"], group["weight_decay"] = train.lr, train.weight_decay
        # router.json is written after the weights and before this state, so a run stopped between the two left the
        # state a checkpoint behind: the step count, flows and history go on from router.json, the weights' own.
        step, flows_done = int(saved.get("steps", state["step"])), int(saved.get("flows", state.get("flows", 0)))
        history = saved.get("history", [])
    elif saved:  # a shipped router keeps no optimizer state: its step count, flows and history go on
        step, flows_done, history = int(saved.get("steps", 0)), int(saved.get("flows", 0)), saved.get("history", [])
    first_step = step
    optimizer = accelerator.prepare(optimizer)  # the loss scaler for fp16; the router is not wrapped (see above)
    layer_prior = torch.tensor(predictor.method("layerdrop").influence())  # block influence: high = keep

    generator = torch.Generator().manual_seed(train.seed * 1000 + rank + 7919 * step)
    order_rng = np.random.default_rng(train.seed + 104729 * step)
    stats = new_stats()
    # Not on a terminal (a log file), the bar updates every 30 s instead of redrawing many times a second.
    bar = tqdm(total=train.steps, initial=step, desc="train-router", unit="step", file=sys.stderr,
               disable=not (progress and accelerator.is_main_process),
               mininterval=0.1 if sys.stderr.isatty() else 30)
    started, flows_here, stopped_early = time.time(), 0, False
    while step < train.steps:
        use_router = router_share(step, train)
        # every process draws the same `batch` queries and takes its part of them
        indices = [int(order_rng.integers(len(train_queries))) for _ in range(train.batch)][rank::world]
        micro = math.ceil(len(indices) / max(train.grad_accum, 1))
        for start in range(0, len(indices), micro):
            chunk = [cache[i] for i in indices[start:start + micro]]
            loss, n_flows = batch_loss(router, chunk, train, budgeter, predictor.engine, layer_prior, use_router,
                                       generator, stats, accelerator.autocast)
            accelerator.backward(loss / train.batch)  # this chunk's part of the step's mean over its queries
            flows_here += n_flows
        sum_gradients(router, accelerator)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        elapsed = time.time() - started
        rate = flows_here * world / max(elapsed, 1e-9)  # this process's count, times the processes
        recent = {k: float(np.mean(v[-train.batch * train.budgets_per_query * 5:])) if v else float("nan")
                  for k, v in stats.items()}
        bar.update()
        bar.set_postfix(flows_s=f"{rate:.1f}", pref=f"{recent['preference']:.3f}",
                        kl_now=f"{recent['kl_current']:.4f}", router=f"{use_router:.2f}", refresh=False)
        if step % 10 == 0 or step == train.steps:
            history.append({"step": step, **recent, "router_share": use_router})
        out_of_time = all_agree(bool(train.max_minutes) and elapsed > 60 * train.max_minutes, accelerator)
        if accelerator.is_main_process and (step % train.save_every == 0 or step == train.steps or out_of_time):
            save_checkpoint(router, optimizer, step, flows_done + flows_here * world, out, train, history,
                            keep_table=resume and not stale_table)
        if out_of_time:
            stopped_early = step < train.steps
            break
    bar.close()
    accelerator.wait_for_everyone()
    seconds = time.time() - started
    if world > 1:  # every process's own count, summed
        flows_here = int(accelerator.reduce(torch.tensor([flows_here], device=accelerator.device), reduction="sum"))
    summary = {"steps": step, "seconds": round(seconds, 1), "flows": flows_done + flows_here,
               "flows_per_s": round(flows_here / max(seconds, 1e-9), 2), "processes": world,
               "replicas_agree": replicas_agree(router, accelerator), "stopped_early": stopped_early,
               "history": history}
    if step == first_step and saved:  # nothing trained in this run (it re-measures the table): the run's own figures
        summary.update({k: saved[k] for k in ("seconds", "flows_per_s", "processes", "replicas_agree") if k in saved})
    if accelerator.is_main_process:
        router.eval()
        grid = [round(b, 2) for b in np.arange(args.pareto_low, args.pareto_high + 1e-9, args.pareto_step)]
        val_cache = TargetCache(predictor, val_queries, train, config.start_layer)
        targets = [val_cache[i] for i in range(len(val_queries))]
        summary.update(validate(router, targets, predictor.engine, budgeter, grid, progress,
                                max(train.flow_batch, 1)))
        save_router(router, out, summary.get("pareto"), {"training": summary, "train_config": asdict(train)})
    accelerator.wait_for_everyone()
    return summary


def note_kept_shape(config: RouterConfig, args) -> None:
    """Resuming keeps the saved router's shape: say which of the shape flags given (or defaulted) it overrides."""
    given = {"width": args.width, "depth": args.depth, "pool": getattr(args, "pool", 1),
             "protected_first": args.protected_first, "protected_last": args.protected_last,
             "start_layer": args.start_layer, "token_selection": args.token_selection}
    differ = [f"{name.replace('_', ' ')} {getattr(config, name)} (not {value})" for name, value in given.items()
              if value is not None and value != getattr(config, name)]
    if differ:
        print("resuming: the saved router keeps its shape: " + ", ".join(differ), file=sys.stderr)


def save_checkpoint(router, optimizer, step: int, flows: int, out: Path, train: TrainConfig, history,
                    keep_table: bool = True) -> None:
    previous = read_meta(out).get("pareto", []) if keep_table and (out / "router.json").is_file() else []
    save_router(router, out, previous, {"training": {"steps": step, "flows": flows, "history": history},
                                        "train_config": asdict(train)})
    tmp = out / (STATE_FILE + ".tmp")
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "flows": flows}, tmp)
    tmp.replace(out / STATE_FILE)
