"""Batch generation over class prompts (ImageNet, or the built-in model's shapes) for several methods, same seeds.

Layout of a run directory::

    runs/NAME/manifest.json                 configuration, library versions, per-method time and memory
    runs/NAME/<method>/<class:04d>_<k>.png  prompt, seed, method and class in the PNG text metadata

The run is resumable: finished images are skipped, every PNG is written to a temporary name and renamed, and
the manifest is rewritten (atomically) after every batch. A run directory is bound to the options that shape
its images; asking for other ones is refused rather than mixing images.

Several processes (``accelerate launch`` on GPUs, ``torchrun`` on CPUs) share a run: process 0 lists the pending
batches, they are split between the processes, which go through them in lock-step rounds of one batch each and
exchange small reports (images made, time, peak memory, error) after every round; process 0 merges them into the
manifest. A batch holds the same images whichever process makes it, so the images equal a one-process run's.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image, PngImagePlugin

import prompts
from tofu_sd import TokenFusionConfig

from .errors import EvaluationError
from .memory import PeakMemory
from .methods import method_applied, method_params
from .models import default_prompt_set, default_size, load_pipeline, resolve_device, resolve_dtype

MANIFEST = "manifest.json"
LOCK = ".generate.lock"  # held by the (main) process generating into a run directory
MAX_PER_CLASS = 1000
# How long a process of a multi-process run waits for the others at the end of a round (one batch each): long,
# since a batch of a large model on CPUs can take hours. A process that dies is noticed at once, not after this.
PROCESS_TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class GenerateConfig:
    """Options of ``tofu-sd generate``."""

    out: str
    model: str
    methods: list[str]
    classes: list[int]
    per_class: int = 2
    steps: int = 50
    seed: int = 0
    reduction: TokenFusionConfig = field(default_factory=TokenFusionConfig)
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5
    scheduler: str | None = None
    warmup: bool = True
    prompts: str | None = None  #: prompt set (``imagenet``, ``shapes``); None: the model's own (see models.py)

    def __post_init__(self) -> None:
        if self.prompts is None:
            self.prompts = default_prompt_set(self.model)
        if self.prompts not in prompts.PROMPT_SETS:
            raise EvaluationError(f"unknown --prompts {self.prompts!r}; choose from {', '.join(prompts.PROMPT_SETS)}")
        count = len(prompts.class_names(self.prompts))
        if self.classes and max(self.classes) >= count:
            raise EvaluationError(
                f"--classes goes up to {max(self.classes)}, but the {self.prompts!r} prompt set has {count} classes "
                f"(0-{count - 1})"
            )


# Options that change pixels: a run directory keeps the ones it was started with.
IMAGE_KEYS = ("model", "prompts", "steps", "seed", "reduction", "device", "dtype", "height", "width", "guidance_scale", "scheduler")


def parse_classes(text: str, num_classes: int = prompts.NUM_CLASSES) -> list[int]:
    """``0-999``, ``3``, ``0,5,7-9`` -> sorted class indices in ``[0, num_classes)``."""
    classes: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi or lo)
            if not 0 <= lo_i <= hi_i < num_classes:
                raise ValueError
            classes.update(range(lo_i, hi_i + 1))
    except ValueError:
        raise EvaluationError(
            f"bad --classes {text!r}: give class indices in 0-{num_classes - 1} as ranges or lists, e.g. "
            f"0-{num_classes - 1} or 1,5,10-19"
        ) from None
    if not classes:
        raise EvaluationError(f"--classes {text!r} selects no class")
    return sorted(classes)


def image_seed(seed: int, class_index: int, k: int) -> int:
    """Seed of sample ``k`` of a class: the same for every method, and stable when the run is extended."""
    return seed * prompts.NUM_CLASSES * MAX_PER_CLASS + class_index * MAX_PER_CLASS + k


def image_name(class_index: int, k: int) -> str:
    return f"{class_index:04d}_{k}.png"


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_png_atomic(image: Image.Image, path: Path, text: dict[str, str]) -> None:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("tofu-sd", "torch", "diffusers", "transformers", "tomesd"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _image_config(config: GenerateConfig) -> dict:
    data = asdict(config)
    return {key: data[key] for key in IMAGE_KEYS}


def load_manifest(run_dir: Path) -> dict | None:
    path = run_dir / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{path} is unreadable ({error}); it is not a tofu-sd run directory") from error


def _open_run(config: GenerateConfig, device: torch.device, dtype: torch.dtype) -> tuple[Path, dict]:
    """Create or reopen the run directory; refuse one made with other image options, or not by tofu-sd."""
    run_dir = Path(config.out)
    image_config = _image_config(config)
    image_config.update(device=device.type, dtype=str(dtype).removeprefix("torch."))
    manifest = load_manifest(run_dir)
    if manifest is None:
        if run_dir.exists() and any(p.name != LOCK for p in run_dir.iterdir()):
            raise EvaluationError(
                f"{run_dir} exists and is not a tofu-sd run directory (no {MANIFEST}); choose a new --out"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = {"config": image_config, "classes": [], "per_class": 0, "methods": {}}
    else:
        old = manifest.get("config", {})
        old.setdefault("prompts", "imagenet")  # runs made before prompt sets existed
        # An unset height / width means the model's default, which the run recorded when it started.
        changed = {
            k: (old.get(k), v)
            for k, v in image_config.items()
            if old.get(k) != v and not (v is None and k in ("height", "width"))
        }
        if changed:
            lines = "\n".join(f"  {k}: run has {a!r}, this call asks {b!r}" for k, (a, b) in changed.items())
            raise EvaluationError(
                f"{run_dir} was generated with other options; mixing images would make the comparison wrong:\n"
                f"{lines}\nRe-run with the run's options, or choose a new --out."
            )
    manifest["classes"] = sorted(set(manifest["classes"]) | set(config.classes))
    manifest["per_class"] = max(manifest["per_class"], config.per_class)
    manifest["versions"] = library_versions()
    for method in config.methods:
        manifest["methods"].setdefault(method, {"seconds": 0.0, "images_timed": 0, "peak_mem_bytes": 0})
        # A name's own parameters (a sweep's ratio, ToDo's pooling, ...) are bound per method folder.
        params, old_params = method_params(method, config.reduction), manifest["methods"][method].get("params")
        if old_params is not None and old_params != params:
            raise EvaluationError(
                f"{run_dir / method} was generated with {old_params}, this call asks {params}; mixing images would "
                "make the comparison wrong. Re-run with the run's options, or choose a new --out."
            )
        manifest["methods"][method]["params"] = params
    return run_dir, manifest


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


def _describe(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return str(error) if isinstance(error, EvaluationError) else f"{type(error).__name__}: {error}"


class _Processes:
    """The processes of one ``generate`` call: just this one, or those of an accelerate / torchrun launch.

    accelerate's ``PartialState`` sets the launch up (NCCL and one GPU per process, or gloo on CPUs). The
    processes exchange their small reports over a gloo group (the default one on CPUs), which reports a
    process that died as an error at once instead of waiting, as NCCL would.
    """

    def __init__(self, device: torch.device) -> None:
        self.count, self.index, self.device = 1, 0, device
        self._state = self._group = None
        self._owns_default_group = False
        launched = launched_processes()
        if launched <= 1:
            return
        if device.type not in ("cpu", "cuda"):
            raise EvaluationError(
                f"{launched} processes were launched, which needs CUDA GPUs or the CPU; --device {device} is neither"
            )
        if device.type == "cuda" and device.index is not None:
            raise EvaluationError(
                f"--device {device} names one GPU, but {launched} processes were launched; use --device cuda (or "
                "auto): each process then takes the GPU of its local rank"
            )
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
        errors = self.exchange(None if error is None else _describe(error))
        if error is not None:
            raise error
        for index, text in enumerate(errors):
            if text is not None:
                raise EvaluationError(f"process {index} of {self.count} failed: {text}")

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


class _Signals:
    """SIGINT / SIGTERM while generating. Inside a process's own work they stop it at once (KeyboardInterrupt);
    while the processes exchange reports they are only noted, and stop the work at the start of the next
    round, so every process hears of the stop and the main process still writes the manifest."""

    def __init__(self) -> None:
        self.received = False
        self.immediate = False
        self._previous: dict = {}

    def __enter__(self) -> _Signals:
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


@contextlib.contextmanager
def _locked(run_dir: Path):
    """Hold the run directory for this call: a second, independent ``generate`` on it is refused."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with open(run_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise EvaluationError(
                f"another `tofu-sd generate` (pid {holder}) is writing {run_dir}; wait for it or stop it. To share "
                "one run between GPUs or processes, start them together with accelerate launch or torchrun (README)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Unit(NamedTuple):
    """One batch of the job list (``--batch-size`` (class, sample) pairs) and, per method, its missing images."""

    batch: list[tuple[int, int]]
    missing: list[tuple[str, list[tuple[int, int]]]]  #: (method, its images of the batch not on disk), if any


def _pending_units(config: GenerateConfig, run_dir: Path) -> list[_Unit]:
    """Every batch with a missing image, in order.

    A batch is always computed whole, as in an uninterrupted one-process run, and only its missing images are
    saved: the batch size can change an image's last bits (BLAS), so a batch that an interruption left part
    written is made again whole, and every image equals an uninterrupted run's.
    """
    jobs = [(c, k) for c in config.classes for k in range(config.per_class)]
    units = []
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start : start + config.batch_size]
        missing = [(m, [j for j in batch if not (run_dir / m / image_name(*j)).exists()]) for m in config.methods]
        missing = [(m, jobs_m) for m, jobs_m in missing if jobs_m]
        if missing:
            units.append(_Unit(batch, missing))
    return units


def _merge_stats(manifest: dict, reports: list[dict]) -> int:
    """Add the processes' reports of one round to the manifest; returns how many images they made."""
    made = 0
    for report in reports:
        made += report["images"]
        for method, part in report["stats"].items():
            stats = manifest["methods"][method]
            stats["seconds"] += part["seconds"]
            stats["images_timed"] += part["images_timed"]
            stats["peak_mem_bytes"] = max(stats["peak_mem_bytes"], part["peak_mem_bytes"])
            stats["peak_mem_kind"] = part["peak_mem_kind"]
    return made


def generate(config: GenerateConfig, progress: bool = True) -> dict:
    """Generate every missing image of ``config``; returns the manifest.

    Run as one process, or as several launched together by accelerate or torchrun: then the pending batches are
    split between the processes, each image is made once with the seed it has in a one-process run, and
    process 0 alone writes the manifest. A process that fails stops them all after their current batch.
    """
    if not 1 <= config.per_class <= MAX_PER_CLASS:
        raise EvaluationError(f"--per-class must be in 1-{MAX_PER_CLASS}, got {config.per_class}")
    if config.batch_size < 1 or config.steps < 1:
        raise EvaluationError("--batch-size and --steps must be at least 1")
    procs = _Processes(resolve_device(config.device))
    try:
        with contextlib.ExitStack() as stack:
            return _generate(config, procs, stack, progress)
    finally:
        procs.close()


def _generate(config: GenerateConfig, procs: _Processes, stack: contextlib.ExitStack, progress: bool) -> dict:
    from tqdm.auto import tqdm

    device = procs.device
    dtype = resolve_dtype(config.dtype, device)
    run_dir, manifest, error = Path(config.out), None, None
    if procs.is_main:  # checks the options against the run's, holds the run directory for this call
        try:
            run_dir, manifest = _open_run(config, device, dtype)
            stack.enter_context(_locked(run_dir))
        except BaseException as e:
            error = e
    procs.check(error)
    try:
        pipe = load_pipeline(config.model, device, dtype, config.scheduler)
    except BaseException as e:
        error = e
    procs.check(error)
    devices = procs.exchange(str(device))
    plan = None
    if procs.is_main:
        try:
            height = config.height or default_size(pipe)
            width = config.width or default_size(pipe)
            manifest["config"].update(height=height, width=width, model_class=type(pipe).__name__)
            for method in config.methods:
                (run_dir / method).mkdir(exist_ok=True)
                for stale in (run_dir / method).glob(".*.tmp"):  # left by an interrupted write
                    stale.unlink()
            units = _pending_units(config, run_dir)
            total = sum(len(todo) for unit in units for _, todo in unit.missing)
            for earlier in manifest.get("sessions", []):  # one whose main process died: never finished
                if earlier["status"] == "running":
                    earlier["status"] = "failed"
            session = None
            if total:
                session = {"num_processes": procs.count, "devices": devices, "started": _now(), "wall_seconds": 0.0,
                           "images": 0, "status": "running"}  # fmt: skip
                manifest.setdefault("sessions", []).append(session)
            write_json_atomic(run_dir / MANIFEST, manifest)
            plan = (height, width, units)
        except BaseException as e:
            error = e
    procs.check(error)
    height, width, units = procs.exchange(plan)[0]
    mine = procs.split(units)
    rounds = -(-len(units) // procs.count)  # every process takes part in every round, with work or without

    memory = PeakMemory(device)
    warmed: set[str] = set()

    def run_pipe(batch, steps, first):
        # The global RNG is seeded per batch: tomesd draws its random partition from a copy of it, so ToMe's
        # images do not depend on which process makes a batch, nor on what that process made before.
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(image_seed(config.seed, *first))
            return pipe(
                prompt=[prompts.prompt(c, config.prompts) for c, _ in batch],
                num_inference_steps=steps,
                guidance_scale=config.guidance_scale,
                height=height,
                width=width,
                generator=[torch.Generator("cpu").manual_seed(image_seed(config.seed, c, k)) for c, k in batch],
            ).images

    def make(unit: _Unit, report: dict) -> None:
        batch, first = unit.batch, unit.batch[0]
        for method, todo in unit.missing:  # interleaved, so slow drifts of the machine hit every method alike
            applied = lambda method=method: method_applied(pipe, method, config.reduction)  # noqa: E731
            if config.warmup and method not in warmed:
                with applied():  # one-time costs (allocator, kernels) stay out of the timing
                    run_pipe(batch, 1, first)
                warmed.add(method)
            with applied(), memory.measure() as peak:
                t0 = time.perf_counter()
                images = run_pipe(batch, config.steps, first)
                seconds = time.perf_counter() - t0
            for (c, k), image in zip(batch, images):
                if (c, k) not in todo:  # on disk already: computed only so that the batch is the same
                    continue
                save_png_atomic(image, run_dir / method / image_name(c, k), {
                    "prompt": prompts.prompt(c, config.prompts), "seed": str(image_seed(config.seed, c, k)),
                    "method": method, "class_index": str(c), "class_name": prompts.class_names(config.prompts)[c],
                    "model": config.model, "prompt_set": config.prompts,
                })  # fmt: skip
            stats = report["stats"].setdefault(method, {"seconds": 0.0, "images_timed": 0, "peak_mem_bytes": 0})
            stats["seconds"] += seconds
            stats["images_timed"] += len(batch)
            stats["peak_mem_bytes"] = max(stats["peak_mem_bytes"], peak.bytes)
            stats["peak_mem_kind"] = memory.kind
            report["images"] += len(todo)

    failure: BaseException | None = None
    lost: ProcessesLost | None = None
    stopped: list[tuple[int, dict]] = []
    bar = None
    if procs.is_main:
        bar = tqdm(total=total, unit="img", disable=not progress or total == 0, desc="generating")
        stack.callback(bar.close)
        t_start = time.perf_counter()
    signals = stack.enter_context(_Signals())
    for round_index in range(rounds):
        report = {"images": 0, "stats": {}, "error": None, "interrupted": False}
        try:
            try:
                signals.immediate = True
                if signals.received:
                    raise KeyboardInterrupt
                if round_index < len(mine):
                    make(mine[round_index], report)
            finally:
                signals.immediate = False
        except BaseException as e:  # reported to the others, raised here once the manifest is written
            failure = e
            report.update(error=_describe(e), interrupted=isinstance(e, KeyboardInterrupt))
        try:
            reports = procs.exchange(report)
        except ProcessesLost as e:
            lost, reports = e, [report]
        stopped = [(i, r) for i, r in enumerate(reports) if r["error"] is not None]
        if procs.is_main:
            made = _merge_stats(manifest, reports)
            session["images"] += made
            session["wall_seconds"] = round(time.perf_counter() - t_start, 3)
            if lost or stopped:
                interrupted = not lost and all(r["interrupted"] for _, r in stopped)
                session["status"] = "interrupted" if interrupted else "failed"
            elif round_index == rounds - 1:
                session["status"] = "complete"
            write_json_atomic(run_dir / MANIFEST, manifest)
            bar.update(made)
        if lost or stopped:
            break
    if not lost:  # a barrier too: no process ends (so its launcher stops the others) before the manifest is written
        with contextlib.suppress(ProcessesLost):
            manifest = procs.exchange(manifest)[0]
    if failure is not None:
        raise failure
    if lost is not None:
        raise ProcessesLost(
            f"{lost}; this process stopped. Finished images and {run_dir / MANIFEST} are kept: re-run the same "
            "command to make the rest"
        )
    if stopped:
        index, report = stopped[0]
        if report["interrupted"]:
            raise KeyboardInterrupt
        raise EvaluationError(
            f"process {index} of {procs.count} failed ({report['error']}), so this one stopped too. Finished images "
            f"and {run_dir / MANIFEST} are kept: fix the cause and re-run the same command to make the rest"
        )
    return manifest


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
