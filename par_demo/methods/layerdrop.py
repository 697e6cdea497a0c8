"""Static layer removal (ShortGPT-style): drop the decoder layers that change their input least.

Block influence of layer i = 1 - cos(h_in, h_out), averaged over the tokens of a few calibration queries. It is
measured once per model and cached (in memory and in a small JSON file), then the lowest-influence layers are
skipped for every query: all visual tokens are kept.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from par_demo.disk_cache import cache_path, read_json, write_json
from par_demo.engine import PruningPlan
from par_demo.methods.base import Method, Setting, check_count

CALIBRATION_QUESTIONS = ("What color is the circle?", "How many objects are there?", "Where is the red square?",
                         "Describe the image.")


def block_influence(context, n_queries: int = 8, seed: int = 0) -> list[float]:
    """Per layer, 1 - cosine(input, output) of its hidden states, averaged over calibration queries."""
    from par_demo.shapes import render_scene  # synthetic scenes: calibration needs no data set

    engine = context.engine
    rng = np.random.default_rng(seed)
    totals = torch.zeros(engine.n_layers)
    for i in range(n_queries):
        image, _ = render_scene(rng)
        question = CALIBRATION_QUESTIONS[i % len(CALIBRATION_QUESTIONS)]
        query = engine.prepare(context.encode(image, question))
        pre = engine.prefill(query, PruningPlan(), keep_hidden=True)
        inputs = [query.inputs_embeds] + pre.hidden_states[:-1]
        for layer, (h_in, h_out) in enumerate(zip(inputs, pre.hidden_states)):
            totals[layer] += 1 - F.cosine_similarity(h_in.float(), h_out.float(), dim=-1).mean().item()
    return (totals / n_queries).tolist()


class LayerDrop(Method):
    name = "layerdrop"
    extra = "baseline"
    uses_layers = True

    def __init__(self, context):
        super().__init__(context)
        self._order: list[int] | None = None  # layers, least influential first
        self._influence: list[float] | None = None  # read once: every plan asks for it

    def influence(self) -> list[float]:
        if self._influence is None:
            self._influence = self._load_or_measure_influence()
        return self._influence

    def _load_or_measure_influence(self) -> list[float]:
        path = cache_path("layerdrop", self.context.cache_key)
        cached = read_json(path) or {}
        scores = cached.get("block_influence")
        if isinstance(scores, list) and len(scores) == self.n_layers:
            return scores
        scores = block_influence(self.context)  # none yet, or a damaged file: measured again
        write_json(path, {"model": self.context.cache_key, "block_influence": scores})
        return scores

    def order(self) -> list[int]:
        if self._order is None:
            scores = self.influence()
            self._order = sorted(range(self.n_layers), key=lambda i: scores[i])
        return self._order

    def layer_scores(self) -> torch.Tensor:
        return torch.tensor(self.influence())

    def dropped(self, n_drop: int) -> frozenset[int]:
        return frozenset(self.order()[:n_drop])

    def candidates(self, query, start_layer):
        return [Setting(query.n_visual, self.dropped(n), start_layer) for n in range(self.n_layers)]

    def fixed(self, query, tokens, layers, start_layer):
        kept = check_count(layers, 1, self.n_layers, "layers kept")
        return Setting(query.n_visual, self.dropped(self.n_layers - kept), start_layer)

    def make_plan(self, query, setting):
        return PruningPlan(start_layer=setting.start_layer, skip_layers=setting.skip, layer_scores=self.layer_scores())
