"""CDPruner (Zhang et al., NeurIPS 2025): keep a diverse set of visual tokens weighted by their relevance to the
question, before the language model.

The selection maximises the determinant of a conditional similarity kernel (a determinantal point process, DPP):
    L_ij = r_i * cos(v_i, v_j) * r_j
where v are the visual tokens as the language model receives them and r_i is token i's relevance to the instruction.
Large det(L_S) means tokens that are relevant (large r) and unlike each other (small cosines). The subset is found
with the fast greedy MAP algorithm for DPPs (Chen et al., NeurIPS 2018): each step adds the token with the largest
remaining "gain" (the part of its kernel vector not explained by the chosen ones) and updates every gain with one
new kernel row. Only the rows of chosen tokens are made, never the whole n x n kernel.

Relevance, as the paper defines it: mean cosine between a visual token and the instruction's tokens, min-max
normalised to (0, 1]. The paper takes both from CLIP's aligned image and text embeddings (LLaVA); models without such
a text tower use the language model's own input space, and so does par-demo for every family: visual tokens after the
connector against the input embeddings of the text that follows the image (the question and the template's closing
words). The authors' LLaVA code negates the CLIP similarity before normalising, an effect of CLIP's space they
observed (their issues #14 and #19); in the language model's space it is not known to hold, so the similarity here
is taken as it is, and the CDPruner figures in these docs are of this variant, not a reproduction of that code.

Cost (counted in the budget): relevance 2 n m D (m text tokens), one kernel row per chosen token 2 n D, and the greedy
updates n T (T - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from par_demo.methods.base import PreLLMMethod, Selection


def instruction_tokens(query) -> torch.Tensor:
    """Input embeddings (m, D) of the text after the last visual token: the question in every family here."""
    return query.inputs_embeds[0, int(query.image_positions.max()) + 1:]


def relevance(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Mean cosine of each visual token with the text tokens, min-max normalised to (0, 1]. -> (n,)"""
    similarity = F.normalize(visual.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T  # (n, m)
    score = similarity.mean(dim=1)
    span = (score.max() - score.min()).clamp_min(1e-6)
    return (score - score.min() + 1e-6) / span


def greedy_dpp(features: torch.Tensor, quality: torch.Tensor, k: int) -> torch.Tensor:
    """Fast greedy MAP of the DPP with kernel L = diag(q) S diag(q), S the cosine similarity of `features`.
    Returns k indices in the order chosen. Once the kernel's rank is used up (k above the feature width), the
    remaining gains are numerically zero and the rest is filled by quality."""
    # double precision: the gains are differences of nearly equal numbers once the chosen tokens span most of the
    # features, and float32 noise there would pass for diversity
    x = F.normalize(features.double(), dim=-1)
    quality = quality.double()
    n = x.shape[0]
    gains = quality ** 2  # diag(L): S_ii = 1
    tiny = 1e-10 * float(gains.max())
    basis = torch.zeros(k, n, device=x.device, dtype=x.dtype)  # Cholesky-style vectors of the chosen tokens
    chosen: list[int] = []
    for i in range(k):
        j = int(gains.argmax())
        if gains[j] <= tiny:
            break
        row = quality[j] * quality * (x @ x[j])  # kernel row L[j, :]
        e = (row - basis[:i, j] @ basis[:i]) / gains[j].sqrt()
        basis[i] = e
        gains = gains - e ** 2
        gains[j] = -float("inf")
        chosen.append(j)
    if len(chosen) < k:
        rest = torch.ones(n, dtype=torch.bool, device=x.device)
        rest[chosen] = False
        order = torch.argsort(quality.masked_fill(~rest, -float("inf")), descending=True)
        chosen += order[:k - len(chosen)].tolist()
    return torch.tensor(chosen, dtype=torch.long)


def dpp_flops(n: int, k: int, width: int) -> float:
    """FLOPs of `greedy_dpp` choosing k of n tokens of `width` features: one kernel row per choice, 2 n D, and the
    updates against the earlier choices, n k (k - 1) in all (fewer if the features' rank runs out first)."""
    return 2.0 * k * n * width + float(n * k * (k - 1))


class CDPruner(PreLLMMethod):
    name = "cdpruner"

    def extra_flops(self, query, setting):
        n, t, width = query.n_visual, setting.tokens, query.image_features.shape[1]
        if not 0 < t < n:
            return 0.0
        m = query.length - 1 - int(query.image_positions.max())  # instruction tokens
        return 2.0 * n * m * width + dpp_flops(n, t, width)

    def select(self, query, tokens):
        r = relevance(query.image_features, instruction_tokens(query))
        return Selection(greedy_dpp(query.image_features, r, tokens), scores=r)


class CDPrunerAbsorb(CDPruner):
    """CDPruner whose dropped tokens are absorbed by their look-alikes with proportional attention, as PAR's are
    (`methods/absorb.py`). An ablation of PAR rather than a method of the field: PAR's absorbing without PAR's
    router, CDPruner's picks instead; it tells what of PAR's lead is the absorbing and what the routing."""

    name = "cdpruner-absorb"
    extra = "ablation"
    absorbs = True
