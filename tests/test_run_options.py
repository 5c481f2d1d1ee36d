"""Options are checked before anything is loaded or written, and a run is bound only to options that worked
(issue 15, 8)."""

import json
import re

import pytest
from PIL import Image

from evaluation import generate as generate_module
from evaluation.cli import main

BASE = ["generate", "--model", "tiny-random", "--methods", "full,tofu", "--classes", "0", "--per-class", "1",
        "--steps", "1", "--no-warmup", "--quiet"]  # fmt: skip


@pytest.mark.parametrize(
    "args,match",
    [
        (["--height", "50"], "--height must be a positive multiple of 8 .* got 50; e.g. 48"),
        (["--width", "0"], "--width must be a positive multiple of 8"),
        (["--height", "-64"], "--height must be a positive multiple of 8"),
        (["--per-class", "1001"], "--per-class must be in 1-1000, got 1001"),
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0"),
        (["--guidance-scale", "-1"], "--guidance-scale must be a finite number >= 0"),
        (["--seed", str(10**20)], "--seed must be an integer whose image seeds torch can take"),
        (["--dtype", "fp8"], "unknown --dtype 'fp8'"),
        (["--classes", "3-1"], "bad --classes"),
        (["--methods", "full,tofu,full"], "lists a method twice"),
    ],
)
def test_bad_options_fail_before_anything_is_loaded_or_written(tmp_path, capsys, monkeypatch, args, match):
    def load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(generate_module, "load_pipeline", load)
    out = tmp_path / "run"
    assert main([*BASE, *args, "--out", str(out)]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists()


def test_a_rejected_size_leaves_the_directory_free(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--height", "50", "--out", str(out)]) == 2
    assert main([*BASE, "--height", "56", "--out", str(out)]) == 0
    assert Image.open(out / "tofu" / "0000_0.png").size == (64, 56)


def test_the_size_is_checked_against_the_pipelines_own_rule(tmp_path, capsys, monkeypatch):
    real = generate_module.load_pipeline

    def coarse(*args, **kwargs):  # a VAE that scales by 16: sides must be multiples of 16
        pipe = real(*args, **kwargs)
        pipe.vae_scale_factor = 16
        return pipe

    out = tmp_path / "run"
    monkeypatch.setattr(generate_module, "load_pipeline", coarse)
    assert main([*BASE, "--height", "56", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--height must be a positive multiple of 16 (StableDiffusionPipeline needs multiples of 8; its VAE scale " \
           "factor is 16), got 56; e.g. 48" in err
    assert not out.exists()  # refused after the model loaded: the run directory this call made is gone, lock too
    out.mkdir()
    assert main([*BASE, "--height", "56", "--out", str(out)]) == 2
    assert out.is_dir() and not list(out.iterdir())  # a directory that was there before is kept, as it was
    monkeypatch.undo()
    assert main([*BASE, "--height", "56", "--out", str(out)]) == 0


def test_a_run_whose_first_call_made_nothing_is_not_bound(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = generate_module.load_pipeline

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    def failing_pipeline(*args, **kwargs):  # loads, then fails at the first image
        pipe = real(*args, **kwargs)
        monkeypatch.setattr(type(pipe), "__call__", out_of_memory)
        return pipe

    monkeypatch.setattr(generate_module, "load_pipeline", failing_pipeline)
    with pytest.raises(RuntimeError, match="out of memory"):
        main([*BASE, "--steps", "3", "--out", str(out)])
    assert json.loads((out / "manifest.json").read_text())["sessions"][0]["status"] == "failed"
    monkeypatch.undo()
    # No image was made with --steps 3, so other options are free; once an image is there, they are bound.
    assert main([*BASE, "--steps", "1", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["steps"] == 1 and [s["status"] for s in manifest["sessions"]] == ["failed", "complete"]
    assert main([*BASE, "--steps", "3", "--out", str(out)]) == 2
