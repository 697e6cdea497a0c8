"""Random visual tokens kept from layer K on: the baseline that is stronger than people expect."""

import torch

from par_demo.engine import PruningPlan
from par_demo.methods.base import TokenMethod


class RandomTokens(TokenMethod):
    name = "random"
    extra = "baseline"

    def __init__(self, context, seed: int = 0):
        super().__init__(context)
        # One generator per method instance: each query gets its own random subset, and a run of many queries is
        # reproducible from its seed as long as nothing else plans with this instance in between (the cost model's
        # timing of a method's own work and the app's warm-up do: they draw from the same stream).
        self.generator = torch.Generator().manual_seed(seed)

    def make_plan(self, query, setting):
        if setting.tokens >= query.n_visual:
            return PruningPlan(start_layer=setting.start_layer)
        keep = torch.randperm(query.n_visual, generator=self.generator)[: setting.tokens].sort().values
        return PruningPlan(start_layer=setting.start_layer, keep_visual=keep.to(query.image_positions.device))
