"""Grid search on validation: every candidate of a method's grid is merged and scored on the validation split; the
best is stored (``chosen``, with every score under ``selection``) so a resumed run does not search again."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from mergelab import __version__
from mergelab.bench.cells import References
from mergelab.bench.config import ExperimentConfig, MethodSpec
from mergelab.bench.context import RunContext
from mergelab.bench.methods import merge_state
from mergelab.bench.store import ResultStore
from mergelab.core.errors import ConfigError
from mergelab.data.types import TextTask
from mergelab.evaluation.devices import on_device
from mergelab.evaluation.protocols.common import ProtocolContext
from mergelab.evaluation.protocols.registry import run_protocol
from mergelab.evaluation.results import params_json
from mergelab.evaluation.types import TaskFeatures
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.models.loading import load_encoder

FeaturesOf = Callable[[str, tuple[str, ...]], TaskFeatures]  # (task, splits) → one encoder's features
Memo = dict[Any, Any]  # a data-dependent method's reusable results across one method's grid values


def grid_candidates(spec: MethodSpec) -> list[dict[str, Any]]:
    """Every combination of the grid values, merged over the fixed params."""
    if not spec.grid:
        return [dict(spec.params)]
    keys = list(spec.grid)
    return [{**spec.params, **dict(zip(keys, values, strict=True))} for values in itertools.product(*spec.grid.values())]


def merge_fingerprint(ctx: RunContext, name: str, params: dict[str, Any]) -> str:
    """The cache identity of a merge: its recipe (method, params, base and expert content, mergelab version),
    which determines the merged weights."""
    recipe = json.dumps({"method": name, "params": params, "base": checkpoint_fingerprint(ctx.pool.base_path),
                         "experts": [e.fingerprint for e in ctx.experts.values()], "mergelab": __version__},
                        sort_keys=True, default=str)  # fmt: skip
    return "merge-" + hashlib.sha256(recipe.encode()).hexdigest()


def build_merged_encoder(ctx: RunContext, spec: MethodSpec, params: dict[str, Any],
                         memo: Memo) -> tuple[Callable[[], Any], str]:  # fmt: skip
    """A lazy in-memory merge of the experts with one parameter setting (built at most once, and only if some
    features are not cached yet), and its cache identity."""
    pool = ctx.pool

    def build() -> Any:
        with ctx.timings.timed("merging"):
            state, info = merge_state(spec.name, pool.base_path, {n: e.path for n, e in pool.experts.items()},
                                      {n: pool.tasks[n] for n in pool.experts}, params,
                                      max_length=ctx.cfg.eval_max_length, memo=memo, device=ctx.device)  # fmt: skip
            if info is not None:
                record_learned(ctx.store, spec, params, info)
            return load_encoder(state, pool.base_path, pooling=pool.pooling)

    return once(build), merge_fingerprint(ctx, spec.name, params)


def once(build: Callable[[], Any]) -> Callable[[], Any]:
    """Call ``build`` at most once (one merge serves every task's missing features)."""
    cache: list[Any] = []

    def get() -> Any:
        if not cache:
            cache.append(build())
        return cache[0]

    return get


def record_learned(store: ResultStore, spec: MethodSpec, params: dict[str, Any], record: dict[str, Any]) -> None:
    """Store what a data-dependent merge learned or chose (coefficients, λ_t, ...; JSON) for the report."""
    learned = store.get_meta("learned", {})
    learned[f"{spec.display} {params_json(params)}"] = record
    store.set_meta("learned", learned)


def validation_splits(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The splits a grid candidate's features are needed on: validation, and train for a few-shot protocol."""
    return ("validation",) if cfg.select_protocol == "current" else ("train", "validation")


def validation_score(ctx: RunContext, encoder: Callable[[], Any], fingerprint: str, refs: References) -> float:
    """Average normalised accuracy over tasks on the validation split, by the configured selection protocol."""
    heads = {n: e.head for n, e in ctx.experts.items()}
    return score_on_validation(ctx.cfg, ctx.eval_tasks, heads, refs, ctx.device,
                               lambda name, splits: ctx.features(encoder, fingerprint, name, splits))  # fmt: skip


def score_on_validation(cfg: ExperimentConfig, eval_tasks: Mapping[str, TextTask], heads: Mapping[str, torch.nn.Module],
                        refs: References, device: torch.device, features: FeaturesOf) -> float:  # fmt: skip
    """Average normalised accuracy over tasks on the validation split, by the configured selection protocol, of
    the encoder whose features on a task's splits ``features(task, splits)`` gives."""
    protocol = cfg.select_protocol
    splits = validation_splits(cfg)
    shots = 5 if 5 in cfg.shots else cfg.shots[0]
    scores = []
    for name, task in eval_tasks.items():
        if "validation" not in task.splits:
            raise ConfigError(
                f"task '{name}' has no validation split, so grid values cannot be chosen honestly; add a "
                "validation file to its folder or replace the method's grid by fixed params"
            )
        context = on_device(ProtocolContext(task=name, evaluated=features(name, splits), head=heads[name],
                                            finetuned=refs.finetuned[name], eval_split="validation"), device)  # fmt: skip
        result = run_protocol(protocol, context, seed=0, shots=shots, **cfg.protocol_options.get(protocol, {}))
        scores.append(result.accuracy / max(refs.validation_accuracy[name], 1e-9))
    return sum(scores) / len(scores)


def best_params(tried: list[dict[str, Any]]) -> dict[str, Any]:
    """The params of the best-scoring candidate (the first of equals)."""
    return max(tried, key=lambda t: t["score"])["params"]


def choose_params(ctx: RunContext, spec: MethodSpec, refs: References, memo: Memo) -> dict[str, Any]:
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
        encoder, fingerprint = build_merged_encoder(ctx, spec, params, memo)
        score = validation_score(ctx, encoder, fingerprint, refs)
        tried.append({"params": params, "score": score})
        ctx.log(f"  {spec.display} {params_json(params)}: validation score {100 * score:.1f}")
    best = best_params(tried)
    ctx.store.set_meta("selection", {**selection_all, spec.display: tried})
    ctx.store.set_meta("chosen", {**chosen_all, spec.display: best})
    return best
