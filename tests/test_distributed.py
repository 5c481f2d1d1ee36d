"""`tofu-sd generate` as several CPU processes (torchrun; accelerate's PartialState gives a gloo group).

Each test starts real processes. A small worker wraps the CLI to log which process saved which image and to
make one process fail on purpose.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from evaluation import generate as generate_module
from evaluation.cli import main
from evaluation.errors import EvaluationError
from evaluation.processes import Processes

METHODS = ("full", "tome", "tofu")
# 6 (class, sample) jobs in batches of 2: three batches per method, split 2 + 1 between two processes.
GENERATE = ["generate", "--model", "tiny-random", "--methods", ",".join(METHODS), "--classes", "0-2", "--per-class",
            "2", "--steps", "2", "--batch-size", "2", "--quiet"]  # fmt: skip
NAMES = [f"{c:04d}_{k}.png" for c in range(3) for k in range(2)]
IMAGES = [f"{m}/{n}" for m in METHODS for n in NAMES]
TIMEOUT = 300  # seconds; a run that hangs fails the test instead of blocking it

WORKER = textwrap.dedent(
    """
    import os, sys
    from evaluation import generate
    from evaluation.cli import main

    rank = int(os.environ["RANK"])
    real_save, saved = generate.save_png_atomic, []

    def save(image, path, text):
        if rank == int(os.environ.get("CRASH_RANK", -1)) and len(saved) == int(os.environ["CRASH_AFTER"]):
            if os.environ["CRASH_MODE"] == "exit":
                os._exit(9)  # dies at once, as a crash would: no cleanup, no report to the others
            raise RuntimeError("injected failure")
        real_save(image, path, text)
        saved.append(path)
        with open(os.path.join(os.environ["SAVE_LOG"], f"rank{rank}.log"), "a") as log:
            log.write(f"{path.parent.name}/{path.name}\\n")

    generate.save_png_atomic = save
    sys.exit(main(sys.argv[1:]))
    """
)


def launch(tmp_path, out, processes, *extra, **env):
    """``torchrun --nproc_per_node PROCESSES`` of the worker; returns the completed process and the save logs."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    logs = tmp_path / f"logs-{out.name}-{len(list(tmp_path.glob('logs-*')))}"
    logs.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAVE_LOG": str(logs), **{k: str(v) for k, v in env.items()}}
    env.pop("OMP_NUM_THREADS", None)  # torchrun sets 1 per process
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(worker), *GENERATE, *extra, "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    saves = {int(p.stem.removeprefix("rank")): p.read_text().split() for p in logs.glob("rank*.log")}
    return result, saves


def images(out) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(out.glob("*/*.png"))}


def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: the same images made by one process with one thread."""
    out = tmp_path_factory.mktemp("single") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*GENERATE, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert sorted(images(out)) == sorted(IMAGES)
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("two")
    out = tmp_path / "run"
    result, saves = launch(tmp_path, out, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, saves


def test_two_processes_split_the_batches_and_equal_one_process(two_process_run, single_run):
    out, result, saves = two_process_run
    # Whole batches, contiguous: process 0 makes classes 0 and 1 (two batches), process 1 class 2, every method.
    assert sorted(saves) == [0, 1]
    assert sorted(saves[0]) == sorted(i for i in IMAGES if not i.split("/")[1].startswith("0002"))
    assert sorted(saves[1]) == sorted(i for i in IMAGES if i.split("/")[1].startswith("0002"))
    # Each image made exactly once, and byte for byte what one process makes (tome's random partition included).
    assert len(saves[0] + saves[1]) == len(set(saves[0] + saves[1])) == len(IMAGES)
    assert images(out) == images(single_run)
    assert not list(out.rglob(".*.tmp"))


def test_two_process_manifest_merges_every_process(two_process_run):
    out, result, _ = two_process_run
    data = manifest(out)
    for method in METHODS:
        stats = data["methods"][method]
        assert stats["images_timed"] == 6 and stats["seconds"] > 0 and stats["peak_mem_bytes"] > 0
        assert stats["peak_mem_kind"].startswith("peak_rss")
    [session] = data["sessions"]
    assert session["num_processes"] == 2 and session["devices"] == ["cpu", "cpu"]
    assert session["images"] == 18 and session["status"] == "complete" and session["wall_seconds"] > 0
    # Only the main process prints the summary.
    assert result.stdout.count("full: ") == 1 and result.stdout.count("next: tofu-sd evaluate") == 1


def test_evaluate_accepts_a_multi_process_run(two_process_run, tmp_path, empty_torch_home):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(two_process_run[0], out)
    assert main(["evaluate", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {m: report["methods"][m]["n_images"] for m in METHODS} == {m: 6 for m in METHODS}
    assert report["methods"]["tofu"]["sec_per_image"] > 0


def test_failing_process_stops_all_and_one_process_resumes(tmp_path, single_run, one_thread, monkeypatch):
    out = tmp_path / "run"
    # Process 1 fails on its third image: after its `full` batch of class 2, at the first image of `tome`'s.
    started = time.monotonic()
    result, saves = launch(tmp_path, out, 2, CRASH_RANK=1, CRASH_AFTER=2, CRASH_MODE="raise")
    assert time.monotonic() - started < TIMEOUT
    assert result.returncode != 0
    assert "process 1 of 2 failed (RuntimeError: injected failure)" in result.stderr
    assert "re-run the same command" in result.stderr
    # Process 0 finished its round (the batch of class 0); the next round did not start.
    assert sorted(saves[0]) == sorted(f"{m}/0000_{k}.png" for m in METHODS for k in (0, 1))
    assert saves[1] == ["full/0002_0.png", "full/0002_1.png"]
    assert sorted(images(out)) == sorted(saves[0] + saves[1]) and not list(out.rglob(".*.tmp"))
    data = manifest(out)
    assert {m: data["methods"][m]["images_timed"] for m in METHODS} == {"full": 4, "tome": 2, "tofu": 2}
    assert [(s["num_processes"], s["images"], s["status"]) for s in data["sessions"]] == [(2, 8, "failed")]

    # One process finishes the run: only the missing images, equal to the reference.
    real_save, saved = generate_module.save_png_atomic, []
    def save(image, path, text):
        saved.append(path)
        real_save(image, path, text)

    monkeypatch.setattr(generate_module, "save_png_atomic", save)
    assert main([*GENERATE, "--out", str(out)]) == 0
    assert sorted(f"{p.parent.name}/{p.name}" for p in saved) == sorted(set(IMAGES) - set(saves[0] + saves[1]))
    assert images(out) == images(single_run)
    data = manifest(out)
    assert {m: data["methods"][m]["images_timed"] for m in METHODS} == {m: 6 for m in METHODS}
    sessions = [(s["num_processes"], s["images"], s["status"]) for s in data["sessions"]]
    assert sessions == [(2, 8, "failed"), (1, 10, "complete")]


def test_dead_process_does_not_hang_the_others_and_three_processes_grow_the_run(tmp_path, single_run):
    out = tmp_path / "run"
    # Process 1 dies without a word after two images; process 0 must notice, write the manifest and stop.
    started = time.monotonic()
    result, saves = launch(tmp_path, out, 2, CRASH_RANK=1, CRASH_AFTER=2, CRASH_MODE="exit")
    assert time.monotonic() - started < TIMEOUT and result.returncode != 0
    assert saves[1] == ["full/0002_0.png", "full/0002_1.png"]
    assert sorted(images(out)) == sorted(saves[0] + saves[1]) and not list(out.rglob(".*.tmp"))
    # Process 0 either finished its batch and found process 1 gone, or torchrun stopped it (SIGTERM) first.
    assert "lost contact with another process" in result.stderr or "interrupted" in result.stderr
    data = manifest(out)  # valid; it times only images whose whole batch process 0 reported
    [session] = data["sessions"]
    assert session["num_processes"] == 2 and session["status"] == "failed"
    timed = {m: data["methods"][m]["images_timed"] for m in METHODS}
    assert session["images"] == sum(timed.values()) <= len(saves[0])

    # Three processes finish the run and add class 3 (3 or 4 pending batches: each process gets one or two).
    result, saves_3 = launch(tmp_path, out, 3, "--classes", "0-3")
    assert result.returncode == 0, result.stderr[-3000:]
    made = saves_3[0] + saves_3[1] + saves_3[2]
    new = [f"{m}/0003_{k}.png" for m in METHODS for k in (0, 1)]
    assert len(made) == len(set(made)) and sorted(made) == sorted(set(IMAGES + new) - set(saves[0] + saves[1]))
    got = images(out)
    assert set(got) == set(IMAGES + new) and {i: got[i] for i in IMAGES} == images(single_run)
    data = manifest(out)
    assert data["classes"] == [0, 1, 2, 3]
    assert [(s["num_processes"], s["status"]) for s in data["sessions"]] == [(2, "failed"), (3, "complete")]
    for method in METHODS:  # the second session's batches (2 images, one class), whichever process made them
        batches = {i.split("/")[1][:4] for i in made if i.startswith(method + "/")}
        assert data["methods"][method]["images_timed"] == timed[method] + 2 * len(batches)


def test_dead_main_process_leaves_a_valid_run_that_one_process_finishes(tmp_path, single_run, one_thread):
    out = tmp_path / "run"
    # Process 0 dies after its first image, before it ever reports: process 1 must not wait for it.
    started = time.monotonic()
    result, saves = launch(tmp_path, out, 2, CRASH_RANK=0, CRASH_AFTER=1, CRASH_MODE="exit")
    assert time.monotonic() - started < TIMEOUT and result.returncode != 0
    assert saves[0] == ["full/0000_0.png"] and not list(out.rglob(".*.tmp"))
    data = manifest(out)  # as process 0 wrote it before the first round: valid, nothing timed yet
    assert [(s["num_processes"], s["status"]) for s in data["sessions"]] == [(2, "running")]
    assert all(data["methods"][m]["images_timed"] == 0 for m in METHODS)

    assert main([*GENERATE, "--out", str(out)]) == 0
    # Equal to the reference, full/0000_1.png too: its batch is computed whole again, as it was first made.
    assert images(out) == images(single_run)
    data = manifest(out)
    assert [(s["num_processes"], s["status"]) for s in data["sessions"]] == [(2, "failed"), (1, "complete")]
    made_before = len(saves[0]) + len(saves.get(1, []))
    assert data["sessions"][1]["images"] == len(IMAGES) - made_before


def test_a_second_independent_generate_is_refused(tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".generate.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        assert main([*GENERATE, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another `tofu-sd generate` (pid 4242) is writing" in err and "accelerate launch or torchrun" in err
    assert not list(out.glob("*/*.png"))


@pytest.mark.parametrize(
    "device,match",
    [("cuda:1", "--device cuda:1 names one GPU, but 2 processes were launched; use --device cuda"),
     ("mps", "2 processes were launched, which needs CUDA GPUs or the CPU")],
)  # fmt: skip
def test_device_that_cannot_be_shared_is_refused(monkeypatch, device, match):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(EvaluationError, match=match):
        Processes(torch.device(device))
