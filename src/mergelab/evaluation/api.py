"""``mergelab eval`` as a function: any encoder checkpoint vs the tasks' fine-tuned models, every protocol."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.core.config import DEFAULT_MAX_LENGTH
from mergelab.core.device import DEFAULT_PRECISION, DeviceLike, resolve_device
from mergelab.core.errors import ConfigError
from mergelab.core.paths import default_cache_dir
from mergelab.data.images import is_image_task_folder, load_image_task
from mergelab.data.tasks import load_task
from mergelab.evaluation.devices import on_device
from mergelab.evaluation.features import FeatureCache
from mergelab.evaluation.protocols.aligned import aligned_cells
from mergelab.evaluation.protocols.common import ProtocolContext
from mergelab.evaluation.protocols.registry import get_protocol, protocol_infos, run_protocol, validate_protocol_options
from mergelab.evaluation.results import ResultRow, normalized, rate_label, rate_protocol
from mergelab.evaluation.types import TaskFeatures
from mergelab.evaluation.zero_shot import HEADS_FOLDER, ZeroShotHeads
from mergelab.io.fingerprint import checkpoint_fingerprint, state_dict_fingerprint
from mergelab.models.loading import load_encoder
from mergelab.models.open_clip import is_open_clip_folder, load_open_clip_encoder
from mergelab.models.task_model import TaskModel
from mergelab.models.vision import DEFAULT_TEMPLATES

PathLike = str | os.PathLike[str]
DEFAULT_TRANSFORMS = ("orthogonal", "procrustes")


def expand_cells(protocols: Sequence[str], shots: Sequence[int], num_seeds: int, transforms: Sequence[str],
                 protocol_options: Mapping[str, Mapping[str, Any]] | None = None, *, seed: int = 0,
                 sampling_rates: Sequence[float] = ()) -> list[tuple[str, str, dict[str, Any], int, int]]:  # fmt: skip
    """(stored name, protocol, options, seed, shots) for every cell; single-cell protocols run once (Surgery
    also runs per seed and shot count on k × C inputs, unless ``protocol_options`` fix its ``samples``).
    FT-Classifier runs with both solvers, stored as ``ft_classifier`` (reference schedule) and
    ``ft_classifier:converged`` (L-BFGS to convergence), unless ``protocol_options`` fix its ``solver``.
    Aligned runs each transform cross-fitted (``aligned:{t}``) and as its shuffled-pairs noise control
    (``aligned-control:{t}``); with ``fit: in_sample`` the names are ``aligned-insample[-control]:{t}``; a fixed
    ``control`` option keeps only that cell. Seeds are ``seed`` … ``seed + num_seeds − 1``. Each of
    ``sampling_rates`` adds, per seed, a cell of every protocol that supports it (``ProtocolInfo.sampling_rate``)
    on that fraction of the unlabelled test inputs, stored as ``{name}@{rate %}`` with shots 0 (transductive);
    without rates the cells are exactly those of earlier versions."""
    seeds = range(seed, seed + num_seeds)
    rates = checked_rates(sampling_rates)
    cells = []
    for protocol in protocols:
        info = get_protocol(protocol)
        if protocol == "aligned":  # per family: cross-fitted (or in-sample) fit and its shuffled-pairs control
            options = (protocol_options or {}).get(protocol, {})
            cells += [(stored, protocol, opts, 0, 0) for stored, opts in aligned_cells(transforms, options)]
        elif protocol == "surgery":  # on every eval input, and on k × C of them (FT-Classifier's count, Figure 7)
            cells.append((protocol, protocol, {}, 0, 0))
            if "samples" not in (protocol_options or {}).get(protocol, {}):
                cells += [(protocol, protocol, {"samples_per_class": k}, seed, k) for seed in seeds for k in shots]
        elif protocol == "ft_classifier":  # both solvers (reference schedule, converged), unless options fix one
            fixed = (protocol_options or {}).get(protocol, {}).get("solver")
            for solver in [fixed] if fixed else ["reference", "converged"]:
                stored = protocol if solver == "reference" else f"{protocol}:{solver}"
                cells += [(stored, protocol, {"solver": solver}, seed, k) for seed in seeds for k in shots]
                cells += rate_cells(stored, protocol, {"solver": solver}, seeds, rates)
        elif info.single_cell:
            cells.append((protocol, protocol, {}, 0, 0))
        else:
            cells += [(protocol, protocol, {}, seed, k) for seed in seeds for k in shots]
            cells += rate_cells(protocol, protocol, {}, seeds, rates if info.sampling_rate else ())
    return cells


def checked_rates(sampling_rates: Sequence[float] | None) -> list[float]:
    """The sampling rates as floats in (0, 1], in the order given; a bad or repeated rate is a one-line
    ConfigError."""
    rates = []
    for rate in sampling_rates or ():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) <= 1.0:
            raise ConfigError(f"a sampling rate is a fraction of the test inputs in (0, 1], e.g. 0.01 for 1%; "
                              f"got {rate!r}")  # fmt: skip
        rates.append(float(rate))
    labels = [rate_label(r) for r in rates]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"sampling rates repeat ({', '.join(labels)}); give each rate once")
    return rates


def rate_cells(stored: str, protocol: str, options: Mapping[str, Any], seeds: Sequence[int],
               rates: Sequence[float]) -> list[tuple[str, str, dict[str, Any], int, int]]:  # fmt: skip
    """One cell per (rate, seed): ``options`` plus ``sample_fraction``, stored as ``{stored}@{rate %}``, shots 0."""
    return [(rate_protocol(stored, rate), protocol, {**options, "sample_fraction": rate}, seed, 0)
            for rate in rates for seed in seeds]  # fmt: skip


def check_rate_protocols(protocols: Sequence[str], sampling_rates: Sequence[float]) -> None:
    """Sampling rates need a protocol that supports them (one-line ConfigError naming those)."""
    able = [name for name, info in protocol_infos().items() if info.sampling_rate]
    if sampling_rates and not any(p in able for p in protocols):
        raise ConfigError(f"sampling rates apply to the protocol(s) {', '.join(able)}; add one to the protocols "
                          "or drop the sampling rates")  # fmt: skip


def check_inputs(finetuned: Mapping[str, Any], data: Mapping[str, Any], protocols: Sequence[str],
                 sampling_rates: Sequence[float] = ()) -> None:  # fmt: skip
    """Every task has a fine-tuned model and data; every protocol exists; sampling rates have a protocol."""
    missing = sorted(set(data) ^ set(finetuned))
    if missing:
        raise ConfigError(f"every task needs both --finetuned and --data; unmatched: {', '.join(missing)}")
    known = protocol_infos()
    unknown = [p for p in protocols if p not in known]
    if unknown:
        raise ConfigError(f"unknown protocol(s) {unknown}; choose from {', '.join(known)}")
    check_rate_protocols(protocols, sampling_rates)


def checked_options(protocol_options: Mapping[str, Mapping[str, Any]] | None,
                    cells: Sequence[tuple[str, str, dict[str, Any], int, int]]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``protocol_options`` validated by each protocol's options model, and so every cell's options (the protocol's
    with the cell's own), before anything runs; the options as given, in their declared types."""
    checked = {name: validate_protocol_options(name, options) for name, options in (protocol_options or {}).items()}
    for _, protocol, options, _, _ in cells:
        validate_protocol_options(protocol, {**checked.get(protocol, {}), **options})
    return checked


def load_eval_task(name: str, path: PathLike) -> Any:
    """A text task (folder of split files, saved DatasetDict) or an image task (class folders, path,label tables)."""
    return load_image_task(name, path) if is_image_task_folder(path) else load_task(name, path)


def experts_pooling(experts: Mapping[str, TaskModel]) -> str | None:
    """The feature the experts' heads read (their pooling); experts of mixed kinds are an error."""
    poolings = {name: getattr(model.encoder, "pooling", None) for name, model in experts.items()}
    if len(set(poolings.values())) > 1:
        raise ConfigError(f"the fine-tuned models read different features {poolings}; evaluate one kind at a time")
    return next(iter(poolings.values()))


def evaluated_encoder(merged: PathLike | Mapping[str, torch.Tensor], reference: PathLike,
                      pooling: str | None) -> tuple[Any, str]:  # fmt: skip
    """The encoder to evaluate (a checkpoint or a state dict in the base layout) and its content fingerprint."""
    def load(source: Any) -> Any:  # an open_clip vision tower, or any encoder of ``models.loading``
        if is_open_clip_folder(reference):
            return load_open_clip_encoder(source, reference)
        return load_encoder(source, reference, pooling)

    if isinstance(merged, Mapping):
        return load(dict(merged)), state_dict_fingerprint(dict(merged))
    return load(merged), checkpoint_fingerprint(merged)


def evaluate(
    merged: PathLike | Mapping[str, torch.Tensor],
    finetuned: Mapping[str, PathLike],
    data: Mapping[str, PathLike],
    *,
    protocols: Sequence[str] = ("current", "knn", "ft_classifier"),
    shots: Sequence[int] = (5,),
    num_seeds: int = 5,
    seed: int = 0,
    transforms: Sequence[str] = DEFAULT_TRANSFORMS,
    cache_dir: PathLike | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 64,
    protocol_options: Mapping[str, Mapping[str, Any]] | None = None,
    model_name: str = "merged",
    progress: bool = True,
    zero_shot_text: PathLike | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: DeviceLike = "auto",
    precision: str = DEFAULT_PRECISION,
    sampling_rates: Sequence[float] = (),
) -> list[ResultRow]:
    """Evaluate the encoder ``merged`` on each task of ``data`` against its fine-tuned model in ``finetuned``.

    ``merged`` is any encoder checkpoint in the base layout (a merged model, the pretrained base, ...) or an
    in-memory state dict; ``finetuned`` maps task → fine-tuned sequence-classification checkpoint (its head is
    the task's head); ``data`` maps task → data folder or saved DatasetDict. ``num_seeds`` seeds from ``seed`` are
    run for each seeded protocol and shot count. Returns one ``ResultRow`` per (protocol, task, seed, shots) with
    accuracy, normalised accuracy (÷ the fine-tuned model's own accuracy) and the transductive mark. Features are cached on disk: a second protocol, seed or shot count runs no encoder forward pass.
    ``device`` (default ``"auto"``: CUDA, else MPS, else the CPU, so on a CPU-only machine nothing changes) runs the
    encoders and the protocols; ``precision`` (fp32, or bf16 / fp16 on an accelerator) autocasts the encoders and
    is part of the feature cache key when not fp32. Features are cached, and results returned, on the CPU.
    ``sampling_rates`` (e.g. 0.01): FT-Classifier also refits on that fraction of the test inputs (``expand_cells``).
    """
    check_inputs(finetuned, data, protocols, sampling_rates)
    cells = expand_cells(protocols, shots, num_seeds, transforms, protocol_options, seed=seed, sampling_rates=sampling_rates)
    protocol_options = checked_options(protocol_options, cells)
    where = resolve_device(device)
    cache = FeatureCache(Path(cache_dir) if cache_dir else default_cache_dir() / "features", progress=progress,
                         device=where, precision=precision)  # fmt: skip
    tasks = {name: load_eval_task(name, path) for name, path in data.items()}
    heads = ZeroShotHeads(cache.folder / HEADS_FOLDER, zero_shot_text, templates)  # CLIP: one text tower, cached heads
    experts = {name: heads.task_model(path, tasks[name].label_names) for name, path in finetuned.items()}
    expert_fp = {name: checkpoint_fingerprint(path) for name, path in finetuned.items()}
    encoder, merged_fp = evaluated_encoder(merged, next(iter(finetuned.values())), experts_pooling(experts))

    def feats(enc: torch.nn.Module, fp: str, task: Any) -> TaskFeatures:
        splits = tuple(s for s in ("train", "validation", "test") if s in task.splits)
        return cache.features(enc, fp, task, splits=splits, max_length=max_length, batch_size=batch_size)

    rows = []
    for name, task in tasks.items():
        ft = feats(experts[name].encoder, expert_fp[name], task)
        ens = []
        if "ensemble" in protocols:
            ens = [ft if other == name else feats(experts[other].encoder, expert_fp[other], task) for other in tasks]
        context = on_device(ProtocolContext(name, feats(encoder, merged_fp, task), experts[name].head, ft, ens), where)
        rows += task_rows(context, cells, protocol_options, model_name)
    return rows


def task_rows(context: ProtocolContext, cells: Sequence[tuple[str, str, dict[str, Any], int, int]],
              protocol_options: Mapping[str, Mapping[str, Any]] | None, model_name: str) -> list[ResultRow]:  # fmt: skip
    """Every cell of one task: accuracy, accuracy ÷ the fine-tuned model's own, the transductive mark."""
    finetuned = context.require_finetuned("current")
    reference = run_protocol("current", ProtocolContext(context.task, finetuned, context.head, finetuned)).accuracy
    rows = []
    for stored, protocol, options, seed, k in cells:
        merged_options = {**(protocol_options or {}).get(protocol, {}), **options}
        result = run_protocol(protocol, context, seed=seed, shots=k, **merged_options)
        rows.append(ResultRow(
            model=model_name, method=model_name, params="{}", protocol=stored, task=context.task, seed=seed, shots=k,
            accuracy=result.accuracy, normalized_accuracy=normalized(result.accuracy, reference),
            transductive=result.transductive or get_protocol(protocol).transductive, extras=result.extras,
        ))  # fmt: skip
    return rows
