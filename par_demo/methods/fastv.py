"""FastV: keep the visual tokens the last position attends to most at layer K-1.

The engine computes only the needed attention row (the last query against all keys) at layer K-1, with SDPA
doing the real attention, and gathers the top-T tokens out before layer K.
"""

from par_demo.engine import PruningPlan
from par_demo.methods.base import TokenMethod


class FastV(TokenMethod):
    name = "fastv"
    min_start_layer = 1  # ranks tokens by the attention of layer K-1

    def attention_rows(self):
        return 1

    def make_plan(self, query, setting):
        if setting.tokens >= query.n_visual:
            return PruningPlan(start_layer=setting.start_layer)
        return PruningPlan(start_layer=setting.start_layer, keep_visual_count=setting.tokens)
