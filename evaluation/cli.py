"""The ``tofu-sd`` command: ``generate`` images per method, ``evaluate`` them, ``analyze`` the functional linearity of
the patched blocks, ``bench`` one denoising step."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .bench import ARCH_ALIASES, ARCHS, VARIANTS
from prompts import PROMPT_SETS, class_names

from .errors import EvaluationError
from .methods.base import DEFAULT_CACHE_INTERVAL
from .models import SCHEDULERS, TINY, TINY_RANDOM, TINY_SD3


def _defaults(config_class) -> dict:
    """A config dataclass's defaults by field name: the CLI's defaults are the Python API's."""
    return {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}


def _add_sampling_options(parser: argparse.ArgumentParser, config_class) -> None:
    """The options of :class:`evaluation.sampling.SamplingOptions`, for generate and analyze alike (same prompts,
    same seeds); their defaults are ``config_class``'s. Each option's ``dest`` is the field's name."""
    d = _defaults(config_class)
    group = parser.add_argument_group("sampling (the same options in generate and analyze; the same seeds give the same images)")
    group.add_argument("--model", default=d["model"], help=f"hub id, local diffusers folder, '{TINY}' (built-in U-Net model trained on coloured shapes, offline), '{TINY_SD3}' (built-in SD3-style diffusion transformer trained on the same shapes, offline) or '{TINY_RANDOM}' (random weights, for tests); default {d['model']}")
    group.add_argument("--prompts", default=None, choices=PROMPT_SETS, help=f"prompt set: 'shapes' (the default for {TINY} and {TINY_SD3}) or 'imagenet' (the default otherwise)")
    group.add_argument("--classes", default=None, help="class indices of the prompt set, e.g. 0-999 or 1,5,10-19 (default: all)")
    group.add_argument("--per-class", type=int, default=d["per_class"], help=f"samples per class ({d['per_class']})")
    group.add_argument("--steps", type=int, default=d["steps"], help=f"denoising steps ({config_class.DEFAULT_STEPS}; {TINY_SD3}: its own, 20)")
    group.add_argument("--seed", type=int, default=d["seed"], help=f"base seed; sample k of class c uses seed*10^6 + c*1000 + k ({d['seed']})")
    group.add_argument("--batch-size", type=int, default=d["batch_size"], help=f"prompts per pipeline call ({d['batch_size']})")
    group.add_argument("--device", default=d["device"], help="auto (CUDA, MPS, CPU), cuda, cuda:1, mps, cpu")
    group.add_argument("--dtype", default=d["dtype"], help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    group.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (model default; a run being extended keeps its own)")
    group.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (model default; a run being extended keeps its own)")
    group.add_argument("--guidance-scale", type=float, default=d["guidance_scale"], help=f"classifier-free guidance ({config_class.DEFAULT_GUIDANCE:g}; {TINY_SD3}: its own, 5). Qwen-Image: its true_cfg_scale, with the negative prompt ' ' (its own default 4); FLUX.1-dev and FLUX.2: the distilled guidance the transformer takes (their own 3.5, 4); Sana: its own 4.5; Wan: its own 5. Give a model's own value to sample as its pipeline does")
    group.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="replace the model's scheduler")
    group.add_argument("--frames", type=int, default=None, help="video pipelines (Wan text-to-video): frames per video, 4k+1 (the pipeline's own, 81); generate saves every frame under <method>/frames/<image name without .png>/ and the middle frame as the image the metrics compare")


def _sampling_options(args: argparse.Namespace) -> dict:
    """The SamplingOptions keyword arguments of parsed options (--classes read against the prompt set)."""
    from .models import default_prompt_set
    from .sampling import SamplingOptions, parse_classes

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingOptions)}
    options["prompts"] = args.prompts or default_prompt_set(args.model)
    if args.classes is not None:
        options["classes"] = parse_classes(args.classes, len(class_names(options["prompts"])))
    return options


def _add_reduction_options(parser: argparse.ArgumentParser, measured: bool = False) -> None:
    """tofu_sd.apply's options; ``measured`` (analyze): those of the reduction whose pairs are measured, without
    --ratios and --schedule (the schedule is what analyze proposes)."""
    title = "token reduction whose pairs are measured (tofu_sd.apply options)" if measured else (
        "token reduction (tofu_sd.apply options; tome uses ratio, max-downsample, sx, sy, rand)"
    )
    group = parser.add_argument_group(title)
    group.add_argument("--ratio", type=float, default=None, help="fraction of tokens reduced per patched block (0.5)")
    if not measured:
        group.add_argument("--ratios", default=None, help="sweep: run every reducing method at each of these ratios, as <method>@<ratio>, e.g. 0.3,0.5,0.7 (todo: nearest pooling)")
        group.add_argument("--schedule", default=None, help="ToFu letters per block, P/A/M (default: P down, M up; diffusion transformers: M in every patched block)")
    group.add_argument("--max-downsample", type=int, default=1, choices=(1, 2, 4, 8), help="U-Nets: blocks apply would patch (1)" if measured else "U-Nets: patch lower resolutions too")
    group.add_argument("--blocks", default=None, help="diffusion transformers (SD3, PixArt, Flux): the blocks to patch by index in forward order, e.g. 0-3 or 0,2,5-7 (default: all)")
    group.add_argument("--sx", type=int, default=2, help="cell width (2)")
    group.add_argument("--sy", type=int, default=2, help="cell height (2)")
    group.add_argument("--no-rand", dest="use_rand", action="store_false", help="top-left destinations, no randomness")
    group.add_argument("--tofu-seed", type=int, default=None, help="seed of ToFu's destination positions (0)")
    if not measured:
        group.add_argument("--rematch-every", type=int, default=1, metavar="K", help="ToFu: reuse each block's matching for K steps of a pipeline call (1: match at every step)")


def _add_cache_interval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-interval", type=int, default=DEFAULT_CACHE_INTERVAL, metavar="N", help=f"DeepCache's interval in the deepcache+<tofu> methods: the deep blocks computed once every N steps, an integer >= 2 ({DEFAULT_CACHE_INTERVAL}); deepcache alone takes it from its name, deepcache@N")


def _reduction(args: argparse.Namespace):
    """The TokenFusionConfig of the reduction options, validated before anything is loaded."""
    from tofu_sd import TokenFusionConfig

    try:
        return TokenFusionConfig(
            ratio=0.5 if args.ratio is None else args.ratio, schedule=getattr(args, "schedule", None),
            max_downsample=args.max_downsample, sx=args.sx, sy=args.sy, use_rand=args.use_rand, seed=args.tofu_seed,
            rematch_every=getattr(args, "rematch_every", 1), blocks=args.blocks,
        )  # fmt: skip
    except ValueError as error:
        raise EvaluationError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tofu-sd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_evaluate(sub)
    _add_analyze(sub)
    _add_bench(sub)
    return parser


def _add_generate(sub) -> None:
    from .generate_config import GenerateConfig
    from .methods import METHODS

    gen = sub.add_parser("generate", help="generate images over class prompts for each method, same seeds")
    gen.add_argument("--out", required=True, help="run directory, e.g. runs/sd15")
    gen.add_argument("--methods", default="full,tome,tofu", help=f"comma-separated, any of: {', '.join(METHODS)}; <method>@<ratio> for one ratio (tofu@0.3). full is the unpatched model, tome the tomesd package, tofu-local tofu with local matching, todo token downsampling, catome needs ca-tome; +ff / +attn2: the feed-forward / cross-attention on the reduced tokens too (tome+mlp, tome+ca+mlp: tomesd's merge_mlp, merge_crossattn); deepcache@N DeepCache computing the deep blocks once every N steps (an integer >= 2; deepcache is deepcache@3); deepcache+tofu, deepcache+tofu-kv, deepcache+tofu+ff: DeepCache around that tofu variant, @<ratio> its ratio, at --cache-interval; on diffusion transformers only, diffusers' step caches: fbcache@T (First Block Cache, threshold T, default 0.05), taylorseer@N and taylorseer-lite@N (TaylorSeer, full and lite mode, cache interval N >= 2, default 5), magcache@T (MagCache, threshold T, default 0.06), pab@N (Pyramid Attention Broadcast, attention computed once every N >= 2 steps, default 2), fastercache@N (FasterCache, self-attention computed once every N >= 2 steps below timestep 681, default 2, otherwise diffusers' defaults), and <cache>+tofu (that cache at its default with tofu, @<ratio> tofu's ratio)")
    gen.add_argument("--no-warmup", dest="warmup", action="store_false", help="time the first call of each method too")
    gen.add_argument("--adopt", action="store_true", help="the run's manifest.json is lost: rebuild it from its images' metadata, checked against these options")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_sampling_options(gen, GenerateConfig)
    _add_reduction_options(gen)
    _add_cache_interval(gen)


def _add_evaluate(sub) -> None:
    from .methods import REFERENCE

    ev = sub.add_parser("evaluate", help="FID / LPIPS / MS-SSIM of each method against the reference; writes a report")
    ev.add_argument("run", help="run directory made by `tofu-sd generate`")
    ev.add_argument("--reference", default=REFERENCE, help=f"method the others are compared with ({REFERENCE})")
    ev.add_argument("--methods", default=None, metavar="A,B,...", help="evaluate only these methods of the run (the reference always), named as for generate, e.g. tofu@0.5,tome@0.5 (default: all). A method with fewer images than the reference is evaluated on the pairs it has and named with its count")
    ev.add_argument("--fid-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth (else torch hub cache)")
    ev.add_argument("--lpips-weights", default=None, help="local alexnet-owt-7be5be79.pth (else torch hub cache)")
    ev.add_argument("--device", default="auto", help="device for the metric networks")
    ev.add_argument("--batch-size", type=int, default=16, help="images per metric batch (16)")
    ev.add_argument("--grid-columns", type=int, default=8, help="seeds shown in grid.png (8)")
    ev.add_argument("--compare", default=None, metavar="A:B,...", help="also compare these pairs of methods in the paired test, e.g. of equal cost at different ratios: tofu-kv@0.75:tome@0.5 (methods are always compared within a ratio)")
    ev.add_argument("--cost", default=None, metavar="BENCH.json[,BENCH2.json]", help="plot against the step time that `tofu-sd bench --json` measured for the run's method names, relative to full, one panel row per size (default: the run's seconds per image); every method must be in it. Several benches (comma-separated, e.g. one at 512 px and one at 1024 px) give their sizes side by side; they must have timed the same arch, batch and options. On a diffusion transformer's run give benches of DiT slices (bench --arch sd3-medium-slice, flux-dev-slice): x is then the transformer compute per image relative to full, from the blocks and attentions each method ran (manifest.json) times the bench's step ratio of its Token Fusion part (the variant inside a cache stack), one panel row per bench and size")
    ev.add_argument("--attention-share", type=float, default=None, metavar="A", help="with a diffusion transformer's --cost: the attention's share of a block's time, which weighs the attentions a cache skips inside the blocks it runs (PAB, FasterCache). Default 0.55, the attention module's share of an SD3-medium block's multiply-adds at 1024 px (FLUX.1-dev's: 0.47)")


def _add_analyze(sub) -> None:
    from .analyze import AnalyzeConfig

    an = sub.add_parser("analyze", help="functional linearity (paper Eq. 8) per block; proposes a P/M schedule",
                        description="Every U-Net (or diffusion-transformer) call of the sampling is measured, with the same seeds as generate.")  # fmt: skip
    an.add_argument("--out", required=True, help="folder for fl.json and fl.png")
    an.add_argument("--all-blocks", action="store_true", help="every transformer block, not only those apply patches")
    an.add_argument("--points", type=int, default=17, help="interpolation points of Eq. 8, ends included (17)")
    an.add_argument("--max-pairs", type=int, default=64, help="pairs per block call and batch element (64)")
    an.add_argument("--threshold", type=float, default=None, help="P below this mean FL, M at or above (1/sqrt(2))")
    an.add_argument("--decision", default="self_attention", choices=("self_attention", "feed_forward", "min"), help="which function's FL decides (self_attention)")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_sampling_options(an, AnalyzeConfig)
    _add_reduction_options(an, measured=True)


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="time one denoising step per method (generate's names), and an oracle")
    bench.add_argument(
        "--arch", default="sd15", type=lambda a: ARCH_ALIASES.get(a, a), choices=ARCHS,
        help="the model, random weights from the real config. U-Nets: sd15, sdxl; sd15-level: SD 1.5's "
        "highest-resolution level alone; tiny-random: the tests' tiny SD-1.5 shape (also accepted as its earlier "
        "name, tiny). Diffusion transformers: sd3-medium (SD3Transformer2DModel, 2.0B parameters, 24 joint blocks); "
        "sd3-medium-slice: the same with 2 joint blocks (its last one as SD3's last, text stream without "
        "feed-forward), as every block is alike and patched, so ratios between variants and memory above full's "
        "are the whole model's; flux-dev (FluxTransformer2DModel, 11.9B parameters, 19 double + 38 single-stream "
        "blocks: 48 GB of fp32 weights, for a GPU with --dtype bf16); flux-dev-slice: 1 double- and 1 "
        "single-stream block, each kind once; qwen-image / qwen-image-slice (QwenImageTransformer2DModel, 60 "
        "blocks / 2 of them; its usual size 1328); wan-slice (WanTransformer3DModel: 2 of Wan 2.1 / 2.2 14B's 40 "
        "blocks, 81 frames at 480x832: for a GPU); wan-slice-17f: the same on a 17-frame video, for a CPU; "
        "tiny-sd3-random, tiny-flux-random: test-sized transformers for a smoke run. See evaluation/dit_archs.py",
    )  # fmt: skip
    bench.add_argument("--sizes", default="512,1024", help="image sizes in pixels (latents are 1/8; Flux and SD3: multiples of 16)")
    bench.add_argument(
        "--variants", default=None,
        help=f"comma-separated method names as for generate, from {','.join(VARIANTS)}, or <method>@<ratio> "
        "(tofu@0.3, todo@0.75, deepcache@3) (default: all but the +<module> variants of tofu and tome and the "
        "deepcache+<tofu> ones; catome and deepcache only where their packages are installed; on a diffusion "
        "transformer, those that run on it: full, the tofu variants that tofu_sd.apply accepts there, oracle)",
    )  # fmt: skip
    bench.add_argument("--ratio", type=float, default=0.5, help="ratio of the names without @<ratio> (0.5)")
    bench.add_argument("--reps", type=int, default=5, help="interleaved timed rounds (5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (1)")
    bench.add_argument("--batch", type=int, default=None, help="batch size (default: 2 for the U-Nets and SD3, as with classifier-free guidance; 1 for Flux, guidance-distilled)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="auto", help="auto: fp16 on GPU, fp32 on CPU")
    bench.add_argument("--compile", action="store_true", help="torch.compile the model")
    bench.add_argument("--overhead-tokens", default="4096,16384,65536", help="N for the per-block overhead ('' to skip)")
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    bench.add_argument("--no-ops", dest="ops", action="store_false", help="skip counting ops per patched block")
    bench.add_argument("--call-memory", type=int, default=0, metavar="LATENT", help="also the peak memory of a tiny-random U-Net call at this latent size (0: skip)")
    bench.add_argument("--rematch-every", type=int, default=1, metavar="K", help="ToFu's variants reuse each block's matching for K steps: each round times a matching step and a reusing step and weighs them 1/K, (K-1)/K (deepcache+<tofu>: a whole period of lcm(N, K) steps, call by call; 1: one step, always matching)")
    bench.add_argument("--max-downsample", type=int, default=1, choices=(1, 2, 4, 8), help="U-Nets: the levels every method patches, as generate's --max-downsample (1: the highest resolution only; 2: also the next)")
    _add_cache_interval(bench)
    bench.add_argument("--json", default=None, help="write the results here")
    bench.add_argument("--smoke", action="store_true", help="seconds-long check on the tiny-random U-Net (for CI)")


def _bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run_bench, write_json
    from .methods.names import split_list

    ints = lambda text: tuple(int(v) for v in text.split(",") if v.strip())  # noqa: E731
    try:
        kwargs = dict(
            arch=args.arch, latents=tuple(s // 8 for s in ints(args.sizes)), variants=tuple(split_list(args.variants)) if args.variants else None,
            ratio=args.ratio, reps=args.reps, warmup=args.warmup, batch=args.batch, device=args.device,
            dtype=args.dtype, compile_=args.compile, overhead_tokens=ints(args.overhead_tokens), ops=args.ops,
            call_memory_latent=args.call_memory, rematch_every=args.rematch_every, cache_interval=args.cache_interval,
            max_downsample=args.max_downsample,
        )  # fmt: skip
    except ValueError as error:
        raise EvaluationError(f"bad --sizes or --overhead-tokens: {error}") from error
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.smoke:
        kwargs.update(arch="tiny-random", latents=(16,), reps=2, warmup=1, overhead_tokens=(256,), call_memory_latent=args.call_memory and 16)
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
    from .generate import generate
    from .generate_config import GenerateConfig
    from .methods import parse_methods, ratios_of
    from .processes import is_main_process

    if args.ratio is not None and args.ratios is not None:
        raise EvaluationError(
            "give --ratio (one ratio for every method) or --ratios (a sweep, one <method>@<ratio> per ratio), not both"
        )
    ratios = ratios_of(args.ratios) if args.ratios is not None else None
    reduction = _reduction(args)
    config = GenerateConfig(  # checks every option that needs no model, before anything is loaded or written
        **_sampling_options(args), out=args.out, methods=parse_methods(args.methods, ratios, reduction),
        reduction=reduction, cache_interval=args.cache_interval, warmup=args.warmup, adopt=args.adopt,
    )  # fmt: skip
    manifest = generate(config, progress=not args.quiet)
    if not is_main_process():  # process 0 of a multi-process launch prints for all of them
        return 0
    for method in config.methods:
        stats = manifest["methods"][method]
        per_image = stats["seconds"] / stats["images_timed"] if stats["images_timed"] else float("nan")
        blocks = f", {stats['block_calls_per_image']:g} block calls/img" if "block_calls_per_image" in stats else ""
        print(f"{method}: {per_image:.3f} s/img, peak {stats['peak_mem_bytes'] / 2**30:.2f} GB ({stats.get('peak_mem_kind', '-')}){blocks}")
    print(f"images in {Path(args.out)}; next: tofu-sd evaluate {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvaluateOptions, evaluate
    from .report import markdown, write_report

    options = EvaluateOptions(args.reference, args.fid_weights, args.lpips_weights, args.device, args.batch_size, cost=args.cost, compare=args.compare, methods=args.methods, attention_share=args.attention_share)
    report = evaluate(args.run, options)
    paths = write_report(args.run, report, args.grid_columns)
    print(markdown({k: v for k, v in report.items() if k != "names"}))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyze import AnalyzeConfig, analyze, format_summary
    from .linearity import DEFAULT_THRESHOLD

    config = AnalyzeConfig(
        **_sampling_options(args), out=args.out, reduction=_reduction(args), all_blocks=args.all_blocks,
        num_points=args.points, max_pairs=args.max_pairs, decision=args.decision,
        threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
    )  # fmt: skip
    result = analyze(config, progress=not args.quiet)
    print(format_summary(result))
    if "architecture" in result:  # a diffusion transformer: its blocks by index, no max_downsample
        blocks = result["apply_kwargs"]["blocks"]
        chosen = "" if blocks is None else f" --blocks {blocks if isinstance(blocks, str) else ','.join(map(str, blocks))}"
        print(f"proposed schedule: {result['proposed_schedule']} (default {result['default_schedule']}, "
              f"{result['architecture']}, blocks {'all' if blocks is None else chosen.split()[-1]})")  # fmt: skip
        print(f"wrote {Path(args.out) / 'fl.json'}, {Path(args.out) / 'fl.png'}; use it with: tofu-sd generate --model "
              f"{args.model} --schedule {result['proposed_schedule']}{chosen} ...")  # fmt: skip
        return 0
    max_downsample = result["apply_kwargs"]["max_downsample"]
    print(f"proposed schedule: {result['proposed_schedule']} (default {result['default_schedule']}, "
          f"max_downsample {max_downsample})")  # fmt: skip
    print(f"wrote {Path(args.out) / 'fl.json'}, {Path(args.out) / 'fl.png'}; use it with: tofu-sd generate --model "
          f"{args.model} --schedule {result['proposed_schedule']} --max-downsample {max_downsample} ...")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"generate": _generate, "evaluate": _evaluate, "bench": _bench, "analyze": _analyze}
    try:
        return commands[args.command](args)  # argparse allows only these commands
    except EvaluationError as error:
        print(f"tofu-sd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tofu-sd {args.command}: interrupted; finished images are kept, re-run to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
