#!/usr/bin/env bash
# Issue 27's front on the built-in DiT (`--model tiny-sd3`): 480 same-seed pairs (48 prompts x 10 seeds, 20 steps,
# guidance 5) per method, Token Fusion against diffusers' step caches and their stacks, then the cost axis from
# the SD3-medium and FLUX.1-dev slice benches at 1024 px. Resumable: run the same command again and it skips
# finished images (stages 1 and 3 share one run folder). Needs the machine to itself for the benches (stage 2);
# stages 1 and 3 use 2 CPU processes (torchrun, one thread each).
#
#   benchmarks/dit_front.sh generate     # the single methods
#   benchmarks/dit_front.sh all          # the single methods and the stacks in one interleaved run
#   benchmarks/dit_front.sh bench        # the slice benches (idle machine)
#   STACKS=... benchmarks/dit_front.sh stacks   # the stacks of the best caches with the best Token Fusion setting
#   benchmarks/dit_front.sh evaluate     # report.md with the paired table, the Pareto plot on the cost axis
set -euo pipefail
OUT=${OUT:-runs/dit-front}
RESULTS=${RESULTS:-benchmarks/results}
TOFU="tofu@0.25,tofu@0.5,tofu-kv@0.5,tofu-kv@0.75,tofu-kv-local@0.5,tofu-kv-local@0.75"
CACHES="fbcache@0.15,fbcache@0.2,fbcache@0.3,magcache@0.03,magcache@0.06,taylorseer-lite@2,taylorseer-lite@3,pab@2,pab@3,fastercache,fastercache@3"
STACKS=${STACKS:-"fbcache@0.2+tofu-kv@0.75,magcache@0.06+tofu-kv@0.75,taylorseer-lite@2+tofu-kv@0.75"}
# The equal-cost pairs of the report: kv against tokens, Token Fusion against the caches nearest its cost, each
# stack against its cache alone at a higher cost.
PAIRS="tofu-kv@0.5:tofu@0.25,tofu-kv@0.75:tofu@0.5,tofu-kv@0.75:fastercache,tofu-kv@0.75:fastercache@3,tofu-kv@0.5:pab@3,fbcache@0.2+tofu-kv@0.75:fbcache@0.3,magcache@0.06+tofu-kv@0.75:magcache@0.06,taylorseer-lite@2+tofu-kv@0.75:taylorseer-lite@3"
VARIANTS="full,tofu@0.25,tofu@0.5,tofu-kv@0.5,tofu-kv@0.75,tofu-kv-local@0.5,tofu-kv-local@0.75,oracle"

generate() {
    torchrun --standalone --nproc_per_node 2 --no-python tofu-sd generate --device cpu --model tiny-sd3 \
        --per-class 10 --steps 20 --guidance-scale 5 --methods "$1" --out "$OUT"
}

case "${1:-}" in
    generate) generate "full,$TOFU,$CACHES" ;;
    stacks) generate "full,$STACKS" ;;
    all) generate "full,$TOFU,$CACHES,$STACKS" ;;
    bench)
        tofu-sd bench --arch sd3-medium-slice --sizes 1024 --variants "$VARIANTS" --reps 3 --threads 2 --warmup 0 \
            --no-ops --overhead-tokens "" --json "$RESULTS/cpu-sd3-medium-slice-1024-kv.json"
        tofu-sd bench --arch flux-dev-slice --sizes 1024 --variants "$VARIANTS" --reps 2 --threads 2 --warmup 0 \
            --no-ops --overhead-tokens "" --json "$RESULTS/cpu-flux-dev-slice-1024-kv.json" ;;
    evaluate)
        tofu-sd evaluate "$OUT" --cost "$RESULTS/cpu-sd3-medium-slice-1024-kv.json,$RESULTS/cpu-flux-dev-slice-1024-kv.json" \
            --compare "${COMPARE:-$PAIRS}" ;;
    *) echo "usage: $0 generate|all|bench|stacks|evaluate" >&2; exit 2 ;;
esac
