"""Random visual tokens kept from layer K on: the baseline that is stronger than people expect."""

import torch

from par_demo.engine import PruningPlan
from par_demo.methods.base import Method, Setting, check_count, token_candidates


class RandomTokens(Method):
    name = "random"
    uses_tokens = True

    def __init__(self, predictor, seed: int = 0):
        super().__init__(predictor)
        # One generator per method instance: a run of many queries is reproducible from its seed,
        # while each query still gets its own random subset.
        self.generator = torch.Generator().manual_seed(seed)

    def candidates(self, query, start_layer):
        return token_candidates(query, start_layer)

    def fixed(self, query, tokens, layers, start_layer):
        return Setting(check_count(tokens, 0, query.n_visual, "tokens kept"), frozenset(), start_layer)

    def make_plan(self, query, setting):
        if setting.tokens >= query.n_visual:
            return PruningPlan(start_layer=setting.start_layer)
        keep = torch.randperm(query.n_visual, generator=self.generator)[: setting.tokens].sort().values
        return PruningPlan(start_layer=setting.start_layer, keep_visual=keep.to(query.image_positions.device))
