"""Pruning flows: sampling them within a FLOPs budget, and scoring many of them in one batched forward.

A flow is one way to prune one query: the visual tokens kept (from layer K on) and the decoder layers skipped.
Its score is KL(full || pruned) over the teacher-forced answer. Training scores thousands of flows, so they run
batched: every flow is its query's prompt + answer, gathered down to its kept tokens, right-padded to the longest
flow of the batch (causal attention alone keeps real tokens blind to the padding); each token keeps its original position id
(1-D or M-RoPE's three axes), and a layer is run only on the flows that do not skip it. The result equals running
each flow alone (`flow_kl`, the engine's own prefill; tested to 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from par_demo.engine import PruningPlan, attention_mask, key_bias, rms_norm
from par_demo.methods.absorb import absorb_flops, absorbed_sizes
from par_demo.methods.par import select_tokens, selection_flops, standardise
from par_demo.router import RouterConfig, router_cells, router_flops


@dataclass
class Flow:
    keep: torch.Tensor | None  # visual tokens kept (indices); None = all
    skip: frozenset[int]  # decoder layers not run
    tokens: int  # visual tokens kept
    layers: int  # decoder layers run
    sizes: torch.Tensor | None = None  # proportional attention: what each kept token stands for (keep's order)


def make_flow(config: RouterConfig, target, keep: torch.Tensor | None, skip: frozenset[int], tokens: int,
              layers: int) -> Flow:
    """A flow, with its kept tokens' sizes when the router absorbs dropped tokens (as `par` will at inference)."""
    sizes = absorbed_sizes(target.visual, keep) if config.absorb and keep is not None and keep.numel() else None
    return Flow(keep, skip, tokens, layers, sizes)


class Budgeter:
    """Which (tokens, skipped layers) fit a FLOPs budget, for one model and router size."""

    def __init__(self, flops, config: RouterConfig):
        self.flops, self.config = flops, config

    def max_tokens(self, target, skip, budget: float) -> int:
        """The most visual tokens that fit `budget` with `skip` skipped; -1 when even none fit."""
        n_v, width = target.visual.shape
        extra = router_flops(self.config, n_v, target.n_text, router_cells(target.layout, self.config.pool)[1])
        limit = budget * self.flops.full(target.shape)

        def cost(tokens):
            kept = None if tokens >= n_v else tokens
            chosen = extra + selection_flops(self.config, n_v, tokens, width)
            if self.config.absorb:
                chosen += absorb_flops(n_v, tokens, width)
            return self.flops.prefill(target.shape, kept, skip, self.config.start_layer, router=chosen)

        if cost(n_v) <= limit:  # every token: nothing absorbed, nothing charged for it (cost dips at n_v)
            return n_v
        if cost(0) > limit:
            return -1
        low, high = 0, n_v  # invariant: cost(low) fits
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cost(mid) <= limit else (low, mid - 1)
        return low


def sample_flows(target, token_scores, layer_scores, budget: float, n_flows: int, noise: float,
                 budgeter: Budgeter, generator: torch.Generator) -> list[Flow]:
    """Flows around (token_scores (n_v,), layer_scores (N,)). The first is noise-free (the current scores' own
    choice at a random split)."""
    cfg = budgeter.config
    routable = torch.tensor(cfg.routable(), dtype=torch.long)
    n_protected = cfg.n_layers - len(routable)
    tok = standardise(token_scores.float().cpu())
    lay = standardise(layer_scores.float().cpu()[routable]) if len(routable) > 1 else layer_scores.float().cpu()[routable]
    flows = []
    for _ in range(n_flows * 3):  # a few retries for layer counts that leave no room for tokens
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
        keep = select_tokens(cfg, target.visual, noisy_tok, tokens) if tokens < tok.numel() else None
        flows.append(make_flow(cfg, target, keep, skip, tokens, n_protected + n_run))
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


# ------------------------------------------------------------------------------------------------ scoring
def kl_and_agreement(target, logits: torch.Tensor) -> tuple[float, bool]:
    """(KL(full || pruned) averaged over the answer tokens, every answer token still the argmax?)."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    kl = (target.log_p.exp() * (target.log_p - log_q)).sum(-1).mean().item()
    agree = bool((logits.argmax(-1) == torch.tensor(target.answer, device=logits.device)).all())
    return kl, agree


def flow_kl(engine, target, keep: torch.Tensor | None, skip: frozenset[int], start_layer: int,
            sizes: torch.Tensor | None = None):
    """One flow alone, through the engine's own prefill: the reference the batched path is tested against."""
    plan = PruningPlan(start_layer=start_layer, keep_visual=keep, skip_layers=skip, kept_sizes=sizes)
    logits = engine.prefill(target.query, plan, n_logits=target.m).logits.reshape(target.m, -1)
    return kl_and_agreement(target, logits)


def row_positions(query) -> torch.Tensor:
    """The query's position ids without the batch axis: (L,) for 1-D RoPE, (3, L) for M-RoPE."""
    return query.positions.select(-2, 0)


def kept_sequence(query, keep: torch.Tensor | None) -> torch.Tensor:
    """Indices of the sequence positions a flow keeps (every text token, its kept visual tokens)."""
    if keep is None:
        return torch.arange(query.length, device=query.input_ids.device)
    is_kept = torch.ones(query.length, dtype=torch.bool, device=query.input_ids.device)
    is_kept[query.image_positions] = False
    is_kept[query.image_positions[keep.to(query.image_positions.device)]] = True
    return is_kept.nonzero().squeeze(1)


def right_pad(hidden: list[torch.Tensor], positions: list[torch.Tensor]):
    """Rows of different lengths -> (h (B, n, D), positions (B, n) or (3, B, n), lengths).

    Padding goes after each row's last token, so a causal mask alone keeps every real token blind to it: no mask
    tensor, and SDPA's fast causal kernel. What the padding positions compute is never read."""
    lengths = [h.shape[0] for h in hidden]
    n, b = max(lengths), len(hidden)
    h = hidden[0].new_zeros(b, n, hidden[0].shape[-1])
    pos = positions[0].new_zeros(*positions[0].shape[:-1], b, n)
    for r, (row, p) in enumerate(zip(hidden, positions)):
        h[r, :row.shape[0]] = row
        pos[..., r, :row.shape[0]] = p
    return h, pos, lengths


def kept_bias(query, flow: Flow, kept: torch.Tensor) -> torch.Tensor:
    """(len(kept),) proportional attention's key bias of a flow's gathered sequence: log size at its kept visual
    tokens' places, 0 at text (and everywhere when the flow absorbs nothing)."""
    if flow.sizes is None:
        return torch.zeros(kept.numel(), device=kept.device)
    order = flow.keep.argsort()
    slots = torch.searchsorted(kept, query.image_positions[flow.keep.to(kept.device)[order]])
    return key_bias(kept.numel(), slots, flow.sizes[order])


def run_batch(engine, rows: list[tuple[object, Flow]], start_layer: int) -> list[torch.Tensor]:
    """Teacher-forced logits (m, vocab) of every (target, flow) row, all rows in one batched forward."""
    absorbs = any(f.sizes is not None for _, f in rows)

    def gathered(source: list[torch.Tensor]):
        kept = [kept_sequence(t.query, f.keep) for t, f in rows]
        hidden = [row[k] for row, k in zip(source, kept)]
        positions = [row_positions(t.query)[..., k] for (t, _), k in zip(rows, kept)]
        h, pos, lengths = right_pad(hidden, positions)
        mask = None
        if absorbs:  # padding keys get 0: the causal mask already hides them from every real query
            bias = h.new_zeros(h.shape[:2])
            for r, ((t, f), k) in enumerate(zip(rows, kept)):
                bias[r, :k.numel()] = kept_bias(t.query, f, k)
            mask = attention_mask(bias, h.shape[1], h.shape[1])  # (B, 1, n, n)
        return h, pos, lengths, mask

    with torch.inference_mode():
        mask = None
        if start_layer == 0:  # gather before the first layer: no row ever holds a dropped token
            h, pos, lengths, mask = gathered([t.query.inputs_embeds[0] for t, _ in rows])
        else:
            h, pos, lengths = right_pad([t.query.inputs_embeds[0] for t, _ in rows],
                                        [row_positions(t.query) for t, _ in rows])
        rope = engine.rope(h, pos)
        for i in range(engine.n_layers):
            if i == start_layer and i > 0:  # the gather: each row keeps its own tokens, with their positions
                h, pos, lengths, mask = gathered(list(h))
                rope = engine.rope(h, pos)
            running = [r for r, (_, f) in enumerate(rows) if i not in f.skip]
            if len(running) == len(rows):
                h, _ = engine.run_layer(i, h, rope, None, mask=mask)
            elif running:  # only the flows that run this layer; the others pass their hidden states on
                index = torch.tensor(running, device=h.device)
                h[index], _ = engine.run_layer(i, h[index], tuple(part[index] for part in rope), None,
                                               mask=None if mask is None else mask[index])
        answers = torch.cat([h[r, n - t.m:n] for r, ((t, _), n) in enumerate(zip(rows, lengths))])
        logits = engine.lm_head(rms_norm(engine.lm.norm, answers)).float()
        return list(logits.split([t.m for t, _ in rows]))


def score_flows(engine, rows: list[tuple[object, Flow]], start_layer: int, batch_rows: int = 16,
                batched: bool = True, slack: float = 0.1) -> list[tuple[float, bool]]:
    """(KL, agreement) of every (target, flow) row. Rows are sorted by length and run up to `batch_rows` at a time,
    a batch holding only rows within `slack` (10 %) of its shortest: padding is computed like real tokens, and flows
    of one budget differ a lot in length (fewer layers leave room for more tokens). `batched=False` runs each flow
    alone through the engine (the old path)."""
    if not batched:
        return [flow_kl(engine, t, f.keep, f.skip, start_layer, f.sizes) for t, f in rows]
    length = [t.query.length - t.query.n_visual + (f.tokens if f.keep is not None else t.query.n_visual)
              for t, f in rows]
    order = sorted(range(len(rows)), key=lambda r: length[r])
    chunks, chunk = [], []
    for r in order:
        if chunk and (len(chunk) == batch_rows or length[r] > (1 + slack) * length[chunk[0]]):
            chunks.append(chunk)
            chunk = []
        chunk.append(r)
    chunks += [chunk] if chunk else []
    scores: list = [None] * len(rows)
    for chunk in chunks:
        for r, logits in zip(chunk, run_batch(engine, [rows[r] for r in chunk], start_layer)):
            scores[r] = kl_and_agreement(rows[r][0], logits)
    return scores
