"""Errors a user can act on. The CLI prints them as one line and exits 2; Airflow fails the task."""


class UserError(Exception):
    """Bad input (config, flag, file, data): the message names what is wrong and what was expected."""


class StoreUnavailable(UserError):
    """A tracking store, model registry or data remote could not be reached or written; names the URI.

    Often transient (a server restarting, a network blip): the CLI reports it like any user error (one
    line, exit 2), while the DAG lets Airflow retry the task instead of failing it at once.
    """


class StoreDamaged(UserError):
    """A tracking store that is reachable but damaged, half-migrated or incompatible; names the repair.

    Not a :class:`StoreUnavailable`: no retry can fix it, so the DAG fails the task once.
    """


class OutOfSpace(UserError):
    """The filesystem that was to hold an output lacks the space; names the path, what is needed and free.

    Not retried by the DAG (a minute later the disk is as full): free space (`qa-lora gc`), then rerun.
    """
