"""TALL-masks consensus over a `scale` grid, with and without the masks memo, on the demo's MiniLM experts.

    python benchmarks/tall_grid.py [--scales 0.3,0.5,1.0]

Prints the wall time of the grid each way and their ratio. Needs the demo's experts in the cache (``make demo``).
"""

from __future__ import annotations

import argparse
import time

import torch

import mergelab
from mergelab.bench.config import demo_config
from mergelab.bench.pool import load_expert_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="0.3,0.5,1.0")
    args = parser.parse_args()
    cfg = demo_config()
    torch.set_num_threads(cfg.threads)
    ctx = load_expert_pool(cfg)  # the demo's experts, from the cache
    finetuned = {n: e.path for n, e in ctx.experts.items()}
    scales = [float(s) for s in args.scales.split(",")]
    timings = {}
    for label, memo in (("without memo", None), ("with memo", {})):
        started = time.perf_counter()
        for scale in scales:
            mergelab.merge("tall_consensus", ctx.base_path, finetuned, data=dict(ctx.tasks), scale=scale, memo=memo)
        timings[label] = time.perf_counter() - started
        print(f"{label:>12}: {timings[label]:.1f} s for {len(scales)} scale values")
    print(f"ratio with / without: {timings['with memo'] / timings['without memo']:.2f}")


if __name__ == "__main__":
    main()
