"""A full disk while generating (issue 15, 7), simulated: the write that finds no space writes part of its
temporary file and fails with ENOSPC, at a PNG or at the manifest."""

import errno
import json
import pathlib

import pytest
from PIL import Image

from evaluation.cli import main

BASE = ["generate", "--model", "tiny-random", "--methods", "full,tofu", "--classes", "0-1", "--per-class", "1",
        "--steps", "1", "--no-warmup", "--quiet"]  # fmt: skip
IMAGES = ["full/0000_0.png", "full/0001_0.png", "tofu/0000_0.png", "tofu/0001_0.png"]


def pngs(out) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(out.glob("*/*.png"))}


def leftovers(out) -> list:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main([*BASE, "--batch-size", "1", "--out", str(out)]) == 0
    return out


class FullDisk:
    """Makes PNG saves (from the ``png``-th on) and manifest writes (from the ``manifest``-th on) fail as a full
    disk does: part of the temporary file is written, then ENOSPC."""

    def __init__(self, monkeypatch, png=None, manifest=None):
        self.png, self.manifest, self.pngs, self.manifests = png, manifest, 0, 0
        real_save, real_write = Image.Image.save, pathlib.Path.write_text

        def save(image, fp, format=None, **params):
            self.pngs += 1
            if self.png is not None and self.pngs >= self.png:
                pathlib.Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n part")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(image, fp, format, **params)

        def write_text(path, text, *args, **kwargs):
            if path.name == ".manifest.json.tmp":
                self.manifests += 1
                if self.manifest is not None and self.manifests >= self.manifest:
                    real_write(path, text[:20], *args, **kwargs)
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(path, text, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "save", save)
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def one_clear_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("tofu-sd generate: error: disk full: no space left")
    assert "Free some space, then re-run the same command" in lines[0]
    return lines[0]


def resumes(out, reference, monkeypatch) -> list:
    monkeypatch.undo()  # space is free again
    assert main([*BASE, "--batch-size", "1", "--out", str(out)]) == 0
    assert pngs(out) == pngs(reference) and not leftovers(out)
    return [s["status"] for s in json.loads((out / "manifest.json").read_text())["sessions"]]


def test_full_disk_at_an_image(tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    FullDisk(monkeypatch, png=2)  # batch 1 (class 0): full saved, tofu's save finds the disk full
    assert main([*BASE, "--batch-size", "1", "--out", str(out)]) == 2
    line = one_clear_line(capsys.readouterr().err)
    assert "to write " + str(out / "tofu" / "0000_0.png") in line
    assert f"Kept: 1 finished image(s) and {out / 'manifest.json'} as last written" in line
    assert sorted(pngs(out)) == ["full/0000_0.png"] and not leftovers(out)
    [session] = json.loads((out / "manifest.json").read_text())["sessions"]
    assert session["status"] == "failed"  # the manifest write of the failure path had room
    assert resumes(out, reference, monkeypatch) == ["failed", "complete"]


def test_full_disk_at_an_image_and_at_the_manifest_of_the_failure_path(tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    FullDisk(monkeypatch, png=2, manifest=2)  # the first manifest (the session starts) fits, no later one
    assert main([*BASE, "--batch-size", "1", "--out", str(out)]) == 2
    one_clear_line(capsys.readouterr().err)
    assert sorted(pngs(out)) == ["full/0000_0.png"] and not leftovers(out)
    manifest = json.loads((out / "manifest.json").read_text())  # the last good one: as the session started
    assert [s["status"] for s in manifest["sessions"]] == ["running"]
    assert resumes(out, reference, monkeypatch) == ["failed", "complete"]


def test_full_disk_at_the_manifest_stops_the_run(tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    FullDisk(monkeypatch, manifest=2)  # after the first round (class 0) the manifest cannot be written
    assert main([*BASE, "--batch-size", "1", "--out", str(out)]) == 2
    line = one_clear_line(capsys.readouterr().err)
    assert "to write " + str(out / "manifest.json") in line and "Kept: 2 finished image(s)" in line
    assert sorted(pngs(out)) == ["full/0000_0.png", "tofu/0000_0.png"]  # the second round never started
    assert not leftovers(out)
    assert [s["status"] for s in json.loads((out / "manifest.json").read_text())["sessions"]] == ["running"]
    assert resumes(out, reference, monkeypatch) == ["failed", "complete"]
