"""GPU smoke test: the demo's pieces on ``cuda`` and on ``cpu``, timed side by side, results compared.

Three steps, each run once per device from the same inputs: one fine-tuning epoch of an expert (MiniLM, the demo's
recipe with ``epochs: 1``), the demo's data-dependent merge (RegMean on the experts' train inputs) and one protocol
grid (FT-Classifier, both solvers, shots x seeds, on features extracted on that device into a fresh cache). Printed:
seconds on each device, the speed-up, and how far the results are apart (max |Δ| of the merged weights, of the
head, and the largest accuracy difference of the grid); CUDA numbers are not bit-identical to the CPU's.

Exits with status 2 and a message when CUDA is absent. Usage:
    python benchmarks/gpu_smoke.py [--tasks election,rotten_tomatoes] [--train-size 600] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall seconds (CUDA synchronised before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def finetune_step(base: Path, task: Any, device: str, root: Path, train_size: int) -> tuple[dict, float]:
    """One epoch of the demo's recipe on ``device``: the head's tensors and the seconds."""
    from safetensors.torch import load_file

    from mergelab.finetune.experts import finetune_expert

    out, seconds = timed(finetune_expert, base, task, root / f"expert-{device}", progress=False, device=device,
                         epochs=1.0, train_size=train_size)  # fmt: skip
    return load_file(str(out / "mergelab_head.safetensors")), seconds


def merge_step(base: Path, experts: dict, tasks: dict, device: str) -> tuple[dict, float]:
    """The demo's RegMean merge on ``device``: the merged state (on the CPU) and the seconds."""
    import mergelab

    result, seconds = timed(mergelab.merge, "regmean", base, experts, data=tasks, device=device, alpha=0.95,
                            num_examples=256)  # fmt: skip
    return result.state, seconds


def protocol_step(base: Path, experts: dict, tasks: dict, merged: dict, device: str, root: Path) -> tuple[dict, float]:
    """Features (fresh cache) and the FT-Classifier grid on ``device``: {(task, stored, seed, shots): acc}, seconds."""
    from mergelab.evaluation.api import expand_cells
    from mergelab.evaluation.devices import on_device
    from mergelab.evaluation.features import FeatureCache
    from mergelab.evaluation.protocols.common import ProtocolContext
    from mergelab.evaluation.protocols.registry import run_protocol
    from mergelab.io.fingerprint import checkpoint_fingerprint, state_dict_fingerprint
    from mergelab.models.hf import load_encoder, load_task_model

    def run() -> dict:
        cache = FeatureCache(root / f"features-{device}", progress=False, device=device)
        encoder = load_encoder(merged, base)
        out = {}
        for name, task in tasks.items():
            expert = load_task_model(experts[name], label_names=task.label_names)
            ft = cache.features(expert.encoder, checkpoint_fingerprint(experts[name]), task, ("train", "test"))
            mg = cache.features(encoder, state_dict_fingerprint(merged), task, ("train", "test"))
            ctx = on_device(ProtocolContext(name, mg, expert.head, ft), torch.device(device))
            for stored, protocol, options, seed, shots in expand_cells(["ft_classifier"], [1, 5], 3, []):
                result = run_protocol(protocol, ctx, seed=seed, shots=shots, **options)
                out[(name, stored, seed, shots)] = result.accuracy
        return out

    return timed(run)


def max_diff(a: dict, b: dict) -> float:
    """The largest |a − b| over the float tensors (or numbers) both hold."""
    diffs = [float((a[k].double() - b[k].double()).abs().max()) if isinstance(a[k], torch.Tensor)
             else abs(float(a[k]) - float(b[k])) for k in a if k in b
             and (not isinstance(a[k], torch.Tensor) or a[k].is_floating_point())]  # fmt: skip
    return max(diffs, default=0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="election,rotten_tomatoes")
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--cache-dir", type=Path, default=None, help="experts cache (default: the XDG cache)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: CUDA is not available here (torch.cuda.is_available() is False); run it on a CUDA machine")
        return 2
    from mergelab.bench.pool import fewshot_pool, resolve_base
    from mergelab.core.paths import default_cache_dir
    from mergelab.data.catalog import load_builtin_task
    from mergelab.finetune.experts import get_or_train_expert

    base, cache = resolve_base("minilm"), args.cache_dir or default_cache_dir()
    tasks = {n: load_builtin_task(n, args.train_size, 100, 300) for n in args.tasks.split(",")}
    experts = {n: get_or_train_expert(cache / "experts", base, t, progress=False, train_size=args.train_size)
               for n, t in tasks.items()}  # fmt: skip
    pools = {n: fewshot_pool(t, 20, 0) for n, t in tasks.items()}
    first = next(iter(tasks.values()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = {d: finetune_step(base, first, d, root, args.train_size) for d in ("cuda", "cpu")}
        rows.append(("fine-tune 1 epoch", runs, max_diff(runs["cuda"][0], runs["cpu"][0])))
        merges = {d: merge_step(base, experts, tasks, d) for d in ("cuda", "cpu")}
        rows.append(("regmean merge", merges, max_diff(merges["cuda"][0], merges["cpu"][0])))
        grids = {d: protocol_step(base, experts, pools, merges["cpu"][0], d, root) for d in ("cuda", "cpu")}
        rows.append(("features + ft_classifier grid", grids, max_diff(grids["cuda"][0], grids["cpu"][0])))
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(f"{'step':<32} {'cuda s':>8} {'cpu s':>8} {'speed-up':>9} {'max |cuda - cpu|':>17}")
    for step, runs, diff in rows:
        cuda_s, cpu_s = runs["cuda"][1], runs["cpu"][1]
        print(f"{step:<32} {cuda_s:>8.2f} {cpu_s:>8.2f} {cpu_s / max(cuda_s, 1e-9):>8.1f}x {diff:>17.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
