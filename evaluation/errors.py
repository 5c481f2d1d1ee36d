"""Errors the command line reports as a clear message and a non-zero exit."""


class EvaluationError(Exception):
    """Bad input or state: the message says what was wrong and how to fix it."""


class MetricUnavailable(EvaluationError):
    """A metric cannot be computed here (its weights are missing and cannot be downloaded, say)."""
