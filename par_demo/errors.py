"""The one exception type for problems the user can fix (bad input, missing files, unsupported settings)."""


class UserError(ValueError):
    """A clear, one-line message for the person at the keyboard; shown without a traceback."""
