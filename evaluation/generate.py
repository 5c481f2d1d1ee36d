"""Batch generation over class prompts (ImageNet, or the built-in model's shapes) for several methods, same seeds.

:func:`generate` fills a run directory (:mod:`evaluation.rundir`: layout, manifest, binding, lock, pending
work) as its options say (:class:`~evaluation.generate_config.GenerateConfig`). It is resumable: finished
images are skipped (a damaged one is made again), every PNG is written to a temporary name and renamed, and the
manifest is rewritten (atomically) after every batch.

Several processes (``accelerate launch`` on GPUs, ``torchrun`` on CPUs, :mod:`evaluation.processes`) share a
run: process 0 lists the pending batches, they are split between the processes, which go through them in
lock-step rounds of one batch each and exchange small reports (images made, time, peak memory, error) after
every round; process 0 merges them into the manifest. A batch holds the same images whichever process makes
it, so the images equal a one-process run's.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

from .block_calls import counting
from .errors import EvaluationError
from .files import is_disk_full
from .generate_config import GenerateConfig
from .images import image_name, image_text, save_png_atomic
from .manifest import MANIFEST
from .memory import PeakMemory
from .methods import method_applied
from .methods.magcache_calibration import Calibration, calibrating
from .models import call_kwargs, check_methods, load_pipeline, resolve_device, resolve_dtype
from .pipeline_calls import call_arguments, check_frames, is_video, middle_frame, output_images
from .processes import Processes, ProcessesLost, Signals, describe
from .rundir import Plan, RunDir, Unit, disk_full
from .sampling import image_seed


def _stderr(message: str) -> None:
    print(f"tofu-sd generate: {message}", file=sys.stderr)


def generate(config: GenerateConfig, progress: bool = True, log=_stderr) -> dict:
    """Generate every missing (or damaged) image of ``config``; returns the manifest.

    Run as one process, or as several launched together by accelerate or torchrun: then the pending batches are
    split between the processes, each image is made once with the seed it has in a one-process run, and
    process 0 alone writes the manifest. A process that fails stops them all after their current batch.
    ``log`` takes the notes of process 0 (damaged images re-made, images adopted).
    """
    procs = Processes(resolve_device(config.device))
    try:
        with contextlib.ExitStack() as stack:
            return _generate(config, procs, stack, progress, log)
    except OSError as error:  # any other write (the lock, a folder) that found the disk full
        if is_disk_full(error):
            raise disk_full(config.out, error, config.methods) from error
        raise
    finally:
        procs.close()


def _generate(config: GenerateConfig, procs: Processes, stack: contextlib.ExitStack, progress: bool, log) -> dict:
    device = procs.device
    dtype = resolve_dtype(config.dtype, device)
    # Process 0 checks the options against the run's and holds the run directory; nothing is written yet.
    run = procs.step(lambda: RunDir.open(config, device, dtype, stack, log), main_only=True)
    pipe = procs.step(lambda: load_pipeline(config.model, device, dtype, config.scheduler))
    # Methods the pipeline cannot run (U-Net-only ones on a diffusion transformer), and --frames on an image
    # pipeline, are refused before anything is written.
    procs.step(lambda: check_methods(pipe, config.model, config.methods, config.reduction, config.method_options), main_only=True)
    procs.step(lambda: check_frames(pipe, config.frames), main_only=True)
    devices = procs.exchange(str(device))
    # Process 0 checks the size against the pipeline, binds the run and lists the pending batches.
    plan = procs.step(lambda: run.start(pipe, devices, procs.count), main_only=True, share=True)
    maker = _Maker(config, pipe, device, plan)
    return _Rounds(procs, run, maker, plan).go(stack, progress)


def frame_path(image_path: Path, index: int) -> Path:
    """Where frame ``index`` of the video whose image is ``image_path`` goes: ``<method>/frames/<stem>/<index>.png``."""
    return image_path.parent / "frames" / image_path.stem / f"{index:03d}.png"


#: The job (class, sample) of MagCache's calibration call (:mod:`evaluation.methods.magcache_calibration`): fixed, so every
#: process and every call of a run calibrates alike, whichever classes it makes.
CALIBRATION_JOB = (0, 0)


class _Maker:
    """Makes this process's units: every method's images of a batch, timed, and saves the missing ones. On a
    diffusion transformer it also counts the blocks and attentions each method runs (:mod:`evaluation.block_calls`),
    in the timed call; and it calibrates MagCache where diffusers has no ratios for the model, with one untimed call
    on :data:`CALIBRATION_JOB` at the run's options."""

    def __init__(self, config: GenerateConfig, pipe, device: torch.device, plan: Plan) -> None:
        self.config, self.pipe, self.device, self.height, self.width = config, pipe, device, plan.height, plan.width
        self.memory = PeakMemory(device)
        self.warmed: set[str] = set()
        self.calibration = Calibration(lambda steps: self.run_pipe([CALIBRATION_JOB], steps))
        self.video = is_video(pipe)

    def run_pipe(self, batch: list[tuple[int, int]], steps: int) -> list:
        # The global RNG is seeded per batch: tomesd draws its random partition from a copy of it, so ToMe's
        # images do not depend on which process makes a batch, nor on what that process made before.
        config, device = self.config, self.device
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(image_seed(config.seed, *batch[0]))
            output = self.pipe(
                prompt=[config.class_prompt(c) for c, _ in batch],
                num_inference_steps=steps,
                height=self.height,
                width=self.width,
                generator=[torch.Generator("cpu").manual_seed(image_seed(config.seed, c, k)) for c, k in batch],
                **call_arguments(self.pipe, config.guidance_scale, config.frames),
                **call_kwargs(config.model),
                **({"output_type": "pil"} if self.video else {}),
            )
            return output_images(self.pipe, output)

    def make(self, unit: Unit, report: dict) -> None:
        with calibrating(self.calibration):
            self._make(unit, report)

    def _make(self, unit: Unit, report: dict) -> None:
        batch, config = unit.batch, self.config
        for method, missing in unit.missing:  # interleaved, so slow drifts of the machine hit every method alike
            applied = lambda method=method: method_applied(self.pipe, method, config.reduction, config.method_options)  # noqa: E731
            if config.warmup and method not in self.warmed:
                with applied():  # one-time costs (allocator, kernels) stay out of the timing
                    self.run_pipe(batch, 1)
                self.warmed.add(method)
            # counting first: its hooks then sit below a cache's and above Token Fusion's (see block_calls)
            with counting(self.pipe) as count, applied(), self.memory.measure() as peak:
                t0 = time.perf_counter()
                images = self.run_pipe(batch, config.steps)
                seconds = time.perf_counter() - t0
            for job, image in zip(batch, images):
                if job in missing:  # the others are on disk already: computed only so that the batch is the same
                    self.save(method, job, image)
            stats = report["stats"].setdefault(method, {"seconds": 0.0, "images_timed": 0, "peak_mem_bytes": 0})
            stats["seconds"] += seconds
            stats["images_timed"] += len(batch)
            stats["peak_mem_bytes"] = max(stats["peak_mem_bytes"], peak.bytes)
            stats["peak_mem_kind"] = self.memory.kind
            if count is not None:  # a diffusion transformer: the blocks and attentions run, weighted by batch rows
                stats["block_calls"] = stats.get("block_calls", 0) + count.blocks
                stats["attention_calls"] = stats.get("attention_calls", 0) + count.attentions
                stats["images_counted"] = stats.get("images_counted", 0) + len(batch)
            report["images"] += len(missing)

    def save(self, method: str, job: tuple[int, int], image) -> None:
        """The image of ``job``; for a video, each frame (:func:`frame_path`), then the middle frame as the
        image, last, so that a finished image means a finished video."""
        path = Path(self.config.out) / method / image_name(*job)
        text = image_text(self.config, method, *job)
        try:
            if self.video:
                frame_path(path, 0).parent.mkdir(parents=True, exist_ok=True)
                for index, frame in enumerate(image):
                    save_png_atomic(frame, frame_path(path, index), {**text, "frame": str(index)})
                image = middle_frame(image)
            save_png_atomic(image, path, text)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full(self.config.out, error, self.config.methods, path) from error
            raise


class _Rounds:
    """The lock-step rounds of a call: one batch per process each, then an exchange of reports, which process 0
    merges into the manifest. A failure anywhere (an error, a signal, a full disk) stops every process at the end
    of its round; the manifest is written, then the failure is raised."""

    def __init__(self, procs: Processes, run: RunDir | None, maker: _Maker, plan: Plan) -> None:
        self.procs, self.run, self.maker = procs, run, maker
        self.mine = procs.split(plan.units)
        self.rounds = -(-len(plan.units) // procs.count)  # every process takes part in every round, with work or not
        self.total = plan.images
        self.failure: BaseException | None = None  #: this process's own
        self.lost: ProcessesLost | None = None
        self.stopped: list[tuple[int, dict]] = []  #: (process, report) of every process that reported an error
        self.write_error: BaseException | None = None  #: process 0's last manifest write, if it failed

    def go(self, stack: contextlib.ExitStack, progress: bool) -> dict:
        from tqdm.auto import tqdm

        bar = None
        if self.procs.is_main:
            bar = tqdm(total=self.total, unit="img", disable=not progress or self.total == 0, desc="generating")
            stack.callback(bar.close)
            self.run.started = time.perf_counter()
        signals = stack.enter_context(Signals())
        for index in range(self.rounds):
            report = self._work(index, signals)
            try:
                reports = self.procs.exchange(report)
            except ProcessesLost as e:
                self.lost, reports = e, [report]
            self.stopped = [(i, r) for i, r in enumerate(reports) if r["error"] is not None]
            if self.procs.is_main:
                bar.update(self._record(reports, last=index == self.rounds - 1))
            if self.lost or self.stopped:
                break
        return self._end()

    def _work(self, index: int, signals: Signals) -> dict:
        report = {"images": 0, "stats": {}, "error": None, "interrupted": False}
        try:
            try:
                signals.immediate = True
                if signals.received:
                    raise KeyboardInterrupt
                if self.write_error is not None:  # the manifest could not be written: stop every process
                    raise self.write_error
                if index < len(self.mine):
                    self.maker.make(self.mine[index], report)
            finally:
                signals.immediate = False
        except BaseException as e:  # reported to the others, raised here once the manifest is written
            self.failure = e
            report.update(error=describe(e), interrupted=isinstance(e, KeyboardInterrupt))
        return report

    def _record(self, reports: list[dict], last: bool) -> int:
        status = None
        if self.lost or self.stopped:
            interrupted = not self.lost and all(r["interrupted"] for _, r in self.stopped)
            status = "interrupted" if interrupted else "failed"
        elif last:
            status = "complete"
        made = self.run.record_round(reports, status)
        try:
            self.run.write()
            self.write_error = None
        except Exception as error:  # raised in the next round, or at the end, once every process has stopped
            self.write_error = error
        return made

    def _end(self) -> dict:
        procs, manifest = self.procs, self.run.manifest if self.run is not None else None
        final = {"manifest": manifest, "error": None if self.write_error is None else describe(self.write_error)}
        if not self.lost:  # a barrier too: no process ends (so its launcher stops the others) before the manifest is written
            with contextlib.suppress(ProcessesLost):
                final = procs.exchange(final)[0]
        manifest_path = Path(self.maker.config.out) / MANIFEST
        if self.failure is not None:
            raise self.failure
        if self.lost is not None:
            raise ProcessesLost(
                f"{self.lost}; this process stopped. Finished images and {manifest_path} are kept: re-run the same "
                "command to make the rest"
            )
        if self.stopped:
            index, report = self.stopped[0]
            if report["interrupted"]:
                raise KeyboardInterrupt
            raise EvaluationError(
                f"process {index} of {procs.count} failed ({report['error']}), so this one stopped too. Finished "
                f"images and {manifest_path} are kept: fix the cause and re-run the same command to make the rest"
            )
        if self.write_error is not None:
            raise self.write_error
        if final["error"] is not None:
            raise EvaluationError(f"process 0 of {procs.count} could not write {manifest_path}: {final['error']}")
        return final["manifest"]
