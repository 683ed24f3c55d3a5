"""Errors the CLI prints in one line: a user's mistake exits with code 2, a fault of a part
we run (the vLLM engine) with code 1."""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong value, a model that is not there."""


class EngineDiedError(Exception):
    """The vLLM engine stopped in the middle of a call; the round stays resumable."""
