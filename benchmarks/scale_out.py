"""The demo's merge + feature + protocol stages on a local Ray with 1 and with 2 single-threaded workers.

The demo's tasks and its (cached) experts, without its baselines (bounds, multi-task model, NeuLig): only the merge,
feature and protocol stages; by default a cut of its grid so that both runs fit in minutes on a
laptop: ``--methods`` of the demo (their grids as in demo.yaml, cut to ``--grid`` values each), ``--seeds``,
``--shots`` and the protocols ``--protocols``. Each run starts from an empty feature and merge cache (the experts
are linked from ``--cache-dir``, fine-tuned there first if absent), with ``threads: 1``, so every unit is one
single-threaded worker's work and the runs differ only in how many workers Ray has.

Printed per run: wall time, units, the units' own seconds (Σ), the scheduling overhead per unit
((workers × wall − Σ unit seconds) / units: the worker time not spent inside a unit: Ray's scheduling, transfers,
the driver's commits, and idle workers waiting for dependencies), and the speed-up of 2 workers over 1. The two
runs' results.csv are compared (they must be equal).

Usage: python benchmarks/scale_out.py [--methods weight_average,task_arithmetic,ties] [--grid 2] [--seeds 2]
       [--shots 5] [--protocols current,knn,ft_classifier] [--cache-dir DIR] [--json benchmarks/results/scale_out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def demo_cut(args: argparse.Namespace) -> Any:
    """The demo config cut to the asked methods (grids to ``--grid`` values), seeds, shots and protocols."""
    from mergelab.bench.config import demo_config

    cfg = demo_config()
    names = args.methods.split(",")
    methods = [m.model_copy(update={"grid": {k: v[: args.grid] for k, v in m.grid.items()}})
               for m in cfg.methods if m.display in names]  # fmt: skip
    return cfg.model_copy(update={"methods": methods, "seeds": args.seeds, "shots": [int(s) for s in args.shots.split(",")],
                                  "protocols": args.protocols.split(","), "threads": 1, "protocol_threads": 1,
                                  "bounds": False, "aligned_methods": None, "multitask": False, "neulig": None})  # fmt: skip


def one_run(cfg: Any, workers: int, experts: Path, root: Path) -> dict[str, Any]:
    """The cut demo on a fresh local Ray with ``workers`` CPUs (one unit per CPU), from an empty feature cache."""
    import ray

    from mergelab.bench.executor import ExecutorConfig
    from mergelab.bench.runner import run_benchmark
    from mergelab.bench.store import ResultStore

    cache = root / f"cache-{workers}"
    cache.mkdir(parents=True)
    (cache / "experts").symlink_to(experts)
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        run_benchmark(cfg, root / f"run-{workers}", cache, log=lambda m: None, report=False,
                      executor=ExecutorConfig(kind="ray"))  # fmt: skip
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    with ResultStore(root / f"run-{workers}" / "results.sqlite") as store:
        units = store.get_meta("units")
    busy = sum(u["seconds"] for u in units.values())
    kinds: dict[str, int] = {}
    for u in units.values():
        kinds[u["kind"]] = kinds.get(u["kind"], 0) + 1
    return {"workers": workers, "wall_s": wall, "units": len(units), "unit_seconds": busy, "kinds": kinds,
            "overhead_per_unit_s": (workers * wall - busy) / len(units),
            "csv": (root / f"run-{workers}" / "results.csv").read_text()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="weight_average,task_arithmetic,ties")
    parser.add_argument("--grid", type=int, default=2, help="grid values kept per grid key")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--shots", default="5")
    parser.add_argument("--protocols", default="current,knn,ft_classifier")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the demo's experts are (or go)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from mergelab.bench.pool import load_expert_pool
    from mergelab.core.paths import default_cache_dir

    cfg = demo_cut(args)
    cache_dir = args.cache_dir or default_cache_dir()
    load_expert_pool(cfg, cache_dir, log=print)  # the experts exist before either timed run
    root = Path(tempfile.mkdtemp(prefix="scale_out-"))
    try:
        runs = [one_run(cfg, workers, (cache_dir / "experts").resolve(), root) for workers in (1, 2)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'workers':>7} {'wall s':>8} {'units':>6} {'Σ unit s':>9} {'overhead/unit s':>16}  units per kind")
    for r in runs:
        print(f"{r['workers']:>7} {r['wall_s']:>8.1f} {r['units']:>6} {r['unit_seconds']:>9.1f} "
              f"{r['overhead_per_unit_s']:>16.3f}  {r['kinds']}")  # fmt: skip
    speedup = runs[0]["wall_s"] / runs[1]["wall_s"]
    same = runs[0]["csv"] == runs[1]["csv"]
    print(f"speed-up of 2 workers over 1: {speedup:.2f}x; results.csv identical: {same}")
    if args.json:
        figures = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "cache_dir")},
                   "runs": [{k: v for k, v in r.items() if k != "csv"} for r in runs], "speedup": speedup,
                   "identical": same}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
