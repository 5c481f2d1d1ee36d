"""The cost axis of a diffusion transformer's run: ``tofu-sd evaluate RUN --cost BENCH.json[,BENCH2.json]`` where
the benches timed slices of diffusion transformers (``tofu-sd bench --arch sd3-medium-slice``, ``flux-dev-slice``).

A bench times one model call, so it cannot show what a step cache skips across a pipeline call; the run's own
counts can (:mod:`evaluation.block_calls`: the blocks ``B`` and attentions ``A`` each method ran per image). Each
method's x, per bench row (one per bench and size), is its transformer compute per image relative to ``full``'s::

    x = r * ((1 - a) * B / B_full + a * min(A / A_full, B / B_full))

- ``r``: the step time relative to ``full`` (the bench's paired median, :func:`~evaluation.pareto.step_vs_full`)
  of the method's Token Fusion part: the method itself for a tofu variant (or ``oracle``), the variant inside a
  stack (``fbcache@0.2+tofu-kv@0.75`` -> ``tofu-kv@0.75``), 1 for ``full`` and a cache alone;
- ``a``: the attention's share of a block's time (``--attention-share``; :data:`DEFAULT_ATTENTION_SHARE`). A cache
  that skips attentions inside the blocks it runs (PAB, FasterCache, TaylorSeer's full mode) saves that share of
  each skipped attention's block; one that skips whole blocks (First Block Cache, MagCache, TaylorSeer's lite
  mode) saves whole blocks, and then ``A / A_full >= B / B_full`` (``x = r * B / B_full``).

Token Fusion's factor ``r`` scales the whole of each block that runs, attention and the rest alike (a slice's step
is its blocks'). An attention's count weighs every attention call alike (SD3.5's dual-attention blocks call two).

Why the share is an option and not measured: the attention module (its q/k/v/out projections and the attention
itself, what the counts count) is 4d^2 + 2Nd multiply-adds per token against 12d^2 + 2Nd for the whole block
(the feed-forward 8d^2), for width d and N tokens: 0.55 for an SD3-medium block at 1024 px (d = 1536, 4096
image + 333 text tokens), 0.47 for FLUX.1-dev's (d = 3072, 4096 + 512). Timing the attention alone inside a
block's step would need the bench (evaluation/bench) to call it apart with the block's inputs, or to time it
inside the step with a synchronisation around each call, which changes the step it times.
"""

from __future__ import annotations

from pathlib import Path

from .archs import DIT_ARCHS
from .errors import EvaluationError
from .methods.caches import CACHE_NAMES
from .methods.names import method_of
from .methods.registry import CACHE_STACKS, REFERENCE
from .pareto import (
    BENCH_X,
    STEP_DEFAULTS,
    bench_command,
    missing_timings,
    read_bench,
    step_options_differ,
    step_vs_full,
)

#: The attention module's share of a block's compute, SD3-medium at 1024 px (see the module docstring).
DEFAULT_ATTENTION_SHARE = 0.55
SHARE_SOURCE = ("the attention module's share of an SD3-medium block's multiply-adds at 1024 px "
                "(4d^2 + 2Nd of 12d^2 + 2Nd per token; FLUX.1-dev's: 0.47)")  # fmt: skip
KIND = "dit-blocks"  #: report.json's pareto.cost.kind of this cost
PART = "tofu_part"  #: point field: the name of the method's Token Fusion part (None: none)
PART_X = "tofu_step_vs_full"  #: point field: {row: r}
COUNTS = ("block_calls_per_image", "attention_calls_per_image")


def is_transformer_bench(paths: str) -> bool:
    """Whether the ``--cost`` benches timed diffusion transformers (all of them; EvaluationError for a mix)."""
    kinds = {read_bench(p).get("arch") in DIT_ARCHS for p in _paths(paths)}
    if len(kinds) > 1:
        raise EvaluationError(f"--cost {paths}: some benches timed a U-Net, others a diffusion transformer; give one kind")
    return kinds.pop()


def _paths(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = str(paths).split(",")
    return [Path(str(p).strip()) for p in paths if str(p).strip()]


def tofu_part(name: str) -> str | None:
    """The Token Fusion part of a run's name, the one a bench times: the variant inside a cache stack, None for
    ``full`` and a cache alone, else the name itself (a tofu variant, ``oracle``)."""
    method = method_of(name)
    if name == REFERENCE or method in CACHE_NAMES:
        return None
    if method in CACHE_STACKS:
        return name.partition("+")[2]
    return name


def method_cost(counts: dict, full: dict, r: float, share: float) -> float:
    """``r * ((1 - a) * B / B_full + a * min(A / A_full, B / B_full))`` of a method's counts (``counts``, with
    :data:`COUNTS`) against ``full``'s (see the module docstring)."""
    blocks = counts["block_calls_per_image"] / full["block_calls_per_image"]
    attentions = counts["attention_calls_per_image"] / full["attention_calls_per_image"]
    return r * ((1 - share) * blocks + share * min(attentions, blocks))


def check_share(share: float | None) -> float:
    """``--attention-share``, checked (None: the default)."""
    if share is None:
        return DEFAULT_ATTENTION_SHARE
    if not 0 <= share <= 1:
        raise EvaluationError(f"--attention-share {share:g}: the attention's share of a block's time lies in [0, 1], e.g. 0.55")
    return share


def _counts(stats: dict, methods: list[str]) -> dict[str, dict]:
    """Each method's (and full's) block and attention counts from manifest.json's ``methods``; EvaluationError
    naming those without them."""
    lacking = [m for m in dict.fromkeys([REFERENCE, *methods]) if not all((stats.get(m) or {}).get(k) for k in COUNTS)]
    if lacking:
        raise EvaluationError(
            f"--cost with a diffusion transformer's bench counts the blocks each method ran, and manifest.json has no "
            f"block_calls_per_image / attention_calls_per_image for {', '.join(lacking)} (a U-Net run, a run without "
            f"{REFERENCE}, or one generated before tofu-sd counted them): generate those methods again with tofu-sd "
            "generate, or give a U-Net bench"
        )
    return {m: stats[m] for m in dict.fromkeys([REFERENCE, *methods])}


def _parts(methods, ratios, step_options) -> tuple[dict, dict, dict]:
    """The Token Fusion parts of ``methods``: part -> the methods that hold it, its run ratio, its step options."""
    users, part_ratios, part_options = {}, {}, {}
    for name in methods:
        part = tofu_part(name)
        if part is not None:
            users.setdefault(part, []).append(name)
            part_ratios[part] = ratios.get(name)
            own = (step_options or {}).get(name) or {}
            part_options[part] = {k: v for k, v in own.items() if k in STEP_DEFAULTS and k != "cache_interval"}
    return users, part_ratios, part_options


def _check(path: Path, bench: dict, parts: tuple[dict, dict, dict]) -> None:
    """EvaluationError if ``bench`` lacks a Token Fusion part as the run ran it, with the command that times them."""
    users, part_ratios, part_options = parts
    names = list(users)
    problems = missing_timings(bench, names, part_ratios) + step_options_differ(bench, names, part_options)
    if problems:
        held = "; ".join(f"{p} in {', '.join(users[p])}" for p in names if users[p] != [p])
        source = {size: (path, "", "") for size in bench["steps"]}
        raise EvaluationError(
            f"--cost {path} has no step time for the Token Fusion part of some of this run's methods as they ran:\n"
            + "\n".join(problems) + (f"\n(the Token Fusion parts of stacks: {held})" if held else "")
            + f"\nTime them in one bench: {bench_command(bench, names, part_ratios, part_options, source)}"
        )


def _benches(paths) -> list[tuple[Path, dict]]:
    """Each bench of ``--cost``, checked to time a diffusion transformer's blocks, no arch and size twice."""
    out, seen = [], {}
    for path in _paths(paths):
        bench = read_bench(path)
        arch = bench.get("arch")
        if arch not in DIT_ARCHS or str(arch).startswith("tiny"):
            raise EvaluationError(f"--cost {path} timed {arch!r}, not a diffusion transformer's blocks: bench --arch sd3-medium-slice or flux-dev-slice")
        for size in bench["steps"]:
            if (arch, size) in seen:
                raise EvaluationError(f"--cost: {arch} at {size} px is timed in both {seen[arch, size]} and {path}; give it once")
            seen[arch, size] = path
        out.append((path, bench))
    return out


def dit_cost(paths, stats: dict, methods: list[str], ratios: dict, step_options: dict | None = None,
             share: float | None = None) -> dict:  # fmt: skip
    """The cost of each run method (see the module docstring) from the run's counts (``stats``: manifest.json's
    ``methods``) and the benches of ``paths``, checked before any metric is computed. ``ratios`` and
    ``step_options`` are what each method ran with (as for :func:`~evaluation.pareto.bench_cost`). Returns
    ``{"cost", "points", "rows", "caption"}`` (the rows and caption of :func:`~evaluation.pareto.pareto_data`)."""
    share = check_share(share)
    counts = _counts(stats, methods)
    parts = _parts(methods, ratios, step_options)
    benches = _benches(paths)
    for path, bench in benches:
        _check(path, bench, parts)
    rows, files = [], {}
    points = {m: {BENCH_X: {}, PART: tofu_part(m), PART_X: {}, **{k: counts[m][k] for k in COUNTS}} for m in methods}
    for path, bench in benches:
        for size, step in bench["steps"].items():
            row = f"{bench['arch']} {size}"
            rows.append(_row(row, bench, size))
            files[row] = str(path)
            for m, point in points.items():
                r = 1.0 if point[PART] is None else step_vs_full(step, point[PART])
                point[PART_X][row] = r
                point[BENCH_X][row] = method_cost(counts[m], counts[REFERENCE], r, share)
    cost = {"kind": KIND, "files": files, "rows": [r["size"] for r in rows], "attention_share": share,
            "attention_share_source": "--attention-share" if share != DEFAULT_ATTENTION_SHARE else SHARE_SOURCE,
            "full_counts": {k: counts[REFERENCE][k] for k in COUNTS}}  # fmt: skip
    return {"cost": cost, "points": points, "rows": rows, "caption": caption(share, cost["attention_share_source"])}


def _row(key: str, bench: dict, size: str) -> dict:
    arch = bench["arch"]
    return {"x": BENCH_X, "size": key, "xlabel": f"transformer compute relative to full ({arch}, {size} px; lower is faster)",
            "title": f"blocks run x {arch} step ratio, {size} px, {bench.get('device')} {bench.get('dtype')}, "
                     f"bench of {bench.get('date', '?')}"}  # fmt: skip


def caption(share: float, source: str) -> str:
    """What x is, exactly."""
    return (
        f"x: transformer compute per image relative to {REFERENCE} = r x ((1 - a) x B/B_full + a x min(A/A_full, "
        "B/B_full)). B, A: the transformer blocks and attentions the method ran per image in this run "
        "(block_calls_per_image, attention_calls_per_image in manifest.json; a step cache skips whole blocks or "
        "attentions). r: the step time of the method's Token Fusion part relative to full in the panel row's bench "
        "(the median over its interleaved rounds of part / full; the variant inside a stack, the method itself for "
        f"a tofu variant, 1 for full and a cache alone). a = {share:g}, the attention's share of a block's time "
        f"({source})."
    )


def table_lines(pareto: dict) -> list[str]:
    """report.md's table of this cost: per method its counts, its Token Fusion part and, per row, r and x."""
    cost = pareto["cost"]
    rows = cost["rows"]
    full = cost["full_counts"]
    lines = [
        "",
        (f"Transformer compute per image (a = {cost['attention_share']:g}; {REFERENCE} ran "
         f"{full['block_calls_per_image']:g} blocks and {full['attention_calls_per_image']:g} attentions per image; "
         f"benches: {', '.join(dict.fromkeys(cost['files'].values()))}):"),
        "",
        "| Method | blocks/img | attentions/img | Token Fusion part | "
        + " | ".join(f"r ({row}) | x ({row})" for row in rows) + " |",
        "|---|---|---|---|" + "---|---|" * len(rows),
    ]
    for points in pareto["series"].values():
        for p in points:
            cells = [f"{p[PART_X][row]:.3f} | {p[BENCH_X][row]:.3f}" for row in rows]
            lines.append(f"| {p['name']} | {p[COUNTS[0]]:g} | {p[COUNTS[1]]:g} | {p[PART] or '-'} | " + " | ".join(cells) + " |")
    return lines
