"""``tofu-sd generate`` and ``analyze`` on saved tiny pipelines of the newer families (QwenImagePipeline,
Flux2Pipeline, SanaPipeline, WanPipeline) given as ``--model <folder>``: the images of full and tofu (a video's
frames and its middle frame for Wan), each family's call arguments checked against a direct pipeline call with the
same seeds, U-Net-only methods, methods the family cannot run and bad ``--frames`` refused before anything is
written; ``analyze`` runs on the Qwen-Image and Wan folders and is refused clearly where its probes do not know the
blocks (FLUX.2, Sana)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from evaluation.cli import main
from evaluation.sampling import image_seed
from evaluation.tiny_pipelines import PIPELINES

pytest.importorskip("diffusers", minversion="0.42.1")
pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py

SIZE, FRAMES, GUIDANCE = 32, 5, 7.5
#: What a call of each pipeline must receive for --guidance-scale 7.5 (and --frames 5), written out here rather
#: than taken from evaluation.pipeline_calls, so that a wrong mapping there fails.
EXPECTED_CALL = {
    "QwenImage": {"true_cfg_scale": GUIDANCE, "negative_prompt": " "},
    "Flux2": {"guidance_scale": GUIDANCE},
    "Sana": {"guidance_scale": GUIDANCE, "use_resolution_binning": False},
    "Wan": {"guidance_scale": GUIDANCE, "num_frames": FRAMES},
}
FAMILIES = list(EXPECTED_CALL)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's tiny pipeline saved as a diffusers folder."""
    root = tmp_path_factory.mktemp("newer_pipelines")
    for name, build in PIPELINES.items():
        build().save_pretrained(root / name)
    return {name: root / name for name in PIPELINES}


def generate_args(folder, out, family, methods="full,tofu", *extra):
    frames = ["--frames", str(FRAMES)] if family == "Wan" else []
    return ["generate", "--model", str(folder), "--out", str(out), "--methods", methods, "--classes", "0-1",
            "--per-class", "1", "--steps", "2", "--height", str(SIZE), "--width", str(SIZE), "--device", "cpu",
            "--guidance-scale", str(GUIDANCE), "--no-warmup", "--quiet", *frames, *extra]  # fmt: skip


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def direct_call(folder, family):
    """The two prompts' outputs of the pipeline called directly with generate's seeds and ``EXPECTED_CALL``."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["A high-quality photograph of a tench.", "A high-quality photograph of a goldfish."]  # ImageNet 0, 1
    out = pipe(prompt=prompts, num_inference_steps=2, height=SIZE, width=SIZE, output_type="pil",
               generator=[torch.Generator("cpu").manual_seed(image_seed(0, c, 0)) for c in (0, 1)],
               **EXPECTED_CALL[family])  # fmt: skip
    return out.frames if family == "Wan" else out.images


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_makes_full_and_tofu_images_with_the_familys_call(family, folders, tmp_path):
    out = tmp_path / "run"
    assert main(generate_args(folders[family], out, family)) == 0
    expected = direct_call(folders[family], family)
    for c in (0, 1):
        full, tofu = pixels(out / "full" / f"{c:04d}_0.png"), pixels(out / "tofu" / f"{c:04d}_0.png")
        assert full.shape == tofu.shape == (SIZE, SIZE, 3)
        assert not np.array_equal(full, tofu)  # Token Fusion ran
        if family == "Wan":  # every frame, and the middle one as the image
            frames = {m: sorted((out / m / "frames" / f"{c:04d}_0").glob("*.png")) for m in ("full", "tofu")}
            assert [p.name for p in frames["full"]] == [f"{i:03d}.png" for i in range(FRAMES)] == [p.name for p in frames["tofu"]]
            for index, path in enumerate(frames["full"]):
                np.testing.assert_array_equal(pixels(path), np.asarray(expected[c][index]))
            np.testing.assert_array_equal(full, pixels(frames["full"][FRAMES // 2]))
            np.testing.assert_array_equal(tofu, pixels(frames["tofu"][FRAMES // 2]))
        else:
            np.testing.assert_array_equal(full, np.asarray(expected[c]))


@pytest.mark.parametrize("family,method", [("QwenImage", "tome"), ("Flux2", "deepcache"), ("Sana", "todo"), ("Wan", "tome")])
def test_unet_only_methods_are_refused_before_anything_is_written(family, method, folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(generate_args(folders[family], out, family, f"full,{method}")) == 2
    err = capsys.readouterr().err
    assert f"{method} runs on U-Nets only" in err and "On diffusion transformers give" in err
    assert not out.exists()


def test_methods_the_family_cannot_run_are_refused_before_anything_is_written(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(generate_args(folders["Flux2"], out, "Flux2", "full,tofu+ff")) == 2  # modules: U-Nets only
    assert "method tofu+ff cannot run on --model" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("family", ["QwenImage", "Flux2", "Sana", "Wan"])
def test_tofu_kv_runs_where_the_family_has_reduce_kv(family, folders, tmp_path):
    out = tmp_path / "run"
    assert main(generate_args(folders[family], out, family, "full,tofu-kv")) == 0
    for c in (0, 1):
        assert not np.array_equal(pixels(out / "full" / f"{c:04d}_0.png"), pixels(out / "tofu-kv" / f"{c:04d}_0.png"))


def test_a_step_cache_that_hooks_nothing_on_sana_is_refused(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(generate_args(folders["Sana"], out, "Sana", "full,fbcache")) == 2
    assert "method fbcache cannot run on --model" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("family,frames,message", [
    ("Flux2", 5, "--frames 5 is for video pipelines; a Flux2Pipeline makes images"),
    ("Wan", 6, "--frames must be 4 k + 1 for a WanPipeline"),
])  # fmt: skip
def test_bad_frames_are_refused_before_anything_is_written(family, frames, message, folders, tmp_path, capsys):
    out = tmp_path / "run"
    args = [a for a in generate_args(folders[family], out, family) if a not in ("--frames", str(FRAMES))]
    assert main([*args, "--frames", str(frames)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def _analyze_args(family: str, folder, out) -> list[str]:
    frames = ["--frames", str(FRAMES)] if family == "Wan" else []
    return ["analyze", "--model", str(folder), "--out", str(out), "--classes", "0", "--steps", "1",
            "--height", str(SIZE), "--width", str(SIZE), "--device", "cpu", "--quiet", *frames]  # fmt: skip


@pytest.mark.parametrize("family", ["QwenImage", "Wan"])
def test_analyze_runs_on_a_saved_pipeline_folder(family, folders, tmp_path):
    """The command end to end on a local folder (tests/test_analyze_families.py checks the measurement)."""
    out = tmp_path / "fl"
    assert main(_analyze_args(family, folders[family], out)) == 0
    result = json.loads((out / "fl.json").read_text())
    assert result["blocks"] and all(block["proposed_letter"] in "PM" for block in result["blocks"])
    assert len(result["proposed_schedule"]) == len(result["blocks"])
