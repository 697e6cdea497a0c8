"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse visual tokens, before the language model.

Token pruning as a max-min diversity problem: choose T tokens whose smallest pairwise cosine distance (1 - cosine
of their features as the language model receives them) is as large as possible. Solved greedily, as the paper does:
first the token farthest from its own nearest neighbour, then, each time, the token farthest from everything chosen
so far. Nothing depends on the question. The chosen tokens keep their original positions (K = 0).

Cost (counted in the budget): the first choice needs every pairwise distance, 2 n^2 D FLOPs (made a block of rows at
a time, never the whole n x n matrix at once); each choice then adds one row of distances, 2 n D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from par_demo.methods.base import PreLLMMethod, Selection


def max_min_diverse(features: torch.Tensor, k: int, rows_at_once: int = 256) -> torch.Tensor:
    """Greedy max-min diversity over cosine distances: k token indices, in the order they were chosen."""
    x = F.normalize(features.float(), dim=-1)
    n = x.shape[0]
    nearest = torch.empty(n, device=x.device)  # each token's distance to its nearest other token
    for start in range(0, n, rows_at_once):
        rows = torch.arange(start, min(start + rows_at_once, n), device=x.device)
        distance = 1 - x[rows] @ x.T
        distance[torch.arange(rows.numel()), rows] = float("inf")  # not to itself
        nearest[rows] = distance.min(dim=1).values
    chosen = [int(nearest.argmax())]
    to_chosen = 1 - x @ x[chosen[0]]  # each token's distance to the nearest chosen one
    to_chosen[chosen[0]] = -float("inf")
    while len(chosen) < k:
        j = int(to_chosen.argmax())
        chosen.append(j)
        to_chosen = torch.minimum(to_chosen, 1 - x @ x[j])
        to_chosen[j] = -float("inf")  # chosen tokens stay out, even where duplicates leave every distance at 0
    return torch.tensor(chosen, dtype=torch.long)


class DivPrune(PreLLMMethod):
    name = "divprune"

    def extra_flops(self, query, setting):
        n, width = query.n_visual, query.image_features.shape[1]
        if not 0 < setting.tokens < n:
            return 0.0
        return 2.0 * n * width * (n + setting.tokens)  # every pair once, then one row per chosen token

    def select(self, query, tokens):
        return Selection(max_min_diverse(query.image_features, tokens))
