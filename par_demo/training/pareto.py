"""The router's Pareto table, measured on held-out queries after training and saved with it.

For each budget of a grid: the layer count L (and the tokens it leaves) whose router-pruned model most often gives
the full model's answer, the lower KL breaking ties. `methods/par.py` reads it to choose the split at a budget.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm import tqdm

from par_demo.methods.par import select_tokens
from par_demo.training.flows import Budgeter, make_flow, score_flows


def measure_pareto(router, targets, engine, budgeter: Budgeter, budgets: list[float], progress: bool = False,
                   batch_rows: int = 64) -> tuple[list[dict], list[dict]]:
    """Returns (pareto rows {budget, tokens, layers, kl, agreement}, every measured (budget, layers) row)."""
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
    for bi, budget in enumerate(tqdm(budgets, desc="pareto", disable=not progress, file=sys.stderr)):
        # every (layer count, held-out query) flow of this budget, scored in batches
        settings, flows = [], []
        for n_run in range(len(routable), -1, -1):
            chosen = []
            for t, (z_tok, z_lay) in zip(targets, logits):
                order = sorted(routable, key=lambda i: float(z_lay[bi, i]))
                skip = frozenset(order[:len(routable) - n_run])
                tokens = budgeter.max_tokens(t, skip, budget)
                if tokens < 1:
                    break  # this many layers leave no room for tokens at this budget
                keep = select_tokens(cfg, t.visual, z_tok[bi], tokens) if tokens < z_tok.shape[1] else None
                chosen.append((t, make_flow(cfg, t, keep, skip, tokens, n_protected + n_run)))
            if len(chosen) == len(targets):
                settings.append((n_run, len(flows)))
                flows += chosen
        scores = score_flows(engine, flows, cfg.start_layer, batch_rows)
        best = None
        for n_run, first in settings:
            part = scores[first:first + len(targets)]
            row = {"budget": round(budget, 4), "layers": n_protected + n_run,
                   "tokens": int(np.median([f.tokens for _, f in flows[first:first + len(targets)]])),
                   "kl": float(np.mean([kl for kl, _ in part])), "agreement": float(np.mean([a for _, a in part]))}
            rows.append(row)
            # agreement with the full model's answer first (what accuracy measures), KL to break ties
            if best is None or (-row["agreement"], row["kl"]) < (-best["agreement"], best["kl"]):
                best = row
        if best is not None:
            pareto.append(best)
    return pareto, rows


def baseline_kl(targets, engine, budgeter: Budgeter, budget: float, kind: str, seed: int = 0,
                batch_rows: int = 64) -> float | None:
    """Mean KL of token-only baselines at a budget (all layers run; as many tokens as the router's flows could keep
    there, its FLOPs charged, and absorbed the same way, so that only the choice of tokens differs): 'prior' (the
    attention prior's top-T, i.e. FastV at layer K) or 'random'."""
    rng = torch.Generator().manual_seed(seed)
    flows = []
    for t in targets:
        n_v = t.visual.shape[0]
        tokens = budgeter.max_tokens(t, frozenset(), budget)
        if tokens < 1:
            return None  # tokens alone cannot reach this budget at layer K
        scores = t.prior if kind == "prior" else torch.rand(n_v, generator=rng)
        keep = scores.topk(tokens).indices.sort().values if tokens < n_v else None
        flows.append((t, make_flow(budgeter.config, t, keep, frozenset(), tokens, budgeter.config.n_layers)))
    return float(np.mean([kl for kl, _ in score_flows(engine, flows, budgeter.config.start_layer, batch_rows)]))


def validate(router, targets, engine, budgeter: Budgeter, grid: list[float], progress: bool,
             batch_rows: int = 64) -> dict:
    """Pareto table + KL of the router vs the attention prior and random tokens on held-out queries."""
    if not targets:
        return {"pareto": []}
    pareto, rows = measure_pareto(router, targets, engine, budgeter, grid, progress, batch_rows)
    comparison = [{"budget": row["budget"], "router_kl": row["kl"], "router_agreement": row["agreement"],
                   "prior_tokens_kl": baseline_kl(targets, engine, budgeter, row["budget"], "prior",
                                                  batch_rows=batch_rows),
                   "random_tokens_kl": baseline_kl(targets, engine, budgeter, row["budget"], "random",
                                                   batch_rows=batch_rows)}
                  for row in pareto]
    return {"pareto": pareto, "pareto_all": rows, "validation": comparison, "val_queries": len(targets)}
