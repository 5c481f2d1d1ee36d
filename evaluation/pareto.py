"""The speed-quality trade-off of a report: each method's fidelity against a cost, as data and as ``pareto.png``.

The cost is one of two:

- ``sec_per_image`` (the default): seconds per image measured while the run was generated. On the built-in
  model these are fixed overheads (text encoder, VAE, scheduler, Python), not the speed-up of token reduction.
- ``bench`` (``tofu-sd evaluate --cost BENCH.json``): the U-Net step time that ``tofu-sd bench`` measured for the
  run's method names, relative to ``full`` in the same bench run: the median over the bench's interleaved rounds
  of (method's step time / full's step time in that round). One row of panels per image size of the bench;
  several benches (``--cost A.json,B.json``, e.g. one per size) give their sizes side by side.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from datetime import datetime, timezone
from pathlib import Path

from .errors import EvaluationError
from .methods.names import method_of
from .methods.registry import REFERENCE, REGISTRY
from .models import BUILTIN_MODELS

#: Fidelity metrics of the plot: key, label, True if higher is better.
FIDELITY = (("fid", "FID", False), ("lpips", "LPIPS", False), ("ms_ssim", "MS-SSIM", True),
            ("prompt_accuracy", "prompt accuracy", True), ("fd_classifier", "classifier FD", False))  # fmt: skip
TEST_ARCHS = ("tiny", "tiny-random")  #: bench archs that time a tiny random U-Net (tests, --smoke), not SD
BENCH_X = "step_vs_full"  #: point field of the bench cost: {size: step time / full's}
BENCH_SECONDS = "step_median_s"  #: point field: {size: the bench's median step seconds}
OVERHEAD_NOTE = (
    "x: seconds per image of the built-in model, which are its fixed overheads (text encoder, VAE, scheduler, "
    "Python), not the speed-up of token reduction; `tofu-sd evaluate --cost BENCH.json` plots SD step time instead."
)


def _family_and_ratio(name: str, params: dict | None, reduction: dict) -> tuple[str, float | None]:
    """A row's method family and ratio: from the manifest's per-method parameters, else from the name."""
    family, suffix = method_of(name), name.rpartition("@")[2] if "@" in name else ""
    if params:
        return params.get("method", family), params.get("ratio")
    if suffix:
        try:
            return family, float(suffix)
        except ValueError:
            return name, None
    return family, None if family == REFERENCE else reduction.get("ratio")


def _uses_run_ratio(method: str) -> bool:
    """Whether an unsuffixed name of ``method`` runs at the run's (or the bench's) ``--ratio``."""
    entry = REGISTRY.get(method)
    return entry is not None and entry.parameter.uses_run_ratio


# --- the bench cost ----------------------------------------------------------------------------------------------


def read_bench(path: str | Path) -> dict:
    """A ``tofu-sd bench --json`` file, checked to hold step timings with ``full``; EvaluationError otherwise."""
    path = Path(path)
    try:
        bench = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise EvaluationError(f"cannot read --cost {path} ({error}); write one with `tofu-sd bench --json {path}`") from error
    steps = bench.get("steps") if isinstance(bench, dict) else None
    if not isinstance(steps, dict) or not steps:
        raise EvaluationError(f"--cost {path} holds no step timings (no 'steps' per image size); is it a tofu-sd bench JSON?")
    if bench.get("arch") in TEST_ARCHS:
        raise EvaluationError(
            f"--cost {path} timed the tiny test U-Net (arch {bench['arch']!r}), which says nothing of SD's step time; "
            "bench --arch sd15 (the whole SD-1.5 U-Net) for a cost axis"
        )
    for size, step in steps.items():
        variants = step.get("variants") if isinstance(step, dict) else None
        if not str(size).isdigit() or not isinstance(variants, dict) or REFERENCE not in variants:
            raise EvaluationError(f"--cost {path}: steps[{size!r}] has no timing of 'full', which the cost is relative to")
        for name, timing in variants.items():
            if not isinstance(timing, dict) or "median_s" not in timing or not timing.get("seconds"):
                raise EvaluationError(f"--cost {path}: steps[{size!r}].variants[{name!r}] lacks median_s or seconds")
    bench.setdefault("max_downsample", 1)  # benches before --max-downsample timed the highest resolution only
    return bench


def step_vs_full(step: dict, name: str) -> float:
    """``name``'s step time relative to ``full``'s in one bench size: the bench's own paired ratio
    (``ratios["<name>/full"]``: median over rounds of name / full), else the same computed from ``seconds``."""
    if name == REFERENCE:
        return 1.0
    recorded = step.get("ratios", {}).get(f"{name}/full")
    if recorded is not None:
        return float(recorded)
    rounds = zip(step["variants"][name]["seconds"], step["variants"][REFERENCE]["seconds"])
    return statistics.median(a / b for a, b in rounds)


def _bench_date(bench: dict, path: Path) -> tuple[str, str]:
    """The bench's date and where it comes from: its ``date`` field, else the file's modification time."""
    if bench.get("date"):
        return str(bench["date"]), "bench"
    stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return stamp, "file modified"


def _same_ratio(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 1e-9


def missing_timings(bench: dict, methods: list[str], ratios: dict[str, float | None]) -> list[str]:
    """A line per run method the bench cannot stand for: not timed at some size, or timed at another ratio."""
    problems = []
    timed = {name for step in bench["steps"].values() for name in step["variants"]}
    for name in methods:
        sizes = [s for s, step in bench["steps"].items() if name not in step["variants"]]
        family, at = method_of(name), "@" in name
        if sizes:
            twins = sorted(t for t in timed if method_of(t) == family and t != name)
            twin = " (the run's name has no '@<ratio>': the bench needs that same unsuffixed name)" if twins and not at else ""
            has = f"; the bench has only {', '.join(twins)}" if twins else ""
            problems.append(f"  {name}: not timed at {', '.join(sizes)} px{twin}{has}")
        elif not at and _uses_run_ratio(family) and not _same_ratio(ratios.get(name), bench.get("ratio")):
            problems.append(
                f"  {name}: the run's {name} is at ratio {ratios.get(name)}, the bench's unsuffixed {name} at "
                f"--ratio {bench.get('ratio')}"
            )
    return problems


#: The bench's options that set a variant's step time besides its name, with their defaults (a bench written
#: before ``--max-downsample`` existed timed its default, 1: :func:`read_bench` fills it in).
STEP_DEFAULTS = {"rematch_every": 1, "cache_interval": 3, "max_downsample": 1}


def step_options_differ(bench: dict, methods: list[str], step_options: dict[str, dict]) -> list[str]:
    """A line per run method whose option that sets its step time (ToFu's ``rematch_every``, the ``cache_interval``
    of a ``deepcache+`` name, the ``max_downsample`` of the methods that patch a U-Net's levels) differs from the
    bench's, which timed every variant with its own."""
    problems = []
    for name in methods:
        for key, default in STEP_DEFAULTS.items():
            mine = (step_options.get(name) or {}).get(key)
            theirs = _timed_with(bench, name, key, bench.get(key, default))
            if mine is not None and mine != theirs:
                problems.append(f"  {name}: the run's {key} is {mine}, the bench's {theirs} (--{key.replace('_', '-')})")
    return problems


def _timed_with(bench: dict, name: str, key: str, default):
    """The value of ``key`` that the bench recorded for variant ``name`` itself (a ``deepcache@N+<variant>`` name's
    own ``cache_interval``), else the bench's ``default``."""
    values = {step["variants"][name].get(key, default) for step in bench["steps"].values() if name in step["variants"]}
    return values.pop() if len(values) == 1 else default


#: What the benches merged by one ``--cost`` must share: they stand for one cost axis.
_SHARED = ("arch", "device", "dtype", "batch", "ratio", "rematch_every", "cache_interval", "max_downsample", "compiled")


def read_benches(paths: str | Path | list) -> tuple[dict, dict[str, tuple[Path, str, str]]]:
    """The bench JSONs of ``--cost`` (one path, or several as a list or comma-separated, e.g. a 512-px bench and a
    1024-px one) merged into one, their sizes side by side, and per size the file it comes from with that bench's
    date and the date's source (:func:`_bench_date`). EvaluationError if two give the same size or differ in what
    they timed (arch, device, dtype, batch, ratio, step options)."""
    if isinstance(paths, (str, Path)):
        paths = [p for p in str(paths).split(",") if p.strip()]
    paths = [Path(str(p).strip()) for p in paths]
    benches = [read_bench(p) for p in paths]
    merged, source = {**benches[0], "steps": {}}, {}
    for path, bench in zip(paths, benches):
        differ = [f"{k}: {bench.get(k)!r} in {path}, {merged.get(k)!r} in {paths[0]}" for k in _SHARED if bench.get(k) != merged.get(k)]
        if differ:
            raise EvaluationError("--cost: the benches differ in what they timed, so they cannot share a cost axis (" + "; ".join(differ) + ")")
        for size, step in bench["steps"].items():
            if size in merged["steps"]:
                raise EvaluationError(f"--cost: {size} px is timed in both {source[size][0]} and {path}; give one bench per size")
            merged["steps"][size], source[size] = step, (path, *_bench_date(bench, path))
    return merged, source


def bench_cost(
    path: str | Path | list, methods: list[str], ratios: dict[str, float | None], step_options: dict[str, dict] | None = None
) -> dict:
    """The cost of each run method from one or more bench JSONs (:func:`read_benches`), checked before any metric
    is computed.

    ``ratios`` maps each method name to the ratio it ran at in the run (for unsuffixed names, which must match the
    bench's ``ratio``); ``step_options`` to the step-dependent options it ran with, which must be the bench's
    (``{"rematch_every": k}`` for ToFu's methods, ``{"cache_interval": n}`` for ``deepcache+`` names). Returns
    ``{"cost": <report.json's pareto.cost>, "points": {name: {BENCH_X: {size: x}, BENCH_SECONDS: {size: seconds}}}}``;
    the cost's ``dates`` and ``files`` say per size which bench it is. EvaluationError naming every method the
    bench lacks and the bench command that would time them all.
    """
    bench, source = read_benches(path)
    sizes = list(bench["steps"])
    problems = missing_timings(bench, methods, ratios) + step_options_differ(bench, methods, step_options or {})
    if problems:
        raise EvaluationError(
            f"--cost {path} has no step time for some of this run's methods as they ran:\n" + "\n".join(problems)
            + f"\nTime them all in one bench (ratios are paired within a bench run): {bench_command(bench, methods, ratios, step_options, source)}"
        )
    points = {
        name: {BENCH_X: {s: step_vs_full(bench["steps"][s], name) for s in sizes},
               BENCH_SECONDS: {s: float(bench["steps"][s]["variants"][name]["median_s"]) for s in sizes}}
        for name in methods
    }  # fmt: skip
    joined = lambda i: ", ".join(dict.fromkeys(str(source[s][i]) for s in sizes))  # noqa: E731
    cost = {
        "kind": "bench", "file": joined(0), "files": {s: str(source[s][0]) for s in sizes}, "arch": bench.get("arch"),
        "sizes": [int(s) for s in sizes], "device": bench.get("device"), "dtype": bench.get("dtype"),
        "machine": bench.get("machine"), "batch": bench.get("batch"), "compiled": bench.get("compiled"),
        "date": joined(1), "dates": {s: source[s][1] for s in sizes}, "date_source": joined(2),
    }  # fmt: skip
    return {"cost": cost, "points": points}


def bench_command(bench: dict, methods: list[str], ratios: dict, step_options: dict | None, source: dict) -> str:
    """The ``tofu-sd bench`` command that would time every method of the run as it ran."""
    variants = ",".join(dict.fromkeys([REFERENCE, *methods]))
    unsuffixed = {ratios.get(m) for m in methods if _uses_run_ratio(m) and ratios.get(m) is not None}
    ratio = f" --ratio {unsuffixed.pop():g}" if len(unsuffixed) == 1 else ""  # the run's --ratio, for unsuffixed names
    steps = {f" --{key.replace('_', '-')} {value}" for own in (step_options or {}).values() for key, value in own.items()
             if key in STEP_DEFAULTS and value is not None and value != STEP_DEFAULTS[key]}  # fmt: skip
    out = ",".join(dict.fromkeys(str(path) for path, _, _ in source.values()))
    return (f"tofu-sd bench --arch {bench.get('arch', 'sd15')} --sizes {','.join(bench['steps'])} --variants {variants}"
            f"{ratio}{''.join(sorted(steps))} --json {out}")  # fmt: skip


# --- the data and the figure -------------------------------------------------------------------------------------


def _rows(cost: dict | None, model: str | None) -> tuple[list[dict], str]:
    """The panel rows (each: the point field of x, its size key, title and x label) and the plot's caption."""
    if cost is None:
        caption = OVERHEAD_NOTE if model in BUILTIN_MODELS else "x: seconds per image measured while generating this run."
        return [{"x": "sec_per_image", "size": None, "title": "", "xlabel": "seconds per image (lower is faster)"}], caption
    if "rows" in cost:  # a cost of its own rows (a diffusion transformer's: evaluation.block_cost)
        return cost["rows"], cost["caption"]
    c = cost["cost"]
    rows = [
        {"x": BENCH_X, "size": str(size), "title": f"{c['arch']} U-Net step, {size} px, {c['device']} {c['dtype']}, "
                                                   f"bench of {c.get('dates', {}).get(str(size), c['date'])}",
         "xlabel": f"step time relative to full ({size} px, lower is faster)"}
        for size in c["sizes"]
    ]  # fmt: skip
    caption = (f"x: {c['arch']} U-Net step time relative to full, the median over the interleaved rounds of "
               f"{c['file']} ({c['machine']}, batch {c['batch']}) of method / full in the same round.")  # fmt: skip
    return rows, caption


def x_of(point: dict, row: dict) -> float | None:
    """A point's x in one panel row."""
    value = point.get(row["x"])
    return value.get(row["size"]) if row["size"] is not None and value is not None else value


def _cache_label(params: dict) -> str | None:
    """A cache's value in a point's label: ``T=0.2`` (a threshold), ``N=3`` (DeepCache's or TaylorSeer's
    interval, PAB's skip range)."""
    if "threshold" in params:
        return f"T={params['threshold']:g}"
    interval = params.get("cache_interval", params.get("skip_range"))
    return None if interval is None else f"N={interval}"


def pareto_data(report: dict, cost: dict | None = None) -> dict:
    """The numbers behind ``pareto.png``: per method family, its points (one per ratio, by ratio) with seconds per
    image, the bench's cost if ``cost`` (from :func:`bench_cost`) is given, and every fidelity metric the report
    has; ``rows`` are the panel rows (one per bench size, else one), ``metrics`` the fidelity metrics with values,
    ``cost`` which cost x is, ``caption`` what x means."""
    config, methods = report["config"], report["methods"]
    params = config.get("method_params") or {}
    reference = config.get("reference")
    series: dict[str, list[dict]] = {}
    for name, m in methods.items():
        family, ratio = _family_and_ratio(name, params.get(name), config.get("reduction") or {})
        own = params.get(name) or {}
        label = f"{ratio:g}" if ratio is not None else None
        cache = _cache_label(own)
        if cache:  # a cache's own value (with ToFu's ratio, for a combination)
            label = cache + (f", {label}" if label else "")
        point = {"name": name, "ratio": ratio, "label": label, "keys_removed": own.get("keys_removed"),
                 "sec_per_image": m.get("sec_per_image")}  # fmt: skip
        point.update({key: m[key] for key, _, _ in FIDELITY if key in m})
        if cost is not None:
            point.update(cost["points"][name])
        series.setdefault(name if name == reference else family, []).append(point)
    for points in series.values():
        points.sort(key=lambda p: (p["ratio"] is None, p["ratio"] or 0.0))
    rows, caption = _rows(cost, config.get("model"))
    metrics = [
        key for key, _, _ in FIDELITY
        if key not in report.get("unavailable", {})
        and any(p.get(key) is not None and x_of(p, rows[0]) for points in series.values() for p in points)
    ]  # fmt: skip
    kind = cost["cost"] if cost is not None else {"kind": "sec_per_image"}
    return {"x": rows[0]["x"], "cost": kind, "rows": rows, "caption": caption, "reference": reference,
            "metrics": metrics, "series": series}  # fmt: skip


#: The markers of the method families, one per ten (matplotlib's default cycle has ten colours).
MARKERS = ("o", "s", "^", "D")
#: The characters of a panel's title or axis label per line (a 4.6-inch panel at 8 points): longer ones wrap.
PANEL_CHARS = 70


def _panel(ax, pareto: dict, row: dict, key: str) -> None:
    """One metric against one row's x: a line per method family, ratios labelled, the reference a star."""
    labels = {k: (label, higher) for k, label, higher in FIDELITY}
    for index, (family, points) in enumerate(pareto["series"].items()):
        shown = [(x_of(p, row), p) for p in points if p.get(key) is not None and x_of(p, row)]
        if not shown:
            continue
        xs, ys = [x for x, _ in shown], [p[key] for _, p in shown]
        if family == pareto["reference"]:
            ax.plot(xs, ys, linestyle="none", marker="*", markersize=14, color="black", label=family, zorder=3)
            continue
        # tab10's colours, then the same colours with another marker: a family keeps its look in every panel
        ax.plot(xs, ys, marker=MARKERS[index // 10 % len(MARKERS)], color=f"C{index % 10}", label=family)
        for x, p in shown:
            if p["label"] is not None:
                ax.annotate(p["label"], (x, p[key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    label, higher = labels[key]
    ax.set_xlabel(textwrap.fill(row["xlabel"], PANEL_CHARS), fontsize=8)
    ax.set_ylabel(f"{label} vs {pareto['reference']} ({'higher' if higher else 'lower'} is better)")
    if row["title"]:
        ax.set_title(textwrap.fill(row["title"], PANEL_CHARS), fontsize=8)
    ax.grid(True, alpha=0.3)


def pareto_figure(pareto: dict, title: str = ""):
    """A grid of panels, a row per cost row (bench size) and a column per fidelity metric, with the caption
    under it. Reports written before ``rows`` existed plot seconds per image. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure

    metrics = pareto["metrics"]
    rows = pareto.get("rows") or [{"x": "sec_per_image", "size": None, "title": "", "xlabel": "seconds per image"}]
    columns = max(1, len(metrics))
    fig = Figure(figsize=(4.6 * columns + 1.8, 4.2 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for row, row_axes in zip(rows, axes):
        for ax, key in zip(row_axes, metrics):
            _panel(ax, pareto, row, key)
    # one legend for every panel, beside them, so that no panel's points hide behind it
    legend = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=8)
    if not metrics:
        axes[0][0].text(0.5, 0.5, "no fidelity metric available", ha="center", va="center", transform=axes[0][0].transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    if pareto.get("caption"):
        fig.supxlabel(textwrap.fill(pareto["caption"], 40 * columns), fontsize=8)
    return fig
