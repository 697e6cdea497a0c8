"""Absorbing dropped visual tokens: proportional attention for pruned sequences.

Dropping visual tokens does more than lose what they showed: every token left gets a larger share of the attention.
A model that reads "how much of the image is like this" from its attention (counting all objects is such a
question: on the embedded model, keeping exactly the objects' patches answers 22 % of "how many objects?" right,
adding 30 random background patches 71 %) is misled by that even when every object survived.

So each dropped token is absorbed by the kept token most like it (cosine of the features the language model
receives), and a kept token that stands for s tokens gets + log s on its attention logits from layer K on
(`PruningPlan.kept_sizes`; the engine adds it in prefill and decode). This is token merging's proportional attention
(ToMe, Bolya et al., ICLR 2023): s identical keys attract exactly what one key with + log s does. Features and
positions are left as they are; only the attention mass moves.

Cost (counted in the budget): normalising the k kept tokens, 3 k D, and the products of the n - k dropped ones with
them, 2 (n - k) k D (a dropped token's own norm changes none of its cosines' order, so it is not taken). The additions
of the bias are element-wise work like the softmax, not counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def absorbed_sizes(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """features (n, D) of every visual token, keep (k,) kept indices -> sizes (k,) in keep's order: 1 + the number of
    dropped tokens whose most similar kept token it is."""
    n = features.shape[0]
    keep = keep.to(features.device)
    sizes = torch.ones(keep.numel(), device=features.device)
    if keep.numel() == 0 or keep.numel() == n:
        return sizes
    dropped = torch.ones(n, dtype=torch.bool, device=features.device)
    dropped[keep] = False
    # a dropped token's own norm scales its whole row of cosines: only the kept tokens need normalising
    kept = F.normalize(features[keep].float(), dim=-1)
    nearest = (features[dropped].float() @ kept.T).argmax(dim=1)  # (n - k,): the kept token each dropped one joins
    return sizes + torch.bincount(nearest, minlength=keep.numel()).to(sizes.dtype)


def absorb_flops(n: int, k: int, width: int) -> float:
    """What `absorbed_sizes` adds to the prefill when k of n visual tokens of `width` features are kept."""
    if not 0 < k < n:
        return 0.0
    return 3.0 * k * width + 2.0 * (n - k) * k * width
