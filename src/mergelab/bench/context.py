"""What every stage of a run reads: built whole by the runner once the experts exist, never filled in later."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.bench.config import ExperimentConfig
from mergelab.bench.pool import Expert, ExpertPool, Log
from mergelab.bench.store import ResultStore
from mergelab.bench.timing import Timings
from mergelab.core.device import CPU
from mergelab.data.types import TextTask
from mergelab.evaluation.features import FeatureCache
from mergelab.evaluation.types import TaskFeatures

ALL_SPLITS = ("train", "validation", "test")


def task_features(cache: FeatureCache, cfg: ExperimentConfig, pooling: str, task: Any, encoder: Any, fingerprint: str,
                  splits: tuple[str, ...]) -> TaskFeatures:  # fmt: skip
    """Features of ``encoder`` (or a lazy builder of it) on the ``splits`` that ``task`` has, from the cache when
    there: how the local runner and a Ray worker both read them."""
    present = tuple(s for s in splits if s in task.splits)
    return cache.features(encoder, fingerprint, task, splits=present, max_length=cfg.eval_max_length,
                          batch_size=cfg.batch_size, kind=pooling)  # fmt: skip


@dataclass(frozen=True)
class RunContext:
    """One run: its config, folder and store, the expert pool, the few-shot ``eval_tasks`` (train split cut to
    the pool the protocols sample from), the ``run_key`` every cell key carries, the feature cache, and the
    ``device`` models and protocols run on (results are stored from the CPU)."""

    cfg: ExperimentConfig
    run_dir: Path
    store: ResultStore
    pool: ExpertPool
    eval_tasks: Mapping[str, TextTask]
    run_key: str
    feature_cache: FeatureCache
    timings: Timings
    log: Log
    device: torch.device = CPU

    @property
    def experts(self) -> Mapping[str, Expert]:
        return self.pool.experts

    def present(self, task: str, splits: tuple[str, ...]) -> tuple[str, ...]:
        """The ``splits`` that ``task`` has (validation is optional)."""
        return tuple(s for s in splits if s in self.eval_tasks[task].splits)

    def features(self, encoder: Any, fingerprint: str, task: str, splits: tuple[str, ...]) -> TaskFeatures:
        """Features of ``encoder`` (or a lazy builder of it) on the present ``splits`` of ``task``'s few-shot pool
        version, from the cache when there."""
        with self.timings.timed("features"):
            return task_features(self.feature_cache, self.cfg, self.pool.pooling, self.eval_tasks[task], encoder,
                                 fingerprint, splits)  # fmt: skip
