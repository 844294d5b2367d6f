"""Step 3 of PLeaS: re-estimate batch-norm running statistics of a merged model on unlabelled data."""

from __future__ import annotations

import torch
from torch import nn

from mergelab.pleas.common import iter_batches


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def reestimate_batchnorm_(
    model: nn.Module, inputs: torch.Tensor, batch_size: int = 64, max_batches: int | None = None
) -> int:
    """Reset every BN layer's running statistics and re-estimate them with train-mode passes (no gradients).

    ``momentum`` is set to ``None`` during the passes, so the running statistics become the plain average of
    the per-batch means and (unbiased) variances; momentum and train/eval flags are restored afterwards.
    Returns the number of batch-norm layers updated.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    flags = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for batch in iter_batches(inputs, batch_size, max_batches):
                model(batch)
    finally:
        for bn, momentum in zip(layers, momenta, strict=True):
            bn.momentum = momentum
        for module, flag in flags.items():
            module.training = flag
    return len(layers)
