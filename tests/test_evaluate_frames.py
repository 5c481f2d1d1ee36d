"""`tofu-sd evaluate` on a video run (Wan): each video scored frame by frame against the reference's same-seed
video (MS-SSIM and LPIPS per frame, averaged over the video's frames), beside the middle-frame scores, with the
paired test on them; a frame-count mismatch refused before anything is written; image runs unchanged."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.cli import main
from evaluation.evaluate import load_image
from evaluation.metrics import ALEXNET_WEIGHTS, PairwiseMSSSIM, load_lpips
from evaluation.paired import paired_difference

SIDE, FRAMES, VIDEOS = 48, 5, 2
NAMES = [f"0000_{k}.png" for k in range(VIDEOS)]
MIDDLE = FRAMES // 2


def frame_file(run, method, name, index):
    """Where `tofu-sd generate` saves a video's frame, written out here (not taken from evaluation.generate)."""
    return run / method / "frames" / name.removesuffix(".png") / f"{index:03d}.png"


def write_run(folder, videos):
    """A video run as `tofu-sd generate` leaves it: per method, every frame of each video and its middle frame as
    the image; ``videos`` maps a method to uint8 arrays of shape (videos, frames, H, W, 3)."""
    for method, clips in videos.items():
        (folder / method).mkdir(parents=True)
        for name, clip in zip(NAMES, clips):
            frame_file(folder, method, name, 0).parent.mkdir(parents=True)
            for index, frame in enumerate(clip):
                Image.fromarray(frame).save(frame_file(folder, method, name, index))
            Image.fromarray(clip[len(clip) // 2]).save(folder / method / name)
    entries = {m: {"seconds": 2.0, "images_timed": VIDEOS, "peak_mem_bytes": 2**30} for m in videos}
    config = {"model": "tiny-wan", "prompts": "imagenet", "steps": 2, "frames": FRAMES, "reduction": {"ratio": 0.5}}
    manifest = {"config": config, "methods": entries, "classes": [0], "per_class": VIDEOS}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def noisy(clips, sd, seed, frames=None):
    """``clips`` with Gaussian noise of standard deviation ``sd * (1 + frame index)`` on the ``frames`` given (all)."""
    rng = np.random.default_rng(seed)
    out = clips.astype(np.float64)
    for index in range(clips.shape[1]) if frames is None else frames:
        out[:, index] += rng.normal(0, sd * (1 + index), out[:, index].shape)
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def made_run(tmp_path_factory):
    rng = np.random.default_rng(0)
    full = rng.uniform(0, 255, size=(VIDEOS, FRAMES, SIDE, SIDE, 3)).astype(np.uint8)
    videos = {
        "full": full,
        "tofu@0.5": noisy(full, 8, 1),  # every frame altered, more with the frame index
        "tome@0.5": full.copy(),  # the same videos
        "todo@0.5": noisy(full, 40, 2, frames=[0]),  # only the first frame altered: the middle frame is full's
        "tome@0.75": noisy(full, 15, 3),
    }
    return write_run(tmp_path_factory.mktemp("video") / "run", videos)


@pytest.fixture
def run(made_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(made_run, out)
    return out


@pytest.fixture
def lpips_home(empty_torch_home, metric_weights_dir):
    """A torch home with conftest's random LPIPS AlexNet weights only, downloads refused: FID (set-level, of the
    middle frames, unchanged here) is then unavailable, and its slow matrix square roots are skipped."""
    checkpoints = empty_torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / ALEXNET_WEIGHTS).symlink_to(metric_weights_dir / "hub" / "checkpoints" / ALEXNET_WEIGHTS)
    return empty_torch_home


def report_of(run):
    return json.loads((run / "report.json").read_text())


def loop_scores(run, method, lpips_model, names=NAMES, frames=FRAMES):
    """Per video, the mean over its frames of MS-SSIM and LPIPS against full's frame of the same index, one frame
    pair at a time: MS-SSIM as the metric computes it on one pair, LPIPS as the lpips network computes it."""
    out = {"ms_ssim_frames": [], "lpips_frames": []}
    for name in names:
        ms_ssim, lpips = [], []
        for index in range(frames):
            a, b = (load_image(frame_file(run, m, name, index))[None] for m in (method, "full"))
            metric = PairwiseMSSSIM()
            metric.update(a, b)
            ms_ssim.append(metric.compute()[0])
            with torch.no_grad():
                lpips.append(lpips_model(a * 2 - 1, b * 2 - 1).item())
        out["ms_ssim_frames"].append(sum(ms_ssim) / frames)
        out["lpips_frames"].append(sum(lpips) / frames)
    return out


def test_video_scores_are_the_mean_over_frames_of_each_frame_pair(run, lpips_home):
    assert main(["evaluate", str(run), "--compare", "tofu@0.5:tome@0.75"]) == 0
    report = report_of(run)
    lpips_model = load_lpips()
    assert report["config"]["frames_per_video"] == [FRAMES]
    for method in ("tofu@0.5", "todo@0.5", "tome@0.75"):
        expected = loop_scores(run, method, lpips_model)
        entry, per_video = report["methods"][method], report["per_pair"][method]
        for key in ("ms_ssim_frames", "lpips_frames"):
            assert per_video[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7)  # one score per video
            assert entry[key] == pytest.approx(np.mean(expected[key]), rel=1e-5, abs=1e-7)
            assert entry[f"{key}_std"] == pytest.approx(np.std(expected[key]), rel=1e-4, abs=1e-7)
        assert entry["n_images"] == VIDEOS and len(per_video["ms_ssim"]) == VIDEOS
    tofu = report["methods"]["tofu@0.5"]
    assert tofu["ms_ssim_frames"] < 0.999 and tofu["lpips_frames"] > 1e-4  # the loop reference is not trivial
    # The middle-frame scores are still those of the middle frames alone.
    middle = PairwiseMSSSIM()
    middle.update(load_image(frame_file(run, "tofu@0.5", NAMES[0], MIDDLE))[None], load_image(run / "full" / NAMES[0])[None])
    assert report["per_pair"]["tofu@0.5"]["ms_ssim"][0] == pytest.approx(middle.compute()[0], rel=1e-6)
    assert report["methods"]["full"]["ms_ssim_frames"] == 1.0 and report["methods"]["full"]["lpips_frames"] == 0.0

    # The paired test, one pair per video: automatic within a ratio, and with --compare across ratios.
    paired = {(c["a"], c["b"], c["metric"]): c for c in report["paired"]}
    for a, b in (("tofu@0.5", "tome@0.5"), ("tofu@0.5", "tome@0.75")):
        for key in ("ms_ssim_frames", "lpips_frames"):
            expected = paired_difference(report["per_pair"][a][key], report["per_pair"][b][key])
            assert paired[(a, b, key)]["n"] == VIDEOS
            assert paired[(a, b, key)]["mean_diff"] == pytest.approx(expected["mean_diff"])
    md = (run / "report.md").read_text()
    assert f"## Whole videos, frame by frame ({FRAMES} frames per video)" in md
    row = f"| tofu@0.5 | {tofu['lpips_frames']:.4f} ± {tofu['lpips_frames_std']:.4f} | " \
          f"{tofu['ms_ssim_frames']:.4f} ± {tofu['ms_ssim_frames_std']:.4f} | {tofu['lpips']:.4f} ± "  # fmt: skip
    assert row in md and "FID over all frames is not computed" in md
    assert "| tofu@0.5 − tome@0.75 | MS-SSIM (all frames) | 2 |" in md and "one pair per video" in md


def test_identical_videos_and_a_video_altered_outside_its_middle_frame(run, empty_torch_home):
    assert main(["evaluate", str(run), "--methods", "tome@0.5,todo@0.5"]) == 0
    report = report_of(run)
    same, first_only = report["methods"]["tome@0.5"], report["methods"]["todo@0.5"]
    assert same["ms_ssim_frames"] == pytest.approx(1.0, abs=1e-9) and same["ms_ssim"] == pytest.approx(1.0, abs=1e-9)
    # Only frame 0 differs: its middle frame says "identical", its frames do not, by exactly frame 0's share.
    assert first_only["ms_ssim"] == pytest.approx(1.0, abs=1e-9)
    first = PairwiseMSSSIM()
    for name in NAMES:
        first.update(load_image(frame_file(run, "todo@0.5", name, 0))[None], load_image(frame_file(run, "full", name, 0))[None])
    expected = [(s + (FRAMES - 1)) / FRAMES for s in first.per_pair()]
    assert max(expected) < 0.99
    assert report["per_pair"]["todo@0.5"]["ms_ssim_frames"] == pytest.approx(expected, rel=1e-6)
    # Without LPIPS weights: no LPIPS score, for the frames as for the middle frame.
    assert first_only["lpips_frames"] is None and first_only["lpips"] is None
    assert "lpips_frames" not in report["per_pair"]["todo@0.5"] and "lpips" in report["unavailable"]


def test_identical_videos_have_lpips_zero(run, lpips_home):
    assert main(["evaluate", str(run), "--methods", "tome@0.5"]) == 0
    same = report_of(run)["methods"]["tome@0.5"]
    assert same["lpips_frames"] == pytest.approx(0.0, abs=1e-6) and same["lpips_frames_std"] == pytest.approx(0.0, abs=1e-6)


def _drop_last(run):
    frame_file(run, "tofu@0.5", NAMES[1], FRAMES - 1).unlink()


def _no_folder(run):
    shutil.rmtree(frame_file(run, "tome@0.75", NAMES[0], 0).parent)


def _gap(run):
    frame_file(run, "todo@0.5", NAMES[0], 1).rename(frame_file(run, "todo@0.5", NAMES[0], 7))


def _reference_short(run):
    frame_file(run, "full", NAMES[0], FRAMES - 1).unlink()


@pytest.mark.parametrize("damage, message", [
    (_drop_last, f"tofu@0.5's video 0000_1 has {FRAMES - 1} frame(s) but full's has {FRAMES}"),
    (_no_folder, f"tome@0.75's video 0000_0 has 0 frame(s) but full's has {FRAMES}"),
    (_gap, "holds 5 frame(s) but not frames 000.png to 004.png (unexpected: 007.png)"),
    (_reference_short, f"tofu@0.5's video 0000_0 has {FRAMES} frame(s) but full's has {FRAMES - 1}"),
])  # fmt: skip
def test_a_frame_count_mismatch_is_refused_before_anything_is_written(run, capsys, monkeypatch, damage, message):
    import evaluation.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "_load_models", lambda *a, **k: pytest.fail("metrics loaded before the frames were checked"))
    damage(run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and "re-run `tofu-sd generate`" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before and not (run / "report.json").exists()


#: The keys of an image run's report, as before frame scores existed.
IMAGE_ENTRY = {"fid", "lpips", "lpips_std", "ms_ssim", "ms_ssim_std", "prompt_accuracy", "fd_classifier",
               "sec_per_image", "peak_mem_gb", "n_images"}  # fmt: skip


def test_an_image_run_has_no_frame_scores(run, lpips_home):
    for method in ("full", "tofu@0.5", "tome@0.5", "todo@0.5", "tome@0.75"):  # the same images, without frames
        shutil.rmtree(run / method / "frames")
    assert main(["evaluate", str(run), "--compare", "tofu@0.5:tome@0.75"]) == 0
    report = report_of(run)
    assert all(set(entry) == IMAGE_ENTRY for entry in report["methods"].values())
    assert all(set(scores) <= {"ms_ssim", "lpips"} for scores in report["per_pair"].values())
    assert {c["metric"] for c in report["paired"]} == {"ms_ssim", "lpips"}
    assert "frames_per_video" not in report["config"]
    md = (run / "report.md").read_text()
    assert "all frames" not in md and "Whole videos" not in md and "MS-SSIM (all frames)" not in md


def test_a_tiny_wan_run_end_to_end(tmp_path, lpips_home, one_thread):
    """`tofu-sd generate` of a tiny random Wan pipeline (5 frames), then `evaluate`: frame scores of the saved frames."""
    from evaluation.tiny_pipelines import PIPELINES

    PIPELINES["Wan"]().save_pretrained(tmp_path / "wan")
    run = tmp_path / "run"
    assert main(["generate", "--model", str(tmp_path / "wan"), "--out", str(run), "--methods", "full,tofu",
                 "--classes", "0-1", "--per-class", "1", "--steps", "2", "--height", "32", "--width", "32",
                 "--device", "cpu", "--no-warmup", "--quiet", "--frames", str(FRAMES)]) == 0  # fmt: skip
    assert main(["evaluate", str(run)]) == 0
    report = report_of(run)
    assert report["config"]["frames_per_video"] == [FRAMES]
    expected = loop_scores(run, "tofu", load_lpips(), names=["0000_0.png", "0001_0.png"])
    for key in ("ms_ssim_frames", "lpips_frames"):
        assert report["per_pair"]["tofu"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7)
    assert report["methods"]["tofu"]["ms_ssim_frames"] < 1.0  # the tiny model's tofu video differs from full's
