"""PAR's ablations: one part of PAR each, with the same budget search and Pareto split (`methods/par.py`), so that
what each part buys can be measured at equal FLOPs: `par-tokens` (tokens only), `par-layers` (layers only),
`par-drop` (no absorbing), `par-prior` (the attention prior instead of the router's scores)."""

from __future__ import annotations

import torch

from par_demo.engine import PruningPlan
from par_demo.methods.par import Par


class ParTokens(Par):
    """Ablation: the router chooses visual tokens only; every layer runs."""

    name = "par-tokens"
    extra = "ablation"
    uses_layers = False
    route_layers = False


class ParLayers(Par):
    """Ablation: the router chooses layers only; every visual token is kept."""

    name = "par-layers"
    extra = "ablation"
    uses_tokens = False
    route_tokens = False


class ParDrop(Par):
    """Ablation: PAR's routing and split with dropped tokens simply gone (no absorption, no proportional attention),
    as in the paper: what absorbing them buys."""

    name = "par-drop"
    extra = "ablation"
    absorbs = False


class ParPrior(Par):
    """Ablation: PAR's budget split with the attention prior the router is trained from instead of its scores.

    Tokens: FastV's attention row at layer K-1 (so K >= 1 and layer K-1 always runs); layers: block influence.
    No router runs, so none of its FLOPs are charged; the one attention row is.
    """

    name = "par-prior"
    extra = "ablation"
    min_start_layer = 1
    absorbs = False  # FastV's rule keeps its tokens inside the engine; compare with par-drop

    def start_layer(self):
        return max(1, self.config.start_layer)  # FastV's row is read at layer K-1

    def route(self, query, budget):
        return torch.zeros(query.n_visual), self.context.method("layerdrop").layer_scores().float()

    def min_layers(self) -> int:
        # layer K-1 runs too (FastV's row is read there): one layer more when the router could have skipped it
        return super().min_layers() + (self.start_layer() - 1 in self.config.routable())

    def skip_for(self, layer_logits, kept_layers, start_layer=0):
        # FastV's scores are read at layer K-1: it must run, so it is never a candidate for skipping
        routable = [i for i in self.config.routable() if i != start_layer - 1]
        n_skip = min(self.n_layers - kept_layers, len(routable))
        logits = layer_logits.tolist()
        return frozenset(sorted(routable, key=logits.__getitem__)[:n_skip])

    def extra_flops(self, query, setting):
        return 0.0

    def attention_rows(self):
        return 1

    def make_plan(self, query, setting):
        _, influence = self.route(query, self._budget)
        keep_count = setting.tokens if setting.tokens < query.n_visual else None
        return PruningPlan(start_layer=setting.start_layer, keep_visual_count=keep_count,
                           skip_layers=setting.skip, layer_scores=influence / influence.max().clamp_min(1e-12))
