"""The one list of evaluation protocols: name, function, default transductive mark, and how the runner schedules it.

The protocols' shared helpers live in ``common``; this module only lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mergelab.core.errors import ConfigError
from mergelab.evaluation.protocols.aligned import aligned
from mergelab.evaluation.protocols.common import ProtocolContext, ProtocolOutcome
from mergelab.evaluation.protocols.current import current
from mergelab.evaluation.protocols.ensemble import ensemble
from mergelab.evaluation.protocols.ft_classifier import ft_classifier
from mergelab.evaluation.protocols.knn import knn
from mergelab.evaluation.protocols.linear_probe import linear_probe
from mergelab.evaluation.protocols.surgery import surgery

ProtocolFn = Callable[..., ProtocolOutcome]


@dataclass(frozen=True)
class ProtocolInfo:
    """A registry entry: ``transductive`` is the default mark (an option may change it, the outcome says so);
    ``single_cell`` protocols are evaluated once per (model, task): they ignore ``shots`` (and ``seed``, except
    for a seeded initialisation); ``dense``
    protocols fit maps on [N, d] × [d, d] matrices, where more threads pay (the benchmark gives them its
    ``threads``; the others, on few-shot sets, run faster on ``protocol_threads``)."""

    name: str
    fn: ProtocolFn
    transductive: bool
    single_cell: bool
    summary: str
    dense: bool = False





def protocol_infos() -> dict[str, ProtocolInfo]:
    """Every evaluation protocol, by name."""
    infos = (
        ProtocolInfo(
            "current", current, False, True, "argmax of the fine-tuned head on the evaluated features"
        ),
        ProtocolInfo(
            "knn", knn, False, False, "smallest mean Euclidean distance to k labelled train anchors/class"
        ),
        ProtocolInfo(
            "aligned",
            aligned,
            True,
            True,
            "fit a transform G to fine-tuned features on unlabelled "
            "eval inputs (L1), score the fine-tuned head on G(features)",
            dense=True,
        ),
        ProtocolInfo(
            "ft_classifier",
            ft_classifier,
            False,
            False,
            "refit a copy of the head on k unlabelled train samples/class by KL(p_finetuned || p_merged)",
        ),
        ProtocolInfo(
            "linear_probe",
            linear_probe,
            False,
            False,
            "fresh linear head trained with cross-entropy on k labelled train samples/class",
        ),
        ProtocolInfo(
            "ensemble", ensemble, False, True, "average of the T fine-tuned encoders' features → head"
        ),
        ProtocolInfo(
            "surgery",
            surgery,
            True,
            True,
            "Representation Surgery adapter z - U relu(D z) fitted by L1 on unlabelled eval inputs",
            dense=True,
        ),
    )
    return {info.name: info for info in infos}


def get_protocol(name: str) -> ProtocolInfo:
    """The registry entry of ``name``; an unknown name lists the known ones."""
    infos = protocol_infos()
    if name not in infos:
        raise ConfigError(f"unknown protocol '{name}'; choose one of: {', '.join(infos)}")
    return infos[name]


def run_protocol(
    name: str, ctx: ProtocolContext, seed: int = 0, shots: int = 5, **options: Any
) -> ProtocolOutcome:
    """Run protocol ``name`` on ``ctx``; unknown protocol names or options raise ConfigError."""
    return get_protocol(name).fn(ctx, seed=seed, shots=shots, **options)
