"""The one list of evaluation protocols: name, function, default transductive mark, and how the runner schedules it.

The protocols' shared helpers live in ``common``; this module only lists them. Each protocol's options are one
pydantic model in its module (``ProtocolInfo.options``); ``validate_protocol_options`` checks a protocol's options
without running it (the benchmark config at load time, `mergelab eval --option`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mergelab.core.errors import ConfigError
from mergelab.evaluation.protocols.aligned import AlignedOptions, aligned
from mergelab.evaluation.protocols.common import ProtocolContext, ProtocolOptions, ProtocolOutcome
from mergelab.evaluation.protocols.current import CurrentOptions, current
from mergelab.evaluation.protocols.ensemble import EnsembleOptions, ensemble
from mergelab.evaluation.protocols.ft_classifier import FtClassifierOptions, ft_classifier
from mergelab.evaluation.protocols.knn import KnnOptions, knn
from mergelab.evaluation.protocols.linear_probe import LinearProbeOptions, linear_probe
from mergelab.evaluation.protocols.surgery import SurgeryOptions, surgery

ProtocolFn = Callable[..., ProtocolOutcome]


@dataclass(frozen=True)
class ProtocolInfo:
    """A registry entry: ``transductive`` is the default mark (an option may change it, the outcome says so);
    ``single_cell`` protocols are evaluated once per (model, task): they ignore ``shots`` (and ``seed``, except
    for a seeded initialisation); ``dense``
    protocols fit maps on [N, d] × [d, d] matrices, where more threads pay (the benchmark gives them its
    ``threads``; the others, on few-shot sets, run faster on ``protocol_threads``); ``options``: the model of its
    options (names, types, defaults, bounds, descriptions), the only validation of them; ``sampling_rate``: it also
    runs on a sampling rate of the unlabelled eval inputs (option ``sample_fraction``; transductive) instead of k
    inputs per class, the CV appendix's variant."""

    name: str
    fn: ProtocolFn
    transductive: bool
    single_cell: bool
    summary: str
    options: type[ProtocolOptions]
    dense: bool = False
    sampling_rate: bool = False


def protocol_infos() -> dict[str, ProtocolInfo]:
    """Every evaluation protocol, by name."""
    infos = (
        ProtocolInfo(
            "current", current, False, True, "argmax of the fine-tuned head on the evaluated features", CurrentOptions
        ),
        ProtocolInfo(
            "knn", knn, False, False, "smallest mean Euclidean distance to k labelled train anchors/class", KnnOptions
        ),
        ProtocolInfo(
            "aligned",
            aligned,
            True,
            True,
            "fit a transform G to fine-tuned features on unlabelled "
            "eval inputs (L1), score the fine-tuned head on G(features)",
            AlignedOptions,
            dense=True,
        ),
        ProtocolInfo(
            "ft_classifier",
            ft_classifier,
            False,
            False,
            "refit a copy of the head on k unlabelled train samples/class by KL(p_finetuned || p_merged)",
            FtClassifierOptions,
            sampling_rate=True,
        ),
        ProtocolInfo(
            "linear_probe",
            linear_probe,
            False,
            False,
            "fresh linear head trained with cross-entropy on k labelled train samples/class",
            LinearProbeOptions,
        ),
        ProtocolInfo(
            "ensemble", ensemble, False, True, "average of the T fine-tuned encoders' features → head", EnsembleOptions
        ),
        ProtocolInfo(
            "surgery",
            surgery,
            True,
            True,
            "Representation Surgery adapter z - U relu(D z) fitted by L1 on unlabelled eval inputs",
            SurgeryOptions,
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


def validate_protocol_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` of protocol ``name`` checked by its options model without running it: the options given,
    converted to their declared types (defaults are not filled in: which options are fixed decides a protocol's
    cells). An unknown protocol, an unknown option or a bad value raises a one-line ConfigError."""
    return get_protocol(name).options.parse(options).given()


def run_protocol(
    name: str, ctx: ProtocolContext, seed: int = 0, shots: int = 5, **options: Any
) -> ProtocolOutcome:
    """Run protocol ``name`` on ``ctx``; unknown protocol names or options raise ConfigError."""
    return get_protocol(name).fn(ctx, seed=seed, shots=shots, **options)
