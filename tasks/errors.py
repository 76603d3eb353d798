"""Errors a user can act on. The CLI prints them as one line and exits 2; Airflow fails the task."""


class UserError(Exception):
    """Bad input (config, flag, file, data): the message names what is wrong and what was expected."""


class NotBuiltYet(UserError):
    """A stage that a later issue builds; it says so instead of pretending."""
