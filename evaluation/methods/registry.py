"""The registry: every method that ``tofu-sd generate`` and ``tofu-sd bench`` compare, one :class:`Method` entry
each, in the order the bench lists them.

Adding a method is adding one entry here: its name, a one-line summary, its patch (a context manager that
applies it and restores the model), its parameters (what the manifest records) and, where they differ from the
defaults, the kind of value after ``@`` in its names, a package it needs, and how the bench times its step.
The names built on them (``tofu@0.5``) are :mod:`.names`.
"""

from __future__ import annotations

import contextlib

from ..errors import EvaluationError
from . import catome, oracle, todo
from .base import Method, NoParameter, Parameter, Requirement
from .tofu import merged_params, rematch_mix, tofu_patch, tome_patch


@contextlib.contextmanager
def _unpatched(pipe, options, params):
    yield


def _tofu(name: str, summary: str, **overrides) -> Method:
    return Method(name, summary, tofu_patch(**overrides), merged_params, step_mix=rematch_mix)


ENTRIES = (
    Method("full", "the unpatched model, the reference", _unpatched, lambda value, options: {"keys_removed": 0.0},
           parameter=NoParameter("it reduces nothing")),  # fmt: skip
    Method("tome", "ToMe, the tomesd package, on the blocks that tofu patches", tome_patch, merged_params),
    _tofu("tofu", "Token Fusion (tofu_sd.apply) with the run's options"),
    _tofu("tofu-P", "tofu with pruned merging (P) in every block", schedule="P"),
    _tofu("tofu-A", "tofu with average merging (A) in every block", schedule="A"),
    _tofu("tofu-M", "tofu with MLERP merging (M) in every block", schedule="M"),
    _tofu("tofu-local", 'tofu with local matching (matching="local")', matching="local"),
    _tofu("tofu-kv", 'tofu keeping every query: keys and values from the reduced tokens (reduce="kv")', reduce="kv"),
    _tofu("tofu-kv-local", 'tofu-kv with local matching', reduce="kv", matching="local"),
    Method("todo", "ToDo, keys and values pooled (this project's re-implementation)", todo.todo_patch,
           todo.todo_params, parameter=todo.POOLING, describe=todo.describe),  # fmt: skip
    Method("catome", "CA-ToMe, the ca-tome package: a similarity threshold, matchings cached across steps",
           catome.catome_patch, catome.catome_params, parameter=NoParameter("its own parameter is a similarity threshold"),
           requires=Requirement("ca_tome", "ca-tome", catome.CATOME_INSTALL), step_mix=catome.step_mix),  # fmt: skip
    Method("oracle", "self-attention on a fixed strided subset, outputs copied: a bound with no matching",
           oracle.oracle_patch, oracle.oracle_params, parameter=Parameter()),  # fmt: skip
)
REGISTRY: dict[str, Method] = {method.name: method for method in ENTRIES}
METHODS = tuple(REGISTRY)  #: the names of the entries, in order


def get_method(method: str) -> Method:
    """The entry named ``method`` (no ``@`` suffix); EvaluationError listing the choices otherwise."""
    try:
        return REGISTRY[method]
    except KeyError:
        raise EvaluationError(f"unknown method {method!r}; choose from {', '.join(REGISTRY)}") from None
