"""FastV: keep the visual tokens the last position attends to most at layer K-1.

The engine computes only the needed attention row (the last query against all keys) at layer K-1, with SDPA
doing the real attention, and gathers the top-T tokens out before layer K.
"""

from par_demo.engine import PruningPlan
from par_demo.methods.base import Method, Setting, check_count, token_candidates


class FastV(Method):
    name = "fastv"
    uses_tokens = True
    min_start_layer = 1  # ranks tokens by the attention of layer K-1

    def attention_rows(self):
        return 1

    def candidates(self, query, start_layer):
        return token_candidates(query, start_layer)

    def fixed(self, query, tokens, layers, start_layer):
        return Setting(check_count(tokens, 0, query.n_visual, "tokens kept"), frozenset(), start_layer)

    def make_plan(self, query, setting):
        if setting.tokens >= query.n_visual:
            return PruningPlan(start_layer=setting.start_layer)
        return PruningPlan(start_layer=setting.start_layer, keep_visual_count=setting.tokens)
