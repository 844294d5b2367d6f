"""Aligned transforms: the fast solvers vs the previous Adam schedules, on features of the demo's shape.

Synthetic features of the demo's shape (600 test items, d = 384, C = 20 balanced classes): fine-tuned features are
class clusters, merged = 0.8 · Q · fine-tuned + noise (Q a random rotation), the head a linear map onto the class
directions. Printed:

1. per family, on one problem of each size the protocol fits (N = 600: in-sample; N = 300: one cross-fitting half):
   CPU time (process time, 1 thread: robust to other load on the machine) and the objective each solver reaches on the same pairs (``final_loss``: mean|G(X) − Y| / mean|Y|,
   plus ‖AᵀA − I‖₁ / d for euclidean/orthogonal) and the max |AᵀA − I|;
2. the protocol cells of one (method, task) as the demo runs them: before = 7 families in-sample with the Adam
   solver; after = 7 families cross-fitted + their shuffled-pairs controls with the fast solver; wall time and
   CPU time and accuracies (the noise control should sit at chance).

Usage: python benchmarks/aligned_speed.py [--threads 1] [--n 600] [--dim 384] [--classes 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def problem(n: int, dim: int, classes: int, seed: int):
    from mergelab.evaluation.types import SplitFeatures, TaskFeatures

    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, classes, generator=g))
    labels = torch.arange(n) % classes
    finetuned = 3.0 * basis.T[labels] + torch.randn(n, dim, generator=g)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    merged = 0.8 * finetuned @ q.T + 0.5 * torch.randn(n, dim, generator=g)
    head = nn.Linear(dim, classes)
    with torch.no_grad():
        head.weight.copy_(basis.T)
        head.bias.zero_()
    return (
        TaskFeatures("toy", {"test": SplitFeatures(merged, labels)}),
        TaskFeatures("toy", {"test": SplitFeatures(finetuned, labels)}),
        head,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the bench's protocol_threads)")
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mergelab.evaluation.protocols.aligned import TRANSFORMS, fit_transform, halves
    from mergelab.evaluation.protocols.common import ProtocolContext
    from mergelab.evaluation.protocols.registry import run_protocol

    merged, finetuned, head = problem(args.n, args.dim, args.classes, args.seed)
    x, y = merged.split("test").features, finetuned.split("test").features
    half = halves(args.n, 0)[0]
    for solver in ("adam", "fast"):  # warm-up: first-call costs (BLAS/LAPACK initialisation) count for neither
        for family in TRANSFORMS:
            fit_transform(x[:64], y[:64], family, solver=solver, steps=2 if family != "procrustes" else None)
    print(f"1. one fit per family, {args.threads} thread(s), d = {args.dim}: CPU s, objective, max|AᵀA − I|")
    print(f"{'family':<11} {'N':>4} {'adam s':>7} {'fast s':>7} {'adam obj':>9} {'fast obj':>9} "
          f"{'adam dev':>9} {'fast dev':>9}")  # fmt: skip
    for n_fit, rows in ((args.n, torch.arange(args.n)), (len(half), half)):
        for family in TRANSFORMS:
            facts = {}
            for solver in ("adam", "fast"):
                start = time.process_time()
                fitted, info = fit_transform(x[rows], y[rows], family, seed=0, solver=solver)
                seconds = time.process_time() - start
                a = fitted.matrix.double()
                dev = float((a.T @ a - torch.eye(args.dim, dtype=a.dtype)).abs().max())
                facts[solver] = (seconds, info["final_loss"], dev)
            (ta, la, da), (tf, lf, df) = facts["adam"], facts["fast"]
            print(f"{family:<11} {n_fit:>4} {ta:7.2f} {tf:7.2f} {la:9.5f} {lf:9.5f} {da:9.1e} {df:9.1e}", flush=True)

    ctx = ProtocolContext("toy", merged, head, finetuned)
    print("\n2. the aligned cells of one (method, task): accuracy (%) and CPU time")
    start = time.process_time()
    before = {t: run_protocol("aligned", ctx, transform=t, fit="in_sample", solver="adam") for t in TRANSFORMS}
    before_s = time.process_time() - start
    start = time.process_time()
    cross = {t: run_protocol("aligned", ctx, transform=t) for t in TRANSFORMS}
    control = {t: run_protocol("aligned", ctx, transform=t, control="shuffled") for t in TRANSFORMS}
    after_s = time.process_time() - start
    chance = next(iter(cross.values())).extras["chance_majority"]
    print(f"{'family':<11} {'in-sample (adam)':>16} {'cross (fast)':>12} {'control (fast)':>14}")
    for t in TRANSFORMS:
        print(f"{t:<11} {100 * before[t].accuracy:16.1f} {100 * cross[t].accuracy:12.1f} "
              f"{100 * control[t].accuracy:14.1f}")  # fmt: skip
    print(f"chance (majority rate) {100 * chance:.1f} %")
    print(f"before: 7 in-sample fits (adam) {before_s:.1f} s; after: 7 × (2 cross-fitted + 2 control) fits (fast) "
          f"{after_s:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
