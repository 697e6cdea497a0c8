"""PAR: a learned meta-router chooses the visual tokens and the decoder layers per query.

Until a router checkpoint for the loaded model exists, the method reports itself unavailable (with the command
that trains one); the other methods keep working.
"""

from par_demo.errors import UserError
from par_demo.methods.base import Method


class Par(Method):
    name = "par"
    uses_tokens = True
    uses_layers = True

    def available(self):
        return (f"no router for this model; train one with: "
                f"python -m par_demo train-router --model {self.predictor.loaded.name}")

    def plan(self, query, budget=1.0, tokens=None, layers=None, start_layer=2):
        raise UserError(self.available())
