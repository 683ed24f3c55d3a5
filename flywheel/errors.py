"""Errors a user can act on. The CLI prints them in one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, a wrong value, a model that is not there."""
