"""Errors the command line reports as a clear message and a non-zero exit, and :func:`listed`, for the lists
they name."""

SHOWN = 8  #: items a message names; the rest are counted


class EvaluationError(Exception):
    """Bad input or state: the message says what was wrong and how to fix it."""


class MetricUnavailable(EvaluationError):
    """A metric cannot be computed here (its weights are missing and cannot be downloaded, say)."""


def listed(items: list[str], shown: int = SHOWN) -> str:
    """``items`` for a message: the first ``shown``, joined, and how many more there are."""
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")
