"""NeuLig's merge-vs-ensemble gap against the router's training length, on the demo's MiniLM experts.

The seed paper reports merging 95.44 % vs ensembling 95.46 % (a 0.02-point gap) with 5 CLIP models. This script
trains the router once per step count on the same cached expert features and evaluates both merge-weight rules.

    python benchmarks/neulig_gap.py [--steps 300,1000,3000] [--out benchmarks/results/neulig_gap.json]

Needs the demo's experts in the cache (``make demo`` first).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from mergelab.bench.config import demo_config
from mergelab.bench.pool import load_expert_pool
from mergelab.io.writer import atomic_write_text
from mergelab.learned.api import neulig_train_set
from mergelab.learned.neulig import (
    NeuLigOptions,
    NeuLigTask,
    evaluate_neulig,
    expert_features,
    standardized_xi,
    train_router,
)
from mergelab.models.hf import load_task_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="300,1000,3000")
    parser.add_argument("--train-examples", type=int, default=NeuLigOptions().train_examples)
    parser.add_argument("--out", default="benchmarks/results/neulig_gap.json")
    args = parser.parse_args()
    options = NeuLigOptions(train_examples=args.train_examples)  # the benchmark's (and CLI's) settings otherwise
    cfg = demo_config()
    torch.set_num_threads(cfg.threads)
    ctx = load_expert_pool(cfg)  # the demo's experts, from the cache
    started = time.perf_counter()
    models = {n: load_task_model(e.path, label_names=ctx.tasks[n].label_names) for n, e in ctx.experts.items()}
    encoders = [m.encoder.float().eval() for m in models.values()]
    states = [{k: v.detach() for k, v in e.model.state_dict().items()} for e in encoders]
    max_length = cfg.eval_max_length
    features, labels = neulig_train_set(ctx.tasks.values(), encoders, options, max_length)
    evaluation = {
        name: NeuLigTask(list(task.splits["test"].texts), list(task.splits["test"].labels),
                         expert_features(encoders, task.splits["test"].texts, max_length), models[name].head)
        for name, task in ctx.tasks.items()
    }  # fmt: skip
    print(f"features: {time.perf_counter() - started:.0f} s")
    xi = standardized_xi(states)
    heads = [m.head for m in models.values()]
    scratch = copy.deepcopy(encoders[0])
    results = []
    for steps in [int(s) for s in args.steps.split(",")]:
        router = train_router(features, labels, heads, xi, options.loss, steps, options.lr, options.batch_size,
                              options.regulariser_scale, options.seed)  # fmt: skip
        for rule in options.weights_from:
            table = evaluate_neulig(router, scratch, states, evaluation, rule, options.eval_batch_size, max_length)
            average = {k: sum(float(r[k]) for r in table.values()) / len(table)
                       for k in ("ensemble", "merge", "gap", "top_weight")}  # fmt: skip
            results.append({"steps": steps, "weights_from": rule, "average": average, "tasks": table})
            print(f"steps {steps:5d} {rule:5s}: ensemble {100 * average['ensemble']:.1f}  merge "
                  f"{100 * average['merge']:.1f}  gap {100 * average['gap']:+.2f} pt  top weight "
                  f"{average['top_weight']:.3f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"results": results, "seconds": time.perf_counter() - started}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
