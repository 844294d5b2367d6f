"""Consensus merging / TALL masks on hand-made vectors."""

from __future__ import annotations

import torch

from mergelab.api.registry import build_method
from mergelab.learned.tall_masks import apply_mask, model_consensus_mask, model_tall_mask
from mergelab.merging.ops import consensus_mask, tall_mask


def tall_masks(taus: list[torch.Tensor], tall_lambda: float) -> list[torch.Tensor]:
    """Each task's TALL mask against τ_MTL = Σ_t τ_t (the weight-space consensus' multi-task vector)."""
    total = torch.stack(taus).sum(0)
    return [tall_mask(tau, total, tall_lambda) for tau in taus]


def test_tall_masks_by_hand():
    taus = [torch.tensor([1.0, 0.1, -2.0]), torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.1, 0.1])]
    # τ_MTL = [2.0, 0.2, 0.1]; τ_MTL − τ_t: [1.0, 0.1, 2.1], [1.0, 0.2, -1.9], [2.0, 0.1, 0.0]
    masks = tall_masks(taus, 0.6)
    assert masks[0].tolist() == [True, True, True]     # 1 > 0.6, 0.1 > 0.06, 2 > 1.26
    assert masks[1].tolist() == [True, False, True]    # 1 > 0.6, 0 < 0.12, 2 > 1.14
    assert masks[2].tolist() == [False, True, True]    # 0 < 1.2, 0.1 > 0.06, 0.1 > 0
    assert tall_masks(taus, 0.0)[1].tolist() == [True, False, True]  # strict: a zero entry never counts
    assert consensus_mask(masks, 2).tolist() == [True, True, True]  # votes [2, 2, 3]
    assert consensus_mask(masks, 3).tolist() == [False, False, True]


def test_tall_mask_ties_are_excluded_like_the_official_code():
    # |τ_t| == λ |τ_MTL − τ_t| exactly: 1 vs 1·|2 − 1| → not in the mask (official: diff_pt_ft > λ · diff_multi_ft)
    taus = [torch.tensor([1.0]), torch.tensor([1.0])]
    assert [m.item() for m in tall_masks(taus, 1.0)] == [False, False]
    assert [m.item() for m in tall_masks(taus, 0.999)] == [True, True]


def test_weight_space_consensus_equals_the_data_consensus_at_the_same_lambda():
    torch.manual_seed(1)
    base = torch.randn(6, 5)
    models = [base + torch.randn(6, 5) for _ in range(3)]
    taus = [{"w": m - base} for m in models]
    mtl = {"w": sum(t["w"] for t in taus)}
    masks = [model_tall_mask(t, mtl, 0.4) for t in taus]
    expected = apply_mask({"w": base}, model_consensus_mask(masks, 2), mtl, scale=0.7)["w"]
    method = build_method("consensus", {"tall_lambda": 0.4, "min_tasks": 2, "scale": 0.7}, 3)
    torch.testing.assert_close(method.merge_tensor("w", base.clone(), [m.clone() for m in models]), expected)


def test_consensus_keeps_weights_used_by_k_tasks():
    base = torch.zeros(3)
    models = [torch.tensor([1.0, 0.1, -2.0]), torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.1, 0.1])]
    # votes = [2, 2, 3]: with k = 2 everything stays; with k = 3 only the last entry
    method = build_method("consensus", {"tall_lambda": 0.6, "min_tasks": 2, "scale": 0.5}, 3)
    assert torch.allclose(method.merge_tensor("w", base.clone(), [m.clone() for m in models]), torch.tensor([1.0, 0.1, 0.05]))
    method = build_method("consensus", {"tall_lambda": 0.6, "min_tasks": 3, "scale": 1.0}, 3)
    assert torch.allclose(method.merge_tensor("w", base.clone(), [m.clone() for m in models]), torch.tensor([0.0, 0.0, 0.1]))


def test_consensus_with_k_zero_is_task_arithmetic():
    torch.manual_seed(0)
    base = torch.randn(5, 4)
    models = [base + 0.1 * torch.randn(5, 4) for _ in range(3)]
    merged = build_method("consensus", {"min_tasks": 0, "scale": 0.3}, 3).merge_tensor("w", base.clone(), [m.clone() for m in models])
    expected = build_method("task_arithmetic", {"scale": 0.3}, 3).merge_tensor("w", base.clone(), [m.clone() for m in models])
    torch.testing.assert_close(merged, expected)
