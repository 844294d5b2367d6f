"""PLeaS: merge two models trained from different initialisations (possibly on different tasks) into one
model of 1× to 2× width, by partial permutation matching and layer-wise least squares (arXiv 2407.02447).

Pipeline (algorithms.md §13): ``match`` (activations or weights) → ``allocate_separate_units``
(FLOPs budget) → ``partial_merge`` → ``least_squares_`` → ``reestimate_batchnorm_``;
``pleas_merge`` runs all of it (settings in ``PleasOptions``). ``pleas.evaluation`` lifts the original heads into
the merged layout so the shared protocols (``mergelab.evaluation``) score merged models; ``vision_data`` loads the
offline MNIST / Fashion-MNIST data. The benchmark is ``mergelab.bench.pleas_runner.run_pleas``.
PLeaS runs on the CPU (its models are small, and matching and the assignment solver are CPU-bound): it takes no
``device`` yet.
"""

from mergelab.pleas.batchnorm import reestimate_batchnorm_
from mergelab.pleas.evaluation import Teacher, evaluate_cells, features_of, lift_features, lift_head
from mergelab.pleas.least_squares import least_squares_
from mergelab.pleas.matching import Matching, activation_matching, identity_matching, weight_matching
from mergelab.pleas.merge import PleasResult, match, pleas_merge
from mergelab.pleas.models import MLP, SmallResNet
from mergelab.pleas.options import PleasOptions
from mergelab.pleas.partial import (
    GroupSplit,
    allocate_separate_units,
    flops_ratio,
    layer_macs,
    partial_merge,
    split_groups,
)
from mergelab.pleas.spec import PermutationSpec, mlp_spec, resnet_spec, spec_for
from mergelab.pleas.vision_data import load_fashion_mnist, load_mnist_subset

__all__ = [
    "MLP",
    "GroupSplit",
    "Matching",
    "PermutationSpec",
    "PleasOptions",
    "PleasResult",
    "SmallResNet",
    "Teacher",
    "activation_matching",
    "allocate_separate_units",
    "evaluate_cells",
    "features_of",
    "flops_ratio",
    "identity_matching",
    "layer_macs",
    "least_squares_",
    "lift_features",
    "lift_head",
    "load_fashion_mnist",
    "load_mnist_subset",
    "match",
    "mlp_spec",
    "partial_merge",
    "pleas_merge",
    "reestimate_batchnorm_",
    "resnet_spec",
    "spec_for",
    "split_groups",
    "weight_matching",
]
