"""The one exception type for problems the user can fix (bad input, missing files, unsupported settings)."""


class UserError(ValueError):
    """A clear, one-line message for the person at the keyboard; shown without a traceback."""


class BudgetOutOfReach(UserError):
    """A FLOPs budget below the cheapest setting a method has on this model: `eval` reports it and goes on."""

    def __init__(self, method: str, budget: float, reach: str):
        super().__init__(f"budget {budget:g} is below what {method} can reach on this model "
                         f"(its cheapest setting costs {reach} of the full prefill FLOPs)")
