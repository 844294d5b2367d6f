"""What the merges are compared with: the experts (upper bound), the base (lower bound), their output ensemble,
the multi-task-learning model, the NeuLig router; and Figure 1's t-SNE of fine-tuned vs merged features."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mergelab.bench.cells import References, Subject, evaluate_subject, subject_cell_key, subject_done
from mergelab.bench.context import ALL_SPLITS, RunContext
from mergelab.evaluation.results import ModelKind, ResultRow, normalized, params_json
from mergelab.evaluation.types import TaskFeatures
from mergelab.finetune.experts import get_or_train_multitask, load_multitask
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.io.writer import atomic_write_text
from mergelab.learned.api import NeuLigReport, neulig_with_data
from mergelab.learned.neulig import NeuLigOptions
from mergelab.models.loading import load_encoder

FeatureMap = Mapping[str, TaskFeatures]


def merged_protocols(ctx: RunContext) -> list[str]:
    """The protocols a single encoder is evaluated with (all but the ensemble, which is a subject of its own)."""
    return [p for p in ctx.cfg.protocols if p != "ensemble"]


def evaluate_ensemble(ctx: RunContext, refs: References) -> None:
    """The experts' output ensemble: per task, every expert's test features averaged into the task's head."""
    members = {n: [refs.finetuned[n] if s == n else ctx.features(e.encoder, e.fingerprint, n, ("test",))
                   for s, e in ctx.experts.items()] for n in ctx.experts}  # fmt: skip
    evaluate_subject(ctx, Subject(ModelKind.ENSEMBLE, "ensemble"), refs.finetuned, ["ensemble"], refs, ensemble=members)


def pretrained_features(ctx: RunContext) -> dict[str, TaskFeatures]:
    """The base encoder's features on every task (the lower bound, and the expert checks' probe input)."""
    encoder = load_encoder(ctx.pool.base_path, ctx.pool.base_path, pooling=ctx.pool.pooling)
    fingerprint = checkpoint_fingerprint(ctx.pool.base_path)
    return {n: ctx.features(encoder, fingerprint, n, ALL_SPLITS) for n in ctx.eval_tasks}


def evaluate_bounds(ctx: RunContext, refs: References, pretrained: FeatureMap) -> None:
    """The experts with their own heads (Current Eval) and the base encoder under the merges' protocols (the
    aligned ones only when every method gets them)."""
    evaluate_subject(ctx, Subject(ModelKind.FINETUNED, "individual"), refs.finetuned, ["current"], refs)
    protocols = [p for p in merged_protocols(ctx) if p != "aligned" or ctx.cfg.aligned_methods is None]
    evaluate_subject(ctx, Subject(ModelKind.PRETRAINED, "pretrained"), pretrained, protocols, refs)


def evaluate_multitask(ctx: RunContext, refs: References) -> None:
    """Table 2's multi-task-learning row: one encoder fine-tuned on every task (cached), each task's own head."""
    subject = Subject(ModelKind.MULTITASK, "mtl")
    if subject_done(ctx, subject, ["current"]):
        return
    pool = ctx.pool
    with ctx.timings.timed("multitask"):
        path = get_or_train_multitask(pool.cache_dir, pool.base_path, list(pool.tasks.values()), threads=ctx.cfg.threads,
                                      device=ctx.device, **ctx.cfg.finetune.model_dump())  # fmt: skip
    models = load_multitask(path, {n: t.label_names for n, t in pool.tasks.items()})
    fingerprint = checkpoint_fingerprint(path)
    encoder = next(iter(models.values())).encoder
    feats = {n: ctx.features(encoder, fingerprint, n, ("test",)) for n in ctx.eval_tasks}
    evaluate_subject(ctx, subject, feats, ["current"], refs, heads={n: m.head for n, m in models.items()})


def neulig_subjects(spec: NeuLigOptions) -> list[Subject]:
    """One subject per NeuLig row family: the router's ensemble, and its merge per ``weights_from`` rule."""
    params = spec.model_dump(mode="json")
    return [Subject(ModelKind.NEULIG, m, params) for m in ["ensemble", *[f"merge-{r}" for r in spec.weights_from]]]


def train_neulig(ctx: RunContext, spec: NeuLigOptions, test_features: Mapping[str, list[torch.Tensor]]) -> NeuLigReport:
    """The NeuLig router trained on the experts' train features, scored on every task's test split."""
    pool = ctx.pool
    with ctx.timings.timed("neulig"):
        return neulig_with_data({n: e.path for n, e in pool.experts.items()}, {n: pool.tasks[n] for n in pool.experts},
                                spec, max_length=ctx.cfg.eval_max_length, test_features=test_features,
                                device=ctx.device)  # fmt: skip


def neulig_row(subject: Subject, task: str, seed: int, report: NeuLigReport, first_rule: str,
               reference: float | None) -> ResultRow:  # fmt: skip
    """One NeuLig row: ensembling accuracy (the first rule's table), or one rule's merging accuracy with its gap,
    largest merge weight and mean weights as extras."""
    if subject.method == "ensemble":
        accuracy, extras = report.variants[first_rule][task]["ensemble"], {}
    else:
        result = report.variants[subject.method.removeprefix("merge-")][task]
        accuracy, extras = result["merge"], {k: result[k] for k in ("gap", "top_weight", "mean_weights")}
    return ResultRow(model=subject.model.value, method=subject.method, params=params_json(subject.params),
                     protocol="current", task=task, seed=seed, shots=0, accuracy=float(accuracy),
                     normalized_accuracy=normalized(float(accuracy), reference), extras=extras)  # fmt: skip


def evaluate_neulig_router(ctx: RunContext, refs: References) -> None:
    """NeuLig (algorithms.md §14): the router's ensembling accuracy and its merging accuracy per ``weights_from``
    rule, per task on the test split, stored as ``neulig`` rows (extras: gap, largest merge weight, mean weights)."""
    spec = ctx.cfg.neulig
    assert spec is not None
    cells = [(s, t, subject_cell_key(ctx.run_key, s, "current", t, spec.seed, 0))
             for s in neulig_subjects(spec) for t in ctx.pool.tasks]  # fmt: skip
    if all(ctx.store.has(key) for _, _, key in cells):
        return
    test_features = {  # each expert on each task's test split: already cached for the ensemble protocol
        n: [ctx.features(e.encoder, e.fingerprint, n, ("test",)).split("test").features for e in ctx.experts.values()]
        for n in ctx.pool.tasks
    }  # fmt: skip
    report = train_neulig(ctx, spec, test_features)
    ctx.store.add({key: neulig_row(s, t, spec.seed, report, spec.weights_from[0], refs.test_accuracy.get(t))
                   for s, t, key in cells})  # fmt: skip
    ctx.log("evaluated neulig: " + ", ".join(f"{rule} gap {100 * report.average_of(rule)['gap']:.2f} pt"
                                             for rule in spec.weights_from))  # fmt: skip


def tsne_panel(task: str, finetuned: TaskFeatures, merged: TaskFeatures, per_task: int) -> dict[str, Any]:
    """One task's panel: a joint 2-D t-SNE of ``per_task`` test items' fine-tuned and merged features."""
    from sklearn.manifold import TSNE  # lazy: sklearn.manifold costs ~1 s to import, for this figure only

    ft, mg = finetuned.split("test"), merged.split("test")
    rng = np.random.default_rng(0)
    idx = np.sort(rng.permutation(len(ft))[:per_task])
    joint = torch.cat([ft.features[idx], mg.features[idx]]).numpy()
    perplexity = float(min(30, max(2, (len(joint) - 1) // 3)))
    coords = TSNE(n_components=2, init="pca", random_state=0, perplexity=perplexity).fit_transform(joint)
    n = len(idx)
    return {"task": task, "labels": ft.labels[idx].tolist(), "finetuned": coords[:n].tolist(), "merged": coords[n:].tolist()}


def save_tsne(ctx: RunContext, method: str, finetuned: FeatureMap, merged: FeatureMap, per_task: int = 300) -> None:
    """Figure 1's data (``tsne.json``): fine-tuned vs ``method``'s merged test features for two tasks."""
    names: Sequence[str] = ctx.cfg.tsne_tasks or list(ctx.eval_tasks)[:2]
    panels = [tsne_panel(name, finetuned[name], merged[name], per_task) for name in names if name in merged]
    atomic_write_text(ctx.run_dir / "tsne.json", json.dumps({"method": method, "panels": panels}))
