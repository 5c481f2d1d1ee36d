"""A run directory of ``tofu-sd generate``: its manifest, the options it is bound to, its lock, its pending work.

Layout::

    runs/NAME/manifest.json                 configuration, library versions, per-method time and memory (and,
                                            on a diffusion transformer, the blocks and attentions each method
                                            ran per image: block_calls_per_image, attention_calls_per_image)
    runs/NAME/<method>/<class:04d>_<k>.png  prompt, seed, method and class in the PNG text metadata

A run directory is bound to the options that shape its images once it holds an image: asking for other ones
is refused rather than mixing images, and an option left out of a call (``--height``, ``--width``) takes the
run's value. The manifest is written only after the model loaded and the size passed its check, then after
every round, always atomically; a write that finds the disk full stops the call with :class:`DiskFull`. Reading
the manifest is :mod:`evaluation.manifest`; rebuilding a lost one from the images, :mod:`evaluation.adopt`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from tofu_sd import TokenFusionConfig

from .adopt import adopt
from .block_calls import add_counts
from .errors import EvaluationError, listed
from .families import is_transformer
from .files import TMP_SUFFIX, is_disk_full, write_json_atomic
from .generate_config import GenerateConfig
from .images import image_name, image_problem
from .manifest import MANIFEST, library_versions, load_manifest, missing_manifest_message, now, run_images
from .methods import default_letters, method_params, parse_name
from .pipeline_calls import default_sides, side_multiple
from .sampling import SIZE_MULTIPLE, check_size

LOCK = ".generate.lock"  # held by the (main) process generating into a run directory
# Options that change pixels: a run directory keeps the ones it was started with.
IMAGE_KEYS = ("model", "prompts", "steps", "seed", "reduction", "device", "dtype", "height", "width", "guidance_scale", "scheduler",
              "frames")
SIZE_KEYS = ("height", "width")


class DiskFull(EvaluationError):
    """A write found no space left on the disk; what was written before is kept."""


def disk_full(run_dir: Path, error: OSError, methods=(), path: Path | None = None) -> DiskFull:
    """The one-line stop of a write that found the disk full: what is full, what was kept, how to go on."""
    run_dir, path = Path(run_dir), path or error.filename
    where = f"to write {path}" if path else f"in {run_dir}"
    images = sum(1 for m in methods for _ in (run_dir / m).glob("*.png"))
    kept = f"{run_dir / MANIFEST} as last written" if (run_dir / MANIFEST).exists() else f"no {MANIFEST} yet"
    return DiskFull(
        f"disk full: no space left {where} ({os.strerror(error.errno)}). Kept: {images} finished image(s) and "
        f"{kept}; no temporary files. Free some space, then re-run the same command to make the rest"
    )


@contextlib.contextmanager
def locked(run_dir: Path):
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


class Unit(NamedTuple):
    """One batch of the job list (``--batch-size`` (class, sample) pairs) and, per method, its missing images."""

    batch: list[tuple[int, int]]
    missing: list[tuple[str, list[tuple[int, int]]]]  #: (method, its images of the batch not finished), if any


class Plan(NamedTuple):
    """What every process needs to start: the image size and the pending units."""

    height: int
    width: int
    units: list[Unit]

    @property
    def images(self) -> int:
        return sum(len(jobs) for unit in self.units for _, jobs in unit.missing)


def pending_units(config: GenerateConfig, run_dir: Path, size: tuple[int, int]) -> tuple[list[Unit], list[str]]:
    """Every batch with a missing image, in order, and the images that are there but damaged (to be re-made).

    An image counts as finished if it is whole and of the run's ``size`` (:func:`~evaluation.images.image_problem`:
    each is read once, without decoding). A batch is always computed whole, as in an uninterrupted one-process
    run, and only its missing images are saved: the batch size can change an image's last bits (BLAS), so a
    batch that an interruption left part written is made again whole, and every image equals an uninterrupted
    run's.
    """
    jobs, damaged, units = config.jobs(), [], []

    def finished(method: str, job: tuple[int, int]) -> bool:
        problem = image_problem(run_dir / method / image_name(*job), size)
        if problem is not None and problem != "missing":
            damaged.append(f"{method}/{image_name(*job)} ({problem})")
        return problem is None

    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start : start + config.batch_size]
        missing = [(m, [j for j in batch if not finished(m, j)]) for m in config.methods]
        missing = [(m, jobs_m) for m, jobs_m in missing if jobs_m]
        if missing:
            units.append(Unit(batch, missing))
    return units, damaged


def image_config(config: GenerateConfig, device: torch.device, dtype: torch.dtype) -> dict:
    data = asdict(config)
    data = {key: data[key] for key in IMAGE_KEYS}
    data.update(device=device.type, dtype=str(dtype).removeprefix("torch."))
    return data


MIXING = "mixing images would make the comparison wrong"
RERUN = "Re-run with the run's options, or choose a new --out."


@dataclass
class RunDir:
    """The run directory as the main process holds it for one call: open (checked, locked), then started
    (bound: the manifest written), then a record of every round."""

    config: GenerateConfig
    path: Path
    manifest: dict
    bound: bool  #: the run holds images, so its image options stand
    log: Callable[[str], None]
    session: dict | None = None
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(cls, config, device, dtype, stack: contextlib.ExitStack, log) -> RunDir:
        """Check this call's options against the run's and hold the directory; writes nothing but the lock (and
        a directory it made is removed again if the call fails before writing anything else)."""
        path = Path(config.out)
        if path.exists() and not path.is_dir():
            raise EvaluationError(f"--out {path} is a file; give a folder for the run")
        if load_manifest(path) is None and any(p.name != LOCK for p in _entries(path)):
            if not (config.adopt and run_images(path)):  # a lost manifest (say how to keep the images), or not a run
                raise EvaluationError(missing_manifest_message(path, "generate"))
        new_lock, new_folder = not (path / LOCK).exists(), not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        stack.enter_context(locked(path))
        if new_lock:  # a call refused before it wrote anything leaves no trace; only the lock's holder cleans up
            stack.push(lambda error, *_: _remove_unused(path, new_folder) if error is not None else None)
        asked = image_config(config, device, dtype)
        manifest = load_manifest(path)  # again, now that no other call can be writing it
        if manifest is None and config.adopt and run_images(path):
            manifest = adopt(config, path, asked, log)
        elif config.adopt:
            log(f"--adopt: {path} has {'its ' + MANIFEST if manifest else 'no image'}; nothing to adopt")
        fresh = {"config": asked, "classes": [], "per_class": 0, "methods": {}}
        bound = manifest is not None and any(run_images_of(path, m) for m in manifest.get("methods", {}))
        if manifest is None:
            manifest = fresh
        elif not bound:  # nothing made yet (a first call that failed): this call's options replace the run's
            if _changed(manifest["config"], asked):
                manifest = {**fresh, "sessions": manifest.get("sessions", [])}
        else:
            changed = _changed(manifest["config"], asked)
            if changed:
                lines = "\n".join(f"  {k}: run has {a!r}, this call asks {b!r}" for k, (a, b) in changed.items())
                raise EvaluationError(f"{path} was generated with other options; {MIXING}:\n{lines}\n{RERUN}")
        run = cls(config, path, manifest, bound, log)
        run._add_call()
        return run

    def _add_call(self) -> None:
        manifest, config = self.manifest, self.config
        manifest["classes"] = sorted(set(manifest["classes"]) | set(config.classes))
        manifest["per_class"] = max(manifest["per_class"], config.per_class)
        manifest["versions"] = library_versions()
        for method in config.methods:
            fresh = {"seconds": 0.0, "images_timed": 0, "peak_mem_bytes": 0}
            stats = manifest["methods"].setdefault(method, fresh)
            # A name's own parameters (a sweep's ratio, ToDo's pooling, ...) are bound per method folder.
            params, old_params = method_params(method, config.reduction, config.method_options), stats.get("params")
            if old_params is not None and old_params != params:
                if run_images_of(self.path, method):
                    raise EvaluationError(
                        f"{self.path / method} was generated with {old_params}, this call asks {params}; {MIXING}. {RERUN}"
                    )
                stats.clear()
                stats.update(fresh)
            stats["params"] = params

    def size(self, pipe) -> tuple[int, int]:
        """(height, width): this call's, else the run's (once it holds images), else the model's default; checked
        against the pipeline's own rule."""
        recorded = self.manifest["config"] if self.bound else {}
        multiple, why = side_multiple(pipe, SIZE_MULTIPLE)
        sides = []
        for key, default in zip(SIZE_KEYS, default_sides(pipe)):
            value = getattr(self.config, key) or recorded.get(key) or default
            check_size(f"--{key}", value, multiple, why)
            sides.append(value)
        return sides[0], sides[1]

    def _bind_default_letters(self, pipe) -> None:
        """Record the letters tofu_sd's default schedule gives this model (config ``default_schedule``) when a
        method of the call follows it, and refuse, before anything is written, to add images to such a method
        made with other letters: a newer tofu_sd whose default changed would otherwise mix two schedules under
        one name. A run recorded before the letters were (no ``default_schedule``) is taken as made with today's
        default on a U-Net, whose default has not changed, and refused on a diffusion transformer, whose default
        changed on 2026-12-01 (from ``P`` in the first third to ``M`` everywhere)."""
        methods = [m for m in self.config.methods if parse_name(m).method.default_schedule]
        if self.config.reduction.schedule is not None or not methods:
            return
        letters = default_letters(pipe, self.config.reduction)
        if letters is None:
            return
        recorded = self.manifest["config"].get("default_schedule")
        made = [m for m in methods if run_images_of(self.path, m)]
        if made and recorded != letters and (recorded is not None or is_transformer(pipe)):
            was = recorded or "of a tofu_sd from before 2026-12-01 (P in the first third of the blocks)"
            raise EvaluationError(
                f"{self.path}: {', '.join(made)} were made with tofu_sd's default schedule {was}; this tofu_sd's "
                f"default on this model is {letters}, and {MIXING}. Choose a new --out for this version's default, "
                f"or continue the run's images with a copy of the tofu_sd that made them."
            )
        self.manifest["config"]["default_schedule"] = letters

    def start(self, pipe, devices: list[str], processes: int) -> Plan:
        """Bind the run to this call (its size checked against ``pipe``), list the pending work, open a session
        and write the manifest."""
        height, width = self.size(pipe)
        self._bind_default_letters(pipe)
        self.manifest["config"].update(height=height, width=width, model_class=type(pipe).__name__)
        for method in self.config.methods:
            (self.path / method).mkdir(exist_ok=True)
            for stale in (self.path / method).glob(f".*{TMP_SUFFIX}"):  # left by a killed write
                stale.unlink()
        units, damaged = pending_units(self.config, self.path, (width, height))
        if damaged:
            self.log(f"re-making {len(damaged)} damaged image(s): {listed(damaged)}")
        plan = Plan(height, width, units)
        for earlier in self.manifest.get("sessions", []):  # one whose main process died: never finished
            if earlier["status"] == "running":
                earlier["status"] = "failed"
        if plan.images:
            self.session = {"num_processes": processes, "devices": devices, "started": now(), "wall_seconds": 0.0,
                            "images": 0, "status": "running"}  # fmt: skip
            self.manifest.setdefault("sessions", []).append(self.session)
        self.write()
        return plan

    def write(self) -> None:
        """Rewrite the manifest atomically (flushed to the disk); DiskFull if there is no space for it."""
        try:
            write_json_atomic(self.path / MANIFEST, self.manifest, fsync=True)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full(self.path, error, self.config.methods, self.path / MANIFEST) from error
            raise

    def record_round(self, reports: list[dict], status: str | None) -> int:
        """Add the processes' reports of one round to the manifest (not written) and set the session's status
        (None: still running); returns how many images the round made."""
        made = 0
        for report in reports:
            made += report["images"]
            for method, part in report["stats"].items():
                stats = self.manifest["methods"][method]
                stats["seconds"] += part["seconds"]
                stats["images_timed"] += part["images_timed"]
                stats["peak_mem_bytes"] = max(stats["peak_mem_bytes"], part["peak_mem_bytes"])
                stats["peak_mem_kind"] = part["peak_mem_kind"]
                add_counts(stats, part)
        self.session["images"] += made
        self.session["wall_seconds"] = round(time.perf_counter() - self.started, 3)
        if status is not None:
            self.session["status"] = status
        return made


def run_images_of(run_dir: Path, method: str) -> bool:
    """Whether the method's folder holds a PNG."""
    return next((Path(run_dir) / method).glob("*.png"), None) is not None


def _remove_unused(path: Path, folder: bool) -> None:
    """If run directory ``path`` holds nothing but the lock, remove the lock and, with ``folder``, the directory
    (called by the lock's holder, which made them, when it fails; a call that opens the lock meanwhile finds it
    held and is refused, one that comes after makes a new one)."""
    if all(p.name == LOCK for p in _entries(path)):
        (path / LOCK).unlink(missing_ok=True)
        if folder:
            with contextlib.suppress(OSError):  # another call may have started writing there meanwhile
                path.rmdir()


def _entries(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []


def _changed(old: dict, asked: dict) -> dict:
    """The image options this call asks differently from the run; an unset height / width takes the run's. A
    reduction option that the run does not record (it was made before the option existed) is at its default."""
    old.setdefault("prompts", "imagenet")  # runs made before prompt sets existed
    recorded = dict(old)
    if isinstance(old.get("reduction"), dict):
        recorded["reduction"] = {**asdict(TokenFusionConfig()), **old["reduction"]}
    # Compared as the manifest's JSON holds them (a tuple option, the reduction's modules, reads back a list).
    recorded, asked = json.loads(json.dumps(recorded)), json.loads(json.dumps(asked))
    return {
        k: (old.get(k), v)
        for k, v in asked.items()
        if recorded.get(k) != v and not (v is None and k in SIZE_KEYS)
    }
