"""Ratio sweeps (`--ratios`, `<method>@<ratio>` names), the ToDo and CA-ToMe peers, and the report's Pareto plot."""

import json
import math
import shutil
import sys

import pytest
import torch
from PIL import Image

from evaluation import generate as generate_module
from evaluation.cli import main
from evaluation.errors import EvaluationError
from evaluation.methods import method_applied, method_params, parse_methods, ratios_of, todo
from evaluation.pareto import PANEL_CHARS, pareto_data, pareto_figure
from evaluation.report import write_report
from evaluation.tiny_random import tiny_unet, tiny_unet_inputs
from tofu_sd import TokenFusionConfig

BASE = ["generate", "--model", "tiny-random", "--classes", "0", "--per-class", "1", "--steps", "2", "--quiet"]
SWEEP = [*BASE, "--methods", "full,tofu,todo", "--ratios", "0.3,0.5"]


# --- names -------------------------------------------------------------------------------------------------------


def test_sweep_names():
    assert parse_methods("full,tome,tofu") == ["full", "tome", "tofu"]  # without --ratios: as before
    assert parse_methods("full,tome,tofu,todo,catome", [0.3, 0.5, 0.7]) == [
        "full", "tome@0.3", "tome@0.5", "tome@0.7", "tofu@0.3", "tofu@0.5", "tofu@0.7",
        "todo@0.5", "todo@0.75",  # 0.3 and 0.5 -> 1x2 pooling (half the keys), 0.7 -> 2x2 (three quarters)
        "catome",  # its parameter is a similarity threshold: one point
    ]  # fmt: skip
    # Ratios are sorted, todo skips a ratio nearer to no pooling at all; names are normalised.
    assert parse_methods("tofu,todo", ratios_of("0.9,0.1"), TokenFusionConfig(sx=4, sy=4)) == ["tofu@0.1", "tofu@0.9", "todo@0.875"]
    assert parse_methods("full,tofu@.50,todo@0.5") == ["full", "tofu@0.5", "todo@0.5"]
    assert ratios_of(" 0.7, 0.3 ") == [0.3, 0.7]


@pytest.mark.parametrize(
    "methods,ratios,match",
    [
        ("full@0.5", None, "full takes no ratio"),
        ("catome@0.5", None, "catome takes no ratio.*threshold"),
        ("todo@0.6", None, r"todo@0.5 \(1x2\), todo@0.75 \(2x2\)"),
        ("tofu@1.5", None, r"ratio after '@' must lie in \(0, 1\)"),
        ("tofu@half", None, "write <method>@<ratio>"),
        ("tofu", [0.8], "tofu@0.8.*removes more tokens than 2x2 cells allow"),
        ("fast", None, "unknown method.*fast"),
        ("tofu,tofu@0.5", [0.5], None),  # same name twice after expansion: one folder
    ],
)
def test_bad_names(methods, ratios, match):
    if match is None:
        assert parse_methods(methods, ratios) == ["tofu@0.5"]
        return
    with pytest.raises(EvaluationError, match=match):
        parse_methods(methods, ratios)


@pytest.mark.parametrize(
    "text,match", [("0.3,x", "comma-separated fractions"), ("0.3,1", r"must lie in \(0, 1\); got 1"), ("0.3,.30", "twice"), (",", "no ratio")]
)
def test_bad_ratios(text, match):
    with pytest.raises(EvaluationError, match=match):
        ratios_of(text)


def test_ratio_and_ratios_together_are_refused(tmp_path, capsys):
    assert main([*SWEEP, "--ratio", "0.4", "--out", str(tmp_path / "x")]) == 2
    assert "give --ratio" in capsys.readouterr().err and not (tmp_path / "x").exists()


# --- sweeps end to end --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    assert main([*SWEEP, "--out", str(out)]) == 0
    return out


@pytest.fixture
def sweep_copy(sweep_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(sweep_run, out)
    return out


def test_sweep_folders_manifest_and_images(sweep_run, tmp_path):
    names = ["full", "tofu@0.3", "tofu@0.5", "todo@0.5"]
    assert sorted(p.name for p in sweep_run.iterdir() if p.is_dir()) == sorted(names)
    manifest = json.loads((sweep_run / "manifest.json").read_text())
    assert list(manifest["methods"]) == names
    params = {name: manifest["methods"][name]["params"] for name in names}
    assert params == {
        "full": {"method": "full", "keys_removed": 0.0},
        "tofu@0.3": {"method": "tofu", "ratio": 0.3, "keys_removed": 0.3},
        "tofu@0.5": {"method": "tofu", "ratio": 0.5, "keys_removed": 0.5},
        "todo@0.5": {"method": "todo", "ratio": 0.5, "pool": [1, 2], "keys_removed": 0.5},
    }
    with Image.open(sweep_run / "tofu@0.3" / "0000_0.png") as image:
        assert image.text["method"] == "tofu@0.3"
    # A sweep's tofu@0.3 is exactly a one-ratio run of tofu at --ratio 0.3.
    single = tmp_path / "single"
    assert main([*BASE, "--methods", "tofu", "--ratio", "0.3", "--out", str(single)]) == 0
    pixels = lambda path: Image.open(path).tobytes()  # noqa: E731
    assert pixels(sweep_run / "tofu@0.3" / "0000_0.png") == pixels(single / "tofu" / "0000_0.png")
    assert pixels(sweep_run / "tofu@0.3" / "0000_0.png") != pixels(sweep_run / "tofu@0.5" / "0000_0.png")
    assert pixels(sweep_run / "todo@0.5" / "0000_0.png") != pixels(sweep_run / "full" / "0000_0.png")


def _count_saves(monkeypatch):
    saved = []
    real = generate_module.save_png_atomic

    def save(image, path, text):
        saved.append(f"{path.parent.name}/{path.name}")
        real(image, path, text)

    monkeypatch.setattr(generate_module, "save_png_atomic", save)
    return saved


def test_sweep_resumes_and_grows_by_more_ratios(sweep_copy, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in sweep_copy.rglob("*.png")}
    saved = _count_saves(monkeypatch)
    assert main([*SWEEP, "--out", str(sweep_copy)]) == 0
    assert saved == []
    assert main([*BASE, "--methods", "full,tofu,todo", "--ratios", "0.3,0.5,0.7", "--out", str(sweep_copy)]) == 0
    assert sorted(saved) == ["todo@0.75/0000_0.png", "tofu@0.7/0000_0.png"]  # only the new ratio's images
    assert before == {p: p.stat().st_mtime_ns for p in before}
    manifest = json.loads((sweep_copy / "manifest.json").read_text())
    assert list(manifest["methods"]) == ["full", "tofu@0.3", "tofu@0.5", "todo@0.5", "tofu@0.7", "todo@0.75"]
    # A one-ratio run in the same directory adds plain names beside the sweep's.
    assert main([*BASE, "--methods", "tome", "--out", str(sweep_copy)]) == 0
    assert (sweep_copy / "tome" / "0000_0.png").exists()


def test_sweep_refuses_other_image_options(sweep_copy, capsys):
    assert main([*SWEEP, "--steps", "3", "--out", str(sweep_copy)]) == 2
    assert "steps: run has 2, this call asks 3" in capsys.readouterr().err
    assert main([*SWEEP, "--no-rand", "--out", str(sweep_copy)]) == 2
    assert "'use_rand': True" in capsys.readouterr().err
    # A folder is bound to its own parameters too: one made otherwise is not added to.
    manifest = json.loads((sweep_copy / "manifest.json").read_text())
    manifest["methods"]["todo@0.5"]["params"]["pool"] = [2, 1]
    (sweep_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main([*SWEEP, "--out", str(sweep_copy)]) == 2
    err = capsys.readouterr().err
    assert "todo@0.5 was generated with" in err and "'pool': [2, 1]" in err and "'pool': [1, 2]" in err


def test_evaluate_a_sweep_writes_pareto(sweep_copy, empty_torch_home):
    assert main(["evaluate", str(sweep_copy)]) == 0
    report = json.loads((sweep_copy / "report.json").read_text())
    assert report["config"]["method_params"]["todo@0.5"]["pool"] == [1, 2]
    pareto = report["pareto"]
    assert pareto["metrics"] == ["ms_ssim"]  # offline: no FID / LPIPS weights; ImageNet prompts: no accuracy
    assert {f: [p["name"] for p in points] for f, points in pareto["series"].items()} == {
        "full": ["full"], "tofu": ["tofu@0.3", "tofu@0.5"], "todo": ["todo@0.5"],
    }  # fmt: skip
    for points in pareto["series"].values():
        for p in points:
            assert p["ms_ssim"] == report["methods"][p["name"]]["ms_ssim"]
            assert p["sec_per_image"] == report["methods"][p["name"]]["sec_per_image"] > 0
    with Image.open(sweep_copy / "pareto.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
    md = (sweep_copy / "report.md").read_text()
    assert "| tofu@0.3 |" in md and "![" in md and "(pareto.png)" in md


# --- ToDo ---------------------------------------------------------------------------------------------------------


def _pool_by_loops(x: torch.Tensor, h: int, w: int, ky: int, kx: int) -> torch.Tensor:
    """Mean of each ky x kx window of the row-major h x w token grid (windows over the edge: what they cover)."""
    rows = []
    for i in range(0, h, ky):
        for j in range(0, w, kx):
            idx = [a * w + b for a in range(i, min(i + ky, h)) for b in range(j, min(j + kx, w))]
            rows.append(x[:, idx].mean(dim=1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("grid,pool", [((4, 6), (2, 2)), ((5, 7), (2, 2)), ((5, 7), (1, 2)), ((6, 5), (4, 4))])
def test_pool_tokens_matches_window_means(grid, pool):
    x = torch.randn(2, grid[0] * grid[1], 3, generator=torch.Generator().manual_seed(0))
    pooled = todo.pool_tokens(x, grid, pool)
    assert pooled.shape[1] == todo.pooled_key_count(grid, pool) == math.ceil(grid[0] / pool[0]) * math.ceil(grid[1] / pool[1])
    torch.testing.assert_close(pooled, _pool_by_loops(x, *grid, *pool))


def _direct_self_attention(attn, x: torch.Tensor, keys_from: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head with the module's own projections; K, V from ``keys_from``."""
    b, n, _ = x.shape
    heads = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(keys_from), attn.to_v(keys_from)
    d = q.shape[-1] // heads
    split = lambda t: t.view(b, t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    weights = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)).softmax(dim=-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(b, n, heads * d)
    return attn.to_out[0](out)


@pytest.mark.parametrize("pool,size", [((2, 2), (16, 16)), ((1, 2), (16, 16)), ((4, 4), (10, 14))])
def test_todo_attention_equals_direct_computation(pool, size):
    """Every patched attn1 returns softmax(Q K_p^T / sqrt(d)) V_p for all its queries; nothing else changes."""
    unet = tiny_unet("sd15")
    inputs = tiny_unet_inputs(unet, height=size[0], width=size[1])
    seen = {}

    def record(name):
        def hook(module, args, kwargs, output):
            seen.setdefault(name, []).append((args[0] if args else kwargs["hidden_states"], output))

        return hook

    handles = [
        module.register_forward_hook(record(name), with_kwargs=True)
        for name, module in unet.named_modules()
        if name.endswith(("attn1", "attn2"))
    ]
    with torch.no_grad():
        reference = unet(**inputs).sample
        seen.clear()
        names = todo.apply_todo(unet, pool)
        out = unet(**inputs).sample
        patched = {f"{n}.attn1" for n in names}
        assert patched == {n for n in seen if n.endswith("attn1") and n.startswith(("down_blocks.0.", "up_blocks.2."))}
        for name, calls in seen.items():
            (x, output), = calls
            module = unet.get_submodule(name)
            if name in patched:
                grid = size  # the highest resolution: the latent grid itself
                keys = _pool_by_loops(x, *grid, *pool)
                assert output.shape == x.shape  # every query stays
                torch.testing.assert_close(output, _direct_self_attention(module, x, keys), rtol=1e-4, atol=1e-5)
            elif name.endswith("attn1"):  # blocks at lower resolution: full self-attention
                torch.testing.assert_close(output, _direct_self_attention(module, x, x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out, reference)
        for h in handles:
            h.remove()
        assert todo.remove_todo(unet)
        assert torch.equal(unet(**inputs).sample, reference)
        assert not any(hasattr(m, "_diffusers_hook") for m in unet.modules())


def test_todo_in_the_pipeline_and_removed(tiny_pipe_factory):
    pipe = tiny_pipe_factory()
    call = lambda: pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images  # noqa: E731
    full = call()
    key_counts = []
    to_k = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k
    handle = to_k.register_forward_hook(lambda m, a, o: key_counts.append(a[0].shape[1]))
    with method_applied(pipe, "todo@0.5", TokenFusionConfig()):
        pooled = call()
    handle.remove()
    assert set(key_counts) == {32 * 32 // 2}  # 1x2 pooling on the 32x32 latent grid: half the keys
    assert not torch.equal(pooled, full)
    assert torch.equal(call(), full)
    assert method_params("todo", TokenFusionConfig())["pool"] == [2, 2]


# --- CA-ToMe ------------------------------------------------------------------------------------------------------


def test_catome_missing_package_says_how_to_install(tiny_pipe_factory, monkeypatch):
    monkeypatch.setitem(sys.modules, "ca_tome", None)  # import fails as if not installed
    with pytest.raises(EvaluationError, match=r"pip install --no-deps ca-tome==0.1.3.*torch<2.2.2"):
        with method_applied(tiny_pipe_factory(), "catome", TokenFusionConfig()):
            pass


def test_catome_runs_restores_and_keeps_no_matching_between_calls(tiny_pipe_factory):
    pytest.importorskip("ca_tome")
    pipe = tiny_pipe_factory()

    def call(prompt):
        return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images

    full_a, full_b = call("a red circle"), call("a blue square")
    options = TokenFusionConfig(use_rand=False)  # the partition then depends on the tokens alone
    with method_applied(pipe, "catome", options):
        only_b = call("a blue square")
    with method_applied(pipe, "catome", options):
        call("a red circle")
        after_a = call("a blue square")
    assert not torch.allclose(only_b, full_b)  # it reduces
    # Each pipeline call matches its own tokens at its first step (the package alone reuses the last call's).
    assert torch.equal(after_a, only_b)
    assert torch.equal(call("a red circle"), full_a)  # removed: the plain pipeline works and is unchanged
    assert not any("_cache_info" in m.__dict__ or "inference_step" in m.__dict__ for m in pipe.unet.modules())


# --- the Pareto plot ----------------------------------------------------------------------------------------------


def _small_report():
    row = lambda fid, lpips, ms, acc, sec: {  # noqa: E731
        "fid": fid, "lpips": lpips, "lpips_std": 0.0, "ms_ssim": ms, "ms_ssim_std": 0.0, "prompt_accuracy": acc,
        "sec_per_image": sec, "peak_mem_gb": 1.0, "n_images": 1,
    }  # fmt: skip
    methods = {
        "full": row(0.0, 0.0, 1.0, 0.9, 2.0),
        "tofu@0.7": row(9.0, 0.3, 0.7, 0.6, 1.2),
        "tofu@0.3": row(3.0, 0.1, 0.9, 0.8, 1.7),
        "todo@0.75": row(5.0, 0.2, 0.8, 0.7, 1.4),
        "catome": row(4.0, 0.15, 0.85, 0.75, 1.5),
    }
    params = {name: method_params(name, TokenFusionConfig()) for name in methods}
    config = {"reference": "full", "model": "tiny-random", "steps": 2, "device": "cpu", "reduction": {"ratio": 0.5},
              "method_params": params, "prompts": "imagenet"}  # fmt: skip
    return {"methods": methods, "config": config, "unavailable": {}, "names": ["0000_0.png"]}


def test_pareto_data_and_plot_from_a_small_report(tmp_path):
    report = _small_report()
    report["methods"]["tofu@0.3"]["fid"] = None  # one missing value leaves that point out of its panel
    report["unavailable"] = {"prompt_accuracy": "not for these prompts"}
    pareto = pareto_data(report)
    assert pareto["metrics"] == ["fid", "lpips", "ms_ssim"]
    assert [p["name"] for p in pareto["series"]["tofu"]] == ["tofu@0.3", "tofu@0.7"]  # by ratio
    assert [p["label"] for p in pareto["series"]["tofu"]] == ["0.3", "0.7"] and pareto["series"]["catome"][0]["label"] == "T=0.7"
    assert pareto["series"]["todo"] == [{"name": "todo@0.75", "ratio": 0.75, "label": "0.75", "keys_removed": 0.75,
                                         "sec_per_image": 1.4, "fid": 5.0, "lpips": 0.2, "ms_ssim": 0.8,
                                         "prompt_accuracy": 0.7}]  # fmt: skip
    figure = pareto_figure(pareto)
    panels = {ax.get_ylabel().split(" vs ")[0]: ax for ax in figure.axes}
    assert set(panels) == {"FID", "LPIPS", "MS-SSIM"}
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in panels["MS-SSIM"].lines}
    assert lines == {"full": ([2.0], [1.0]), "tofu": ([1.7, 1.2], [0.9, 0.7]), "todo": ([1.4], [0.8]), "catome": ([1.5], [0.85])}
    fid_lines = {line.get_label(): list(line.get_xdata()) for line in panels["FID"].lines}
    assert fid_lines["tofu"] == [1.2]

    # write_report writes it (with report.json's numbers and the link in report.md) into the run directory.
    for name in report["methods"]:
        (tmp_path / name).mkdir()
        Image.new("RGB", (16, 16), "gray").save(tmp_path / name / "0000_0.png")
    report["pareto"] = pareto
    paths = write_report(tmp_path, report)
    assert tmp_path / "pareto.png" in paths and not list(tmp_path.glob(".*.tmp"))
    with Image.open(tmp_path / "pareto.png") as image:
        assert image.format == "PNG" and image.size[0] > 3 * image.size[1] / 2  # three panels side by side
    assert json.loads((tmp_path / "report.json").read_text())["pareto"]["series"]["tofu"][1]["ms_ssim"] == 0.7
    assert "(pareto.png)" in (tmp_path / "report.md").read_text()


def test_every_method_family_of_a_crowded_plot_looks_different():
    """More families than matplotlib's ten default colours (the DiT front has 13): each keeps its own colour and
    marker pair, the same in every panel, so no two lines can be taken for one another."""
    families = [f"m{k}" for k in range(13)]
    series = {"full": [{"name": "full", "label": None, "sec_per_image": 2.0, "ms_ssim": 1.0, "prompt_accuracy": 1.0}]}
    for k, family in enumerate(families):
        series[family] = [{"name": f"{family}@0.5", "label": "0.5", "sec_per_image": 1.0 + k / 20, "ms_ssim": 0.9,
                           "prompt_accuracy": 0.9}]  # fmt: skip
    figure = pareto_figure({"metrics": ["ms_ssim", "prompt_accuracy"], "series": series, "reference": "full"})
    looks = [{line.get_label(): (line.get_color(), line.get_marker()) for line in ax.lines if line.get_label() in families}
             for ax in figure.axes]  # fmt: skip
    assert len(looks[0]) == 13 and len(set(looks[0].values())) == 13
    assert looks[0] == looks[1]
    # one legend beside the panels, each family once; none inside a panel, over its points
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["full", *families] and len(figure.legends) == 1
    assert all(ax.get_legend() is None for ax in figure.axes)


def test_long_panel_titles_wrap():
    """A cost row's title holds the bench's description; at three panels per row, one line each would overlap."""
    row = {"x": "sec_per_image", "size": None, "title": "x " * 80, "xlabel": "compute relative to full " * 5}
    series = {"full": [{"name": "full", "label": None, "sec_per_image": 2.0, "ms_ssim": 1.0}],
              "tofu": [{"name": "tofu@0.5", "label": "0.5", "sec_per_image": 1.0, "ms_ssim": 0.9}]}  # fmt: skip
    figure = pareto_figure({"metrics": ["ms_ssim"], "series": series, "reference": "full", "rows": [row]})
    ax = figure.axes[0]
    for text in (ax.get_title(), ax.get_xlabel()):
        assert "\n" in text and max(len(line) for line in text.splitlines()) <= PANEL_CHARS
