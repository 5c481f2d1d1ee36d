"""The processes of one ``tofu-sd generate`` call, and the signals that stop it.

One process, or several launched together by accelerate (GPUs) or torchrun (CPUs). accelerate's
``PartialState`` sets a launch up (NCCL and one GPU per process, or gloo on CPUs); the processes exchange small
objects over a gloo group (the default one on CPUs), which reports a process that died as an error at once
instead of waiting, as NCCL would.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
from typing import Callable, TypeVar

import torch

from .errors import EvaluationError

# How long a process of a multi-process run waits for the others at the end of a round (one batch each): long,
# since a batch of a large model on CPUs can take hours. A process that dies is noticed at once, not after this.
PROCESS_TIMEOUT = datetime.timedelta(hours=24)

T = TypeVar("T")


class ProcessesLost(EvaluationError):
    """Another process of a multi-process run died (its connection closed) or stopped answering."""


def _env_int(names: tuple[str, ...], default: int) -> int:
    """The first of these variables that the launcher set (the ones accelerate reads), else ``default``."""
    for name in names:
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return default


def launched_processes() -> int:
    """How many processes accelerate / torchrun (or MPI) launched together; 1 for a plain command."""
    return _env_int(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1)


def is_main_process() -> bool:
    """True in a plain command and in process 0 of a launch."""
    return _env_int(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0) == 0


def describe(error: BaseException) -> str:
    """An error as one process tells the others about it."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return str(error) if isinstance(error, EvaluationError) else f"{type(error).__name__}: {error}"


def _check_device(launched: int, device: torch.device) -> None:
    if device.type not in ("cpu", "cuda"):
        raise EvaluationError(
            f"{launched} processes were launched, which needs CUDA GPUs or the CPU; --device {device} is neither"
        )
    if device.type == "cuda" and device.index is not None:
        raise EvaluationError(
            f"--device {device} names one GPU, but {launched} processes were launched; use --device cuda (or "
            "auto): each process then takes the GPU of its local rank"
        )


class Processes:
    """The processes of one call: just this one, or those of an accelerate / torchrun launch."""

    def __init__(self, device: torch.device) -> None:
        self.count, self.index, self.device = 1, 0, device
        self._state = self._group = None
        self._owns_default_group = False
        launched = launched_processes()
        if launched <= 1:
            return
        _check_device(launched, device)
        try:
            from accelerate import PartialState
        except ImportError as error:
            raise EvaluationError(f"{launched} processes need accelerate: pip install accelerate ({error})") from error

        self._owns_default_group = not torch.distributed.is_initialized()
        self._state = PartialState(cpu=device.type == "cpu", timeout=PROCESS_TIMEOUT)
        self.count, self.index = self._state.num_processes, self._state.process_index
        if device.type == "cuda":
            self.device = self._state.device
        if self._state.backend != "gloo":
            self._group = torch.distributed.new_group(backend="gloo", timeout=PROCESS_TIMEOUT)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def split(self, items: list) -> list:
        """This process's contiguous share of ``items`` (shares differ in length by at most one)."""
        if self._state is None:
            return list(items)
        with self._state.split_between_processes(items) as share:
            return list(share)

    def exchange(self, obj) -> list:
        """Every process's ``obj``, in process order, on every process."""
        if self.count == 1:
            return [obj]
        gathered = [None] * self.count
        try:
            torch.distributed.all_gather_object(gathered, obj, group=self._group)
        except RuntimeError as error:  # gloo: a peer closed its connection (it died), or the wait timed out
            raise ProcessesLost(f"lost contact with another process ({str(error).splitlines()[0]})") from error
        return gathered

    def check(self, error: BaseException | None) -> None:
        """After a step that may fail in any process: raise in every process if one failed."""
        errors = self.exchange(None if error is None else describe(error))
        if error is not None:
            raise error
        for index, text in enumerate(errors):
            if text is not None:
                raise EvaluationError(f"process {index} of {self.count} failed: {text}")

    def step(self, fn: Callable[[], T], *, main_only: bool = False, share: bool = False) -> T | None:
        """Run ``fn`` in every process (or in the main one only); if it fails in any, raise in all of them.

        Returns ``fn``'s result; with ``share``, the main process's result in every process. Every process must
        call this, so that they meet in the exchange.
        """
        result, error = None, None
        if self.is_main or not main_only:
            try:
                result = fn()
            except BaseException as e:  # reported to the others, raised here
                error = e
        self.check(error)
        return self.exchange(result)[0] if share else result

    def close(self) -> None:
        if self._state is None:
            return
        from accelerate import PartialState

        with contextlib.suppress(Exception):  # a group whose peer died may refuse a clean shutdown
            if self._group is not None:
                torch.distributed.destroy_process_group(self._group)
            if self._owns_default_group:
                self._state.destroy_process_group()
        if self._owns_default_group:
            PartialState._reset_state()  # a later call in this process sets the launch up again


class Signals:
    """SIGINT / SIGTERM while generating. Inside a process's own work they stop it at once (KeyboardInterrupt);
    while the processes exchange reports they are only noted, and stop the work at the start of the next
    round, so every process hears of the stop and the main process still writes the manifest."""

    def __init__(self) -> None:
        self.received = False
        self.immediate = False
        self._previous: dict = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum, frame) -> None:
        self.received = True
        if self.immediate:
            self.immediate = False  # once: the handling of the first one is not interrupted by a second
            raise KeyboardInterrupt
