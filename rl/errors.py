"""The error of a run that cannot start or go on."""


class RunError(RuntimeError):
    """A run that cannot start or go on; the message names the cause (a config field where there is one)."""
