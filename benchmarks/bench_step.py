"""One denoising step of the real SD 1.5 (or SDXL) U-Net: full vs tomesd vs tofu_sd vs the oracle.

Same as `tofu-sd bench`; see `python benchmarks/bench_step.py --help`.
Example (this repository's README numbers): python benchmarks/bench_step.py --json benchmarks/results/cpu.json
"""

import sys

from evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
