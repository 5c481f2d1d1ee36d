"""A lost manifest.json: the errors say how to keep the images, and ``generate --adopt`` rebuilds it from the
images' metadata, checked against the call (issue 15, 9)."""

import json
import shutil

import pytest

from evaluation.cli import main

BASE = ["generate", "--model", "tiny-random", "--methods", "full,tofu", "--classes", "0-1", "--per-class", "1",
        "--steps", "1", "--batch-size", "2", "--no-warmup", "--quiet"]  # fmt: skip


def pngs(out) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(out.glob("*/*.png"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("adopt") / "run"
    assert main([*BASE, "--classes", "0-2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def lost(finished, tmp_path):
    """The finished run without class 2 and without its manifest."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "manifest.json").unlink()
    for image in out.glob("*/0002_*.png"):
        image.unlink()
    return out


def test_a_lost_manifest_says_how_to_keep_the_images(lost, capsys):
    before = pngs(lost)
    assert main([*BASE, "--out", str(lost)]) == 2
    err = capsys.readouterr().err
    assert "holds 4 images but no manifest.json" in err and "re-run this command with --adopt" in err
    assert main(["evaluate", str(lost)]) == 2
    err = capsys.readouterr().err
    assert f"run `tofu-sd generate --adopt --out {lost}` with the options the images were made with" in err
    assert pngs(lost) == before and not (lost / "manifest.json").exists()


def test_adopt_rebuilds_the_manifest_and_the_run_goes_on(lost, finished, capsys, empty_torch_home):
    kept = {p: p.stat().st_mtime_ns for p in lost.glob("*/*.png")}
    data = (lost / "tofu" / "0001_0.png").read_bytes()
    (lost / "tofu" / "0001_0.png").write_bytes(data[:-100])  # damaged: not adopted, made again
    assert main([*BASE, "--classes", "0-2", "--adopt", "--out", str(lost)]) == 0
    err = capsys.readouterr().err
    assert "adopting 3 image(s) (full: 2, tofu: 1) into a new manifest.json" in err and "unverified: steps, guidance_scale" in err
    assert "1 damaged image(s) will be re-made: tofu/0001_0.png" in err
    assert pngs(lost) == pngs(finished)  # class 2 and the damaged image made, byte for byte as the first time
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items() if p.name != "0001_0.png" or p.parent.name != "tofu")
    manifest = json.loads((lost / "manifest.json").read_text())
    first = json.loads((finished / "manifest.json").read_text())
    assert manifest["config"] == first["config"] and manifest["classes"] == [0, 1, 2]
    assert manifest["adopted"]["images"] == {"full": 2, "tofu": 1} and "steps" in manifest["adopted"]["unverified"]
    assert {m: manifest["methods"][m]["params"] for m in ("full", "tofu")} == {
        m: first["methods"][m]["params"] for m in ("full", "tofu")
    }
    assert [s["status"] for s in manifest["sessions"]] == ["complete"]
    assert main(["evaluate", str(lost)]) == 0


@pytest.mark.parametrize(
    "args,match",
    [
        (["--seed", "1"], r"full/0000_0.png: seed '0' \(this call: '1000000'\)"),
        (["--prompts", "shapes"], r"prompt_set 'imagenet' \(this call: 'shapes'\)"),
        (["--methods", "full"], "tofu hold.* images, but this call's --methods does not name it"),
        (["--height", "56"], "the images are 64x64, but this call asks --height 56"),
    ],
)
def test_adopt_refuses_images_that_disagree_with_the_call(lost, capsys, args, match):
    import re

    assert main([*BASE, "--adopt", *args, "--out", str(lost)]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (lost / "manifest.json").exists()


def test_adopt_refuses_an_image_in_the_folder_of_another_method(lost, capsys):
    shutil.copy(lost / "tofu" / "0000_0.png", lost / "full" / "0000_0.png")
    assert main([*BASE, "--adopt", "--out", str(lost)]) == 2
    assert "full/0000_0.png: method 'tofu' (this call: 'full')" in capsys.readouterr().err
    assert not (lost / "manifest.json").exists()
