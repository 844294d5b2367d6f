"""Display names of the stored protocol names (Current, KNN, the FT-Classifier solvers, the aligned cells)."""

from __future__ import annotations

PROTOCOL_NAMES = {
    "current": "Current",
    "knn": "KNN",
    "ft_classifier": "FT-Classifier (reference schedule)",
    "ft_classifier:converged": "FT-Classifier (converged, L-BFGS)",
    "linear_probe": "Linear probe",
    "ensemble": "Ensemble",
    "surgery": "Surgery",
}
FT_CLASSIFIERS = ("ft_classifier", "ft_classifier:converged")  # stored names: reference schedule, solved refit
FEW_SHOT = ("knn", *FT_CLASSIFIERS)  # the protocols the main table shows at the table's shot count
ALIGNED_KINDS = {  # stored-name prefix of an aligned cell → (fit, control)
    "aligned": ("cross-fitted", False),
    "aligned-control": ("cross-fitted", True),
    "aligned-insample": ("in-sample", False),
    "aligned-insample-control": ("in-sample", True),
}
ALIGNED_FAMILIES = ("affine", "linear", "invertible", "euclidean", "orthogonal", "scaling", "procrustes")


def aligned_kind(protocol: str) -> tuple[str, str, bool] | None:
    """(transform, fit label, is the shuffled-pairs control) of an aligned stored name, else None."""
    prefix, _, transform = protocol.partition(":")
    if not transform or prefix not in ALIGNED_KINDS:
        return None
    return (transform, *ALIGNED_KINDS[prefix])


def protocol_label(protocol: str) -> str:
    """The display name of a stored protocol name (unknown names are shown as stored)."""
    kind = aligned_kind(protocol)
    if kind:
        transform, fit, control = kind
        return f"Aligned {transform}: shuffled-pairs control ({fit})" if control else f"Aligned {transform} ({fit})"
    return PROTOCOL_NAMES.get(protocol, protocol)


def dagger(text: str, transductive: bool) -> str:
    """``text`` with the transductive mark † when ``transductive``."""
    return f"{text} †" if transductive else text
