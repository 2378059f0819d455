"""The one exception type for mistakes in a user's input.

The CLI prints a ``UserError`` as one line and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input: the message names what was wrong and what would be right."""
