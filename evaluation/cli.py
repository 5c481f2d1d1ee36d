"""The ``tofu-sd`` command: ``generate`` images per method, ``evaluate`` them, ``bench`` one denoising step."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .bench import VARIANTS
from prompts import PROMPT_SETS, class_names

from .errors import EvaluationError
from .models import DEFAULT_MODEL, SCHEDULERS, TINY, TINY_RANDOM


def _add_reduction_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("token reduction (tofu_sd.apply options; tome uses ratio, max-downsample, sx, sy, rand)")
    group.add_argument("--ratio", type=float, default=None, help="fraction of tokens reduced per patched block (0.5)")
    group.add_argument("--ratios", default=None, help="sweep: run every reducing method at each of these ratios, as <method>@<ratio>, e.g. 0.3,0.5,0.7 (todo: nearest pooling)")
    group.add_argument("--schedule", default=None, help="ToFu letters per block, P/A/M (default: P down, M up)")
    group.add_argument("--max-downsample", type=int, default=1, choices=(1, 2, 4, 8), help="patch lower resolutions too")
    group.add_argument("--sx", type=int, default=2, help="cell width (2)")
    group.add_argument("--sy", type=int, default=2, help="cell height (2)")
    group.add_argument("--no-rand", dest="use_rand", action="store_false", help="top-left destinations, no randomness")
    group.add_argument("--tofu-seed", type=int, default=None, help="seed of ToFu's destination positions (0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tofu-sd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images over class prompts for each method, same seeds")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local diffusers folder, '{TINY}' (built-in model trained on coloured shapes, offline) or '{TINY_RANDOM}' (random weights, for tests); default {DEFAULT_MODEL}")
    gen.add_argument("--prompts", default=None, choices=PROMPT_SETS, help=f"prompt set: 'shapes' (the default for {TINY}) or 'imagenet' (the default otherwise)")
    gen.add_argument("--methods", default="full,tome,tofu", help="comma-separated: full, tome, tofu, todo (token downsampling), catome (needs ca-tome); <method>@<ratio> for one ratio")
    gen.add_argument("--classes", default=None, help="class indices of the prompt set, e.g. 0-999 or 1,5,10-19 (default: all)")
    gen.add_argument("--per-class", type=int, default=2, help="samples per class (2)")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (50)")
    gen.add_argument("--seed", type=int, default=0, help="base seed; sample k of class c uses seed*10^6 + c*1000 + k")
    gen.add_argument("--out", required=True, help="run directory, e.g. runs/sd15")
    gen.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (4)")
    gen.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cuda, cuda:1, mps, cpu")
    gen.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    gen.add_argument("--height", type=int, default=None, help="image height (model default)")
    gen.add_argument("--width", type=int, default=None, help="image width (model default)")
    gen.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (7.5)")
    gen.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="replace the model's scheduler")
    gen.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first call of each method too")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_reduction_options(gen)

    ev = sub.add_parser("evaluate", help="FID / LPIPS / MS-SSIM of each method against the reference; writes a report")
    ev.add_argument("run", help="run directory made by `tofu-sd generate`")
    ev.add_argument("--reference", default="full", help="method the others are compared with (full)")
    ev.add_argument("--fid-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth (else torch hub cache)")
    ev.add_argument("--lpips-weights", default=None, help="local alexnet-owt-7be5be79.pth (else torch hub cache)")
    ev.add_argument("--device", default="auto", help="device for the metric networks")
    ev.add_argument("--batch-size", type=int, default=16, help="images per metric batch (16)")
    ev.add_argument("--grid-columns", type=int, default=8, help="seeds shown in grid.png (8)")
    an = sub.add_parser("analyze", help="functional linearity (paper Eq. 8) per block; proposes a P/M schedule")
    an.add_argument("--model", default=DEFAULT_MODEL, help=f"as for generate: hub id, local folder, '{TINY}' or '{TINY_RANDOM}'")
    an.add_argument("--prompts", default=None, choices=PROMPT_SETS, help=f"prompt set ('shapes' for {TINY}, else 'imagenet')")
    an.add_argument("--classes", default=None, help="class indices of the prompt set, e.g. 0-47 (default: all)")
    an.add_argument("--per-class", type=int, default=1, help="samples per class, same seeds as generate (1)")
    an.add_argument("--steps", type=int, default=20, help="denoising steps; every U-Net call is measured (20)")
    an.add_argument("--seed", type=int, default=0, help="base seed, as for generate (0)")
    an.add_argument("--out", required=True, help="folder for fl.json and fl.png")
    an.add_argument("--all-blocks", action="store_true", help="every transformer block, not only those apply patches")
    an.add_argument("--points", type=int, default=17, help="interpolation points of Eq. 8, ends included (17)")
    an.add_argument("--max-pairs", type=int, default=64, help="pairs per block call and batch element (64)")
    an.add_argument("--threshold", type=float, default=None, help="P below this mean FL, M at or above (1/sqrt(2))")
    an.add_argument("--decision", default="self_attention", choices=("self_attention", "feed_forward", "min"), help="which function's FL decides (self_attention)")
    an.add_argument("--ratio", type=float, default=0.5, help="reduction ratio whose pairs are measured (0.5)")
    an.add_argument("--max-downsample", type=int, default=1, choices=(1, 2, 4, 8), help="blocks apply would patch (1)")
    an.add_argument("--sx", type=int, default=2, help="cell width (2)")
    an.add_argument("--sy", type=int, default=2, help="cell height (2)")
    an.add_argument("--no-rand", dest="use_rand", action="store_false", help="top-left destinations")
    an.add_argument("--tofu-seed", type=int, default=None, help="seed of the destination positions (0)")
    an.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (4)")
    an.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cuda, cpu, ...")
    an.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    an.add_argument("--height", type=int, default=None, help="image height (model default)")
    an.add_argument("--width", type=int, default=None, help="image width (model default)")
    an.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (7.5)")
    an.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="replace the model's scheduler")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    bench = sub.add_parser("bench", help="time one denoising step: full, tomesd, tofu schedules, oracle")
    bench.add_argument("--arch", default="sd15", choices=("sd15", "sdxl", "sd15-level", "tiny"), help="U-Net architecture (random weights); sd15-level: SD 1.5's highest-resolution level alone")
    bench.add_argument("--sizes", default="512,1024", help="image sizes in pixels (latents are 1/8)")
    bench.add_argument(
        "--variants", default=None,
        help=f"subset of {','.join(VARIANTS)} (default: all; catome only where ca-tome is installed)",
    )  # fmt: skip
    bench.add_argument("--ratio", type=float, default=0.5)
    bench.add_argument("--reps", type=int, default=5, help="interleaved timed rounds (5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (1)")
    bench.add_argument("--batch", type=int, default=2, help="batch size (2, as with classifier-free guidance)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="auto", help="auto: fp16 on GPU, fp32 on CPU")
    bench.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    bench.add_argument("--overhead-tokens", default="4096,16384,65536", help="N for the per-block overhead ('' to skip)")
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    bench.add_argument("--no-ops", dest="ops", action="store_false", help="skip counting ops per patched block")
    bench.add_argument("--call-memory", type=int, default=0, metavar="LATENT", help="also the peak memory of a tiny U-Net call at this latent size (0: skip)")
    bench.add_argument("--json", default=None, help="write the results here")
    bench.add_argument("--smoke", action="store_true", help="seconds-long check on the tiny U-Net (for CI)")
    return parser


def _bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run_bench, write_json

    ints = lambda text: tuple(int(v) for v in text.split(",") if v.strip())  # noqa: E731
    try:
        kwargs = dict(
            arch=args.arch, latents=tuple(s // 8 for s in ints(args.sizes)), variants=tuple(args.variants.split(",")) if args.variants else None,
            ratio=args.ratio, reps=args.reps, warmup=args.warmup, batch=args.batch, device=args.device,
            dtype=args.dtype, compile_=args.compile, overhead_tokens=ints(args.overhead_tokens), ops=args.ops,
            call_memory_latent=args.call_memory,
        )  # fmt: skip
    except ValueError as error:
        raise EvaluationError(f"bad --sizes or --overhead-tokens: {error}") from error
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.smoke:
        kwargs.update(arch="tiny", latents=(16,), reps=2, warmup=1, overhead_tokens=(256,), call_memory_latent=args.call_memory and 16)
    try:
        result = run_bench(**kwargs, log=lambda msg: print(msg, file=sys.stderr))
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import GenerateConfig, generate, is_main_process, parse_classes
    from tofu_sd import TokenFusionConfig

    from .methods import parse_methods, ratios_of

    if args.ratio is not None and args.ratios is not None:
        raise EvaluationError(
            "give --ratio (one ratio for every method) or --ratios (a sweep, one <method>@<ratio> per ratio), not both"
        )
    ratios = ratios_of(args.ratios) if args.ratios is not None else None
    try:  # validated here, before anything is loaded
        reduction = TokenFusionConfig(
            0.5 if args.ratio is None else args.ratio, args.schedule, args.max_downsample, args.sx, args.sy,
            args.use_rand, args.tofu_seed,
        )
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    from .models import default_prompt_set

    prompt_set = args.prompts or default_prompt_set(args.model)
    num_classes = len(class_names(prompt_set))
    classes = parse_classes(args.classes or f"0-{num_classes - 1}", num_classes)
    config = GenerateConfig(
        out=args.out, model=args.model, methods=parse_methods(args.methods, ratios, reduction), classes=classes, prompts=prompt_set,
        per_class=args.per_class, steps=args.steps, seed=args.seed, reduction=reduction, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, height=args.height, width=args.width,
        guidance_scale=args.guidance_scale, scheduler=args.scheduler, warmup=args.warmup,
    )  # fmt: skip
    manifest = generate(config, progress=not args.quiet)
    if not is_main_process():  # process 0 of a multi-process launch prints for all of them
        return 0
    for method in config.methods:
        stats = manifest["methods"][method]
        per_image = stats["seconds"] / stats["images_timed"] if stats["images_timed"] else float("nan")
        print(f"{method}: {per_image:.3f} s/img, peak {stats['peak_mem_bytes'] / 2**30:.2f} GB ({stats.get('peak_mem_kind', '-')})")
    print(f"images in {Path(args.out)}; next: tofu-sd evaluate {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvaluateOptions, evaluate
    from .report import markdown, write_report

    options = EvaluateOptions(args.reference, args.fid_weights, args.lpips_weights, args.device, args.batch_size)
    report = evaluate(args.run, options)
    paths = write_report(args.run, report, args.grid_columns)
    print(markdown({k: v for k, v in report.items() if k != "names"}))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyze import DEFAULT_THRESHOLD, AnalyzeConfig, analyze, format_summary
    from .generate import parse_classes
    from .models import default_prompt_set
    from tofu_sd import TokenFusionConfig

    try:
        reduction = TokenFusionConfig(
            ratio=args.ratio, max_downsample=args.max_downsample, sx=args.sx, sy=args.sy, use_rand=args.use_rand,
            seed=args.tofu_seed,
        )
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    prompt_set = args.prompts or default_prompt_set(args.model)
    classes = parse_classes(args.classes, len(class_names(prompt_set))) if args.classes else None
    config = AnalyzeConfig(
        out=args.out, model=args.model, prompts=prompt_set, classes=classes, per_class=args.per_class,
        steps=args.steps, seed=args.seed, reduction=reduction, all_blocks=args.all_blocks, num_points=args.points,
        max_pairs=args.max_pairs, threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
        decision=args.decision, batch_size=args.batch_size, device=args.device, dtype=args.dtype, height=args.height,
        width=args.width, guidance_scale=args.guidance_scale, scheduler=args.scheduler,
    )  # fmt: skip
    result = analyze(config, progress=not args.quiet)
    print(format_summary(result))
    max_downsample = result["apply_kwargs"]["max_downsample"]
    print(f"proposed schedule: {result['proposed_schedule']} (default {result['default_schedule']}, "
          f"max_downsample {max_downsample})")  # fmt: skip
    print(f"wrote {Path(args.out) / 'fl.json'}, {Path(args.out) / 'fl.png'}; use it with: tofu-sd generate --model "
          f"{args.model} --schedule {result['proposed_schedule']} --max-downsample {max_downsample} ...")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "analyze":
            return _analyze(args)
    except EvaluationError as error:
        print(f"tofu-sd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tofu-sd {args.command}: interrupted; finished images are kept, re-run to continue", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
