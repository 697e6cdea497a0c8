"""The unpruned model: the reference every method is measured against."""

from par_demo.engine import PruningPlan
from par_demo.methods.base import Method, Setting


class Full(Method):
    name = "full"

    def candidates(self, query, start_layer):
        return [Setting(query.n_visual, frozenset(), start_layer)]

    def make_plan(self, query, setting):
        return PruningPlan(start_layer=setting.start_layer)
