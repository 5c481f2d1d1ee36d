"""Resuming a run: the size a call leaves out is the run's, and a damaged image is made again (issue 15, 5-6)."""

import json
import shutil

import pytest
from PIL import Image

from evaluation.cli import main

# One batch of 2 images per method, 1 step, no warm-up: a call takes seconds.
BASE = ["generate", "--model", "tiny-random", "--methods", "full,tofu", "--classes", "0-1", "--per-class", "1",
        "--steps", "1", "--batch-size", "2", "--no-warmup", "--quiet"]  # fmt: skip
IMAGES = ["full/0000_0.png", "full/0001_0.png", "tofu/0000_0.png", "tofu/0001_0.png"]


def pngs(out) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(out.glob("*/*.png"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main([*BASE, "--out", str(out)]) == 0
    assert sorted(pngs(out)) == IMAGES
    return out


def test_a_resumed_call_without_a_size_keeps_the_runs_size(tmp_path, capsys, empty_torch_home):
    out = tmp_path / "run"
    assert main([*BASE, "--height", "56", "--out", str(out)]) == 0
    assert main([*BASE, "--classes", "0-2", "--out", str(out)]) == 0  # grown, no --height: the run's 56
    sizes = {name: Image.open(out / name).size for name in pngs(out)}
    assert len(sizes) == 6 and set(sizes.values()) == {(64, 56)}
    assert json.loads((out / "manifest.json").read_text())["config"]["height"] == 56
    # Only an explicit different value is refused.
    assert main([*BASE, "--height", "64", "--out", str(out)]) == 2
    assert "height: run has 56, this call asks 64" in capsys.readouterr().err
    assert main(["evaluate", str(out)]) == 0  # one size: evaluate pairs every image


def test_damaged_images_are_made_again_and_named(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    whole = (out / "tofu/0001_0.png").stat().st_mtime_ns
    data = (out / "full/0000_0.png").read_bytes()
    (out / "full/0000_0.png").write_bytes(data[: len(data) // 2])  # cut in half (a crash, a full disk)
    data = bytearray((out / "tofu/0000_0.png").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of the image data flipped
    (out / "tofu/0000_0.png").write_bytes(bytes(data))
    Image.new("RGB", (32, 32)).save(out / "full/0001_0.png")  # whole, but not the run's size
    assert main([*BASE, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "re-making 3 damaged image(s)" in err
    assert "full/0000_0.png (unreadable" in err and "tofu/0000_0.png (unreadable" in err
    assert "full/0001_0.png (32x32, the run's images are 64x64)" in err
    assert pngs(out) == pngs(finished)  # byte for byte what the uninterrupted run made
    assert (out / "tofu/0001_0.png").stat().st_mtime_ns == whole  # the whole image was left alone


def test_the_image_check_finds_every_kind_of_damage(finished, tmp_path):
    from evaluation.images import image_problem, read_png

    good = (finished / "full/0000_0.png").read_bytes()
    assert read_png(finished / "full/0000_0.png") == ((64, 64), Image.open(finished / "full/0000_0.png").text)
    flipped = bytearray(good)
    flipped[-20] ^= 0x01  # inside the last image-data chunk
    cases = {"half": good[: len(good) // 2], "iend-cut": good[:-1], "no-iend": good[:-12], "flipped": bytes(flipped),
             "empty": b"", "zeros": bytes(len(good)), "other": b"GIF89a" + good[6:]}  # fmt: skip
    for name, data in cases.items():
        (tmp_path / f"{name}.png").write_bytes(data)
        assert image_problem(tmp_path / f"{name}.png", (64, 64)).startswith("unreadable"), name
    assert image_problem(finished / "full/0000_0.png", (64, 64)) is None
    assert image_problem(finished / "full/0000_0.png", (64, 56)) == "64x64, the run's images are 64x56"
    assert image_problem(tmp_path / "absent.png", (64, 64)) == "missing"


def test_a_run_made_before_a_reduction_option_existed_resumes(finished, tmp_path, monkeypatch):
    from evaluation import generate as generate_module

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["reduction"]["local_window"]  # as a run made before local matching existed records it
    (out / "manifest.json").write_text(json.dumps(manifest))
    saved = []
    monkeypatch.setattr(generate_module, "save_png_atomic", lambda *a, **k: saved.append(a))
    assert main([*BASE, "--out", str(out)]) == 0 and saved == []
    assert main([*BASE, "--sx", "4", "--out", str(out)]) == 2  # an option the run records is still bound
