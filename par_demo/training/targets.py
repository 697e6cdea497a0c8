"""Training targets: per query, the frozen model's greedy answer, teacher-forced, and its token distributions.

Answers in the data are never read: the full model's own answer and next-token distributions are the target
every pruning flow is scored against (`flows.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from par_demo.engine import PruningPlan
from par_demo.flops import Shape
from par_demo.images import load_image
from par_demo.methods.cdpruner import greedy_dpp, instruction_tokens, relevance
from par_demo.methods.par import router_inputs
from par_demo.training.questions import QuerySpec, QuestionBank


@dataclass
class Target:
    """One query with the full model's answer teacher-forced, and everything training needs from it."""

    query: object  # Query with the answer appended (all but its last token)
    shape: Shape  # the prompt's token counts and vision FLOPs (what the FLOPs of a pruned prefill count)
    m: int  # answer tokens scored
    log_p: torch.Tensor  # (m, vocab) full model's log-probabilities
    answer: list[int]
    prior: torch.Tensor  # (n_v,) > 0: the token prior (attention row, CDPruner's relevance, or its selection order)
    visual: torch.Tensor  # (n_v, D) router input
    text: torch.Tensor  # (n_t, D) router input
    layout: object  # each visual token's row and column (router input)

    @property
    def n_text(self) -> int:
        return self.shape.n_text

    def nbytes(self) -> int:
        embeds = self.query.inputs_embeds
        return self.log_p.numel() * 4 + 2 * embeds.numel() * embeds.element_size()


def selection_order_prior(features: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """A positive prior (n,) from a greedy DPP's pick order: log prior falls linearly with the rank, so that the top
    T of the prior are CDPruner's own T tokens at every T and the flows' noise perturbs its selection."""
    n = features.shape[0]
    order = greedy_dpp(features, quality, n)
    rank = torch.empty(n)
    rank[order] = torch.arange(n, dtype=torch.float32)
    return torch.exp(-3.0 * rank / n)


def make_target(predictor, image_path: str, question: str, start_layer: int, max_new_tokens: int,
                prior: str = "attention", prior_layer: int = -1) -> Target:
    engine = predictor.engine
    inputs = predictor.encode(load_image(image_path), question)
    query = engine.prepare(inputs)
    # keep_visual_count = every token: nothing is pruned, but the engine computes the attention row at the layer
    # before the start layer (K-1 by default, or the layer asked for).
    row_layer = prior_layer if prior_layer >= 0 else max(start_layer, 1) - 1
    prior_plan = PruningPlan(start_layer=row_layer + 1, keep_visual_count=query.n_visual)
    pre = engine.prefill(query, prior_plan, reserve=max_new_tokens)
    eos = predictor.loaded.processor.tokenizer.eos_token_id
    # The greedy answer's own logits are the teacher-forced ones: no second prefill over prompt + answer is needed.
    logits = [pre.logits]
    position = pre.next_position
    while len(logits) < max_new_tokens and int(logits[-1].argmax()) != eos:
        logits.append(engine.decode_step(int(logits[-1].argmax()), position, pre.cache, PruningPlan()))
        position += 1
    answer = [int(z.argmax()) for z in logits]
    forced = engine.extend(query, answer[:-1])  # what every flow runs: prompt + answer, all but its last token
    m = len(answer)
    logits = torch.stack(logits).float()
    visual, text = router_inputs(query)
    token_prior = pre.attention_to_image.float()
    if prior in ("relevance", "cdpruner"):  # CDPruner's score: the best training-free one on the embedded model
        token_prior = relevance(query.image_features, instruction_tokens(query)).float()
    if prior == "cdpruner":  # CDPruner's whole selection: the order its greedy DPP picks tokens in, as a score
        token_prior = selection_order_prior(query.image_features, token_prior)
    return Target(forced, Shape.of(query), m, F.log_softmax(logits, dim=-1), answer, token_prior, visual, text,
                  query.layout)


def model_answer(predictor, max_new_tokens: int = 24):
    """(image path, question) -> the frozen model's greedy answer as text: what the question bank probes with."""

    def answer(image: str, question: str) -> str:
        generation = predictor.generate(load_image(image), question, max_new_tokens=max_new_tokens)[0]
        return predictor.decode(generation.tokens)

    return answer


class TargetCache:
    """Targets are deterministic per query; they are kept in memory up to a byte limit, else recomputed."""

    def __init__(self, predictor, queries: list[QuerySpec], train, start_layer: int, limit_bytes: float = 2e9):
        self.predictor, self.queries, self.train, self.start_layer = predictor, queries, train, start_layer
        self.limit, self.used, self.store = limit_bytes, 0, {}
        self.bank = QuestionBank(model_answer(predictor), train.seed)

    def question(self, index: int) -> str:
        spec = self.queries[index]
        return spec.question if spec.question is not None else self.bank.question(spec.image, spec.slot)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> Target:
        if index in self.store:
            return self.store[index]
        target = make_target(self.predictor, self.queries[index].image, self.question(index), self.start_layer,
                             self.train.max_new_tokens, self.train.prior, self.train.prior_layer)
        if self.used + target.nbytes() <= self.limit:
            self.store[index] = target
            self.used += target.nbytes()
        return target
