"""The one exception type for problems the user can fix (bad input, missing files, unsupported settings)."""


class UserError(ValueError):
    """A clear, one-line message for the person at the keyboard; shown without a traceback."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message (or its type's name), to quote in a one-line `UserError`."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class BudgetOutOfReach(UserError):
    """A budget below the cheapest setting a method has on this model: `eval` reports it and goes on. `reach` is
    the smallest budget that method can meet (a fraction of the full prefill's FLOPs, or of its time here), None
    where no setting could be costed."""

    def __init__(self, method: str, budget: float, reach: float | None, unit: str = "flops"):
        what = "FLOPs" if unit == "flops" else "time on this machine, as its measured cost model predicts it"
        self.method, self.budget, self.unit = method, budget, unit
        self.reach = None if reach is None else float(reach)
        cost = "n/a" if reach is None else f"{reach:.2f}"
        super().__init__(f"budget {budget:g} is below what {method} can reach on this model "
                         f"(its cheapest setting costs {cost} of the full prefill {what})")

    def __reduce__(self):  # pickled whole (a ZeroGPU worker hands it back to the app's process)
        return type(self), (self.method, self.budget, self.reach, self.unit)
