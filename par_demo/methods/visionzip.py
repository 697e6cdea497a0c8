"""VisionZip (Yang et al., CVPR 2025): the tokens the vision tower itself attends to most, plus a few tokens merged
from the rest, before the language model.

1. Dominant tokens: the top of the tower's own attention (`Query.dominance`, given by the model's family: LLaVA's
   CLIP tower scores each patch by the CLS token's attention at the feature layer, averaged over heads; Qwen2.5-VL's
   tower has no CLS token, so each merged token is scored by the mean attention it receives in the tower's last
   full-attention block).
2. Contextual tokens: of the remaining tokens, evenly spaced ones (every (remaining / C)-th in sequence order) are
   targets; every other remaining token joins the target it is most similar to, and each group becomes one token.
The split follows the paper's settings for LLaVA-1.5 (54 + 10 of 64 tokens, 108 + 20 of 128, 162 + 30 of 192):
C = round(5 T / 32) contextual tokens of T.

Differences from the paper, which merges the tower's hidden states before the connector and compares keys: here a
group is the mean of its tokens as the language model receives them (after the connector), similarity is the
cosine of those features, and the merged token takes its target's position (K = 0, original position ids), so
merging needs nothing from the family beyond the attention score.

Cost (counted in the budget): the family's attention score (`Query.dominance_flops`: one CLS row for LLaVA; every
score row of one block for Qwen2.5-VL) and the similarities of the merged tokens to the targets, 2 (R - C) C D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from par_demo.errors import UserError
from par_demo.methods.base import PreLLMMethod, Selection


def contextual_count(tokens: int) -> int:
    return round(tokens * 5 / 32)


def merge_into_targets(features: torch.Tensor, rest: torch.Tensor, n_targets: int):
    """Evenly spaced targets among `rest`; every other token of `rest` is averaged into its most similar target.
    -> (target indices (C,), merged features (C, D))."""
    step = max(1, rest.numel() // n_targets)
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
    is_target[torch.arange(0, rest.numel(), step, device=rest.device)[:n_targets]] = True
    targets, others = rest[is_target], rest[~is_target]
    x = features.float()
    sums, counts = x[targets].clone(), torch.ones(n_targets, device=x.device)
    if others.numel():
        similarity = F.normalize(x[others], dim=-1) @ F.normalize(x[targets], dim=-1).T  # (R - C, C)
        group = similarity.argmax(dim=1)
        sums.index_add_(0, group, x[others])
        counts.index_add_(0, group, torch.ones(others.numel(), device=x.device))
    return targets, (sums / counts[:, None]).to(features.dtype)


class VisionZip(PreLLMMethod):
    name = "visionzip"

    def extra_flops(self, query, setting):
        n, t = query.n_visual, setting.tokens
        if not 0 < t < n:
            return 0.0
        c = contextual_count(t)
        rest = n - (t - c)
        return query.dominance_flops + 2.0 * (rest - c) * c * query.image_features.shape[1]

    def select(self, query, tokens):
        if query.dominance is None:
            raise UserError("visionzip needs the vision tower's own attention, which this model family does not give")
        features = query.image_features
        scores = query.dominance().float().to(features.device)
        n_context = contextual_count(tokens)
        dominant = torch.topk(scores, tokens - n_context).indices
        if n_context == 0:
            return Selection(dominant, scores=scores)
        is_rest = torch.ones(query.n_visual, dtype=torch.bool, device=features.device)
        is_rest[dominant] = False
        targets, merged = merge_into_targets(features, is_rest.nonzero().squeeze(1), n_context)
        return Selection(torch.cat([dominant, targets]), torch.cat([features[dominant], merged]), scores)
