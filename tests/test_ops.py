"""The pure tensor functions behind the merging methods (mergelab.merge.ops)."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.core.errors import ConfigError, MergelabError
from mergelab.merging import ops


def _tricky_magnitudes(generator: torch.Generator, rows: int, n: int) -> torch.Tensor:
    """Random float32 rows with exact ties, ±0, subnormals, tiny normals and huge values mixed in."""
    gauss = torch.randn(rows, n, generator=generator)
    pick = torch.randint(0, 6, (rows, n), generator=generator)
    tiny = torch.rand(rows, n, generator=generator) * 1e-39  # subnormal range (< 1.18e-38)
    quantised = torch.round(gauss * 4) / 4  # many exact ties
    values = torch.where(pick == 0, torch.zeros(()), gauss)
    values = torch.where(pick == 1, tiny, values)
    values = torch.where(pick == 2, quantised, values)
    values = torch.where(pick == 3, -tiny, values)
    values = torch.where(pick == 4, gauss * 1e30, values)
    values[:, :3] = -0.0
    return values


def test_trim_rank_follows_the_reference_rule():
    assert ops.trim_rank(10, 0.2) == 8  # κ = 8th smallest → 3 kept (⌊dP⌋ + 1)
    assert ops.trim_rank(3, 0.5) == 2
    assert ops.trim_rank(7, 1.0) == 0  # < 1: keep everything
    assert ops.trim_rank(7, 0.0) == 7  # κ = max |τ|
    assert ops.trim_rank(0, 0.2) == 0


def test_global_threshold_and_trim_keep_floor_dp_plus_one_and_every_tie():
    tau = torch.tensor([[0.5, -3.0, 1.0, 2.0, -0.25], [1.0, 1.0, 1.0, -1.0, 0.0]])
    k = ops.trim_rank(5, 0.4)  # P=5, ⌊2⌋=2, k=3: 3rd smallest |τ|
    thresholds = tau.abs().kthvalue(k, dim=1).values
    assert thresholds.tolist() == [1.0, 1.0]
    trimmed = ops.trim(tau, thresholds)
    assert trimmed.tolist() == [[0.0, -3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, -1.0, 0.0]]  # ties at κ all kept


def test_sign_election_zero_resolution_and_disjoint_merge_by_hand():
    trimmed = torch.tensor([[2.0, 0.0, 1.5, 0.0], [0.0, 3.0, -1.5, 0.0], [-0.5, 2.0, 0.0, 0.0]])
    signs = ops.elect_signs(trimmed)
    assert signs.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert ops.sign_total(signs) == 2 and ops.majority_sign(2) == 1.0
    assert ops.majority_sign(-5) == -1.0 and ops.majority_sign(0) == 0.0
    resolved = ops.resolve_zero_signs(signs, -1.0)
    assert resolved.tolist() == [1.0, 1.0, -1.0, -1.0]
    # agreeing non-zero entries: col0 {2}, col1 {3, 2}, col2 {-1.5}, col3 {}
    assert ops.disjoint_merge(trimmed, resolved, "sum").tolist() == [2.0, 5.0, -1.5, 0.0]
    assert ops.disjoint_merge(trimmed, resolved, "mean").tolist() == [2.0, 2.5, -1.5, 0.0]


def test_scale_rows_multiplies_each_model():
    stacked = torch.ones(3, 2, 2)
    scaled = ops.scale_rows(stacked, [1.0, -2.0, 0.5])
    assert scaled[:, 0, 0].tolist() == [1.0, -2.0, 0.5]


def test_require_base_names_the_method():
    with pytest.raises(ConfigError, match="'ties' needs the pretrained base"):
        ops.require_base(None, "ties")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_radix_selection_equals_kthvalue_on_tricky_data(seed):
    generator = torch.Generator().manual_seed(seed)
    chunks = [_tricky_magnitudes(generator, 3, n) for n in (1, 17, 300, 64)]
    chunks.append(_tricky_magnitudes(generator, 3, 24).reshape(3, 2, 3, 4))  # any trailing shape
    chunks.append(torch.tensor([[0.0], [1e-45], [-1e-45]]))  # smallest subnormal
    flat = torch.cat([c.reshape(3, -1) for c in chunks], dim=1).abs()
    total = flat.shape[1]
    ranks = {1, 2, 3, total // 3, total // 2, total - 1, total}
    ranks |= set(torch.randint(1, total + 1, (10,), generator=generator).tolist())
    for k in sorted(ranks):
        expected = flat.kthvalue(k, dim=1).values
        got = ops.kth_smallest_magnitude(chunks, k)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), k


def test_radix_selection_all_equal_and_all_zero():
    chunks = [torch.full((2, 5), -0.75), torch.full((2, 3), 0.75)]
    for k in (1, 4, 8):
        assert ops.kth_smallest_magnitude(chunks, k).tolist() == [0.75, 0.75]
    zeros = [torch.zeros(2, 4)]
    assert ops.kth_smallest_magnitude(zeros, 3).tolist() == [0.0, 0.0]


def test_radix_select_gives_per_row_ranks_and_the_rank_among_equals():
    chunks = [torch.tensor([[0.5, -2.0, 0.5], [3.0, 1.0, -1.0]]), torch.tensor([[0.5, 1.0], [1.0, 4.0]])]
    # row 0 sorted: .5 .5 .5 1 2 → 3rd is .5, the 3rd of three equal; row 1: 1 1 1 3 4 → 2nd is 1, 2nd of three
    values, among_equals = ops.radix_select(chunks, torch.tensor([3, 2]))
    assert values.tolist() == [0.5, 1.0] and among_equals.tolist() == [3, 2]
    assert ops.kth_smallest_magnitude(chunks, 4).tolist() == [1.0, 3.0]  # the same routine, one k for every row
    kappa, greater, tied = ops.magnitude_cut(torch.tensor([0.5, -2.0, 0.5, 0.5, 1.0]), 4)
    assert float(kappa) == 0.5 and (greater, tied) == (2, 3)  # keep 4: {2, 1} and two of the three 0.5s


def test_task_vectors_new_tensors_or_in_place():
    base = torch.tensor([1.0, 2.0])
    models = [torch.tensor([1.5, 1.0]), torch.tensor([0.0, 2.0], dtype=torch.float64)]
    taus = ops.task_vectors(base, models)
    assert [t.tolist() for t in taus] == [[0.5, -1.0], [-1.0, 0.0]] and all(t.dtype == torch.float32 for t in taus)
    assert models[0].tolist() == [1.5, 1.0]  # inputs untouched
    owned = [torch.tensor([1.5, 1.0])]
    in_place = ops.task_vectors(base, owned, in_place=True)
    assert in_place[0] is owned[0] and owned[0].tolist() == [0.5, -1.0]  # the engine's owned copy now holds τ


def test_tall_and_consensus_masks_and_sign_agreement_by_hand():
    tau, multitask = torch.tensor([1.0, 0.1, 0.0, -1.0]), torch.tensor([2.0, 0.2, 0.3, -2.0])
    # |τ| > λ|τ_MTL − τ| with λ = 1: 1 > 1 no (strict), .1 > .1 no, 0 > .3 no, 1 > 1 no; λ = 0.5: yes yes no yes
    assert ops.tall_mask(tau, multitask, 1.0).tolist() == [False, False, False, False]
    assert ops.tall_mask(tau, multitask, 0.5).tolist() == [True, True, False, True]
    masks = [torch.tensor([True, False, True]), torch.tensor([True, True, False]), torch.tensor([False, False, True])]
    assert ops.consensus_mask(masks, 2).tolist() == [True, False, True]
    trimmed = torch.tensor([[1.0, -1.0, 0.0], [-2.0, -1.0, 3.0]])
    signs = torch.tensor([-1.0, -1.0, 1.0])
    assert ops.sign_agreement(trimmed, signs).tolist() == [[False, True, False], [True, True, True]]


def test_radix_histograms_count_every_entry_and_split_by_bits():
    values = torch.tensor([[1.0, -1.5, 2.0, 1.0 + 2**-20]])
    assert ops.magnitude_bits(values)[0, 1] == torch.tensor(1.5).view(torch.int32)  # sign dropped
    high = ops.radix_histogram(values)
    assert high.shape == (1, 65536) and int(high.sum()) == 4
    one_bin = int(torch.tensor(1.0).view(torch.int32)) >> 16
    assert int(high[0, one_bin]) == 2  # 1.0 and 1 + 2^-20 share their high 16 bits
    low = ops.radix_histogram(values, torch.tensor([one_bin]))
    assert int(low.sum()) == 2
    assert int(low[0, 0]) == 1 and int(low[0, 8]) == 1  # 1.0 has low bits 0; 1 + 2^-20 has 2^3 (23 − 20)
    bins, within = ops.locate_rank(high, torch.tensor([2]))
    assert int(bins[0]) == one_bin and int(within[0]) == 2
    with pytest.raises(MergelabError, match="outside"):
        ops.locate_rank(high, torch.tensor([5]))
    with pytest.raises(MergelabError, match="float32"):
        ops.magnitude_bits(values.double())


def test_bits_to_float_round_trips():
    values = torch.tensor([0.0, 1e-40, 0.3, 7.0, 3.4e38])
    bits = values.view(torch.int32).to(torch.int64)
    assert torch.equal(ops.bits_to_float(bits >> 16, bits & 0xFFFF), values)


def test_dare_mask_is_a_deterministic_function_of_seed_model_and_name():
    shape = (64, 32)
    first = ops.dare_keep_mask(shape, 0.5, 0, 1, "layer.weight")
    assert torch.equal(first, ops.dare_keep_mask(shape, 0.5, 0, 1, "layer.weight"))
    assert not torch.equal(first, ops.dare_keep_mask(shape, 0.5, 1, 1, "layer.weight"))
    assert not torch.equal(first, ops.dare_keep_mask(shape, 0.5, 0, 2, "layer.weight"))
    assert not torch.equal(first, ops.dare_keep_mask(shape, 0.5, 0, 1, "layer.bias"))
    assert ops.dare_seed(3, 1, "x") == ops.dare_seed(3, 1, "x") != ops.dare_seed(3, 1, "y")
    assert ops.dare_keep_mask(shape, 0.0, 0, 0, "w").all()
    kept = ops.dare_keep_mask((200, 200), 0.9, 7, 0, "w").float().mean().item()
    assert abs(kept - 0.1) < 0.01  # Bernoulli(1 − p): 40k draws, std ≈ 0.0015


def test_dare_drop_rescales_the_kept_entries():
    tau = torch.tensor([1.0, -2.0, 3.0, 4.0])
    keep = torch.tensor([True, False, True, False])
    assert ops.dare_drop(tau.clone(), keep, 0.75, True).tolist() == [4.0, 0.0, 12.0, 0.0]
    assert ops.dare_drop(tau.clone(), keep, 0.75, False).tolist() == [1.0, 0.0, 3.0, 0.0]
    assert torch.equal(ops.dare_drop(tau, torch.ones(4, dtype=torch.bool), 0.0, True), tau)


def test_rank_choice_from_ratio_and_energy():
    assert ops.rank_from_ratio((768, 3072), 0.12) == 92  # CART ViT-B/32 example
    assert ops.rank_from_ratio((10, 4), 0.01) == 1  # at least 1
    assert ops.rank_from_ratio((10, 4), 1.0) == 4
    sigma = torch.tensor([3.0, 2.0, 1.0])  # σ² = 9, 4, 1; shares 9/14 = .64, 13/14 = .93, 1
    assert ops.rank_from_energy(sigma, 0.5) == 1
    assert ops.rank_from_energy(sigma, 0.9) == 2
    assert ops.rank_from_energy(sigma, 0.95) == 3
    assert ops.rank_from_energy(sigma, 1.0) == 3
    assert ops.rank_from_energy(torch.zeros(3), 0.5) == 1


def test_truncated_svd_is_the_best_rank_r_approximation():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(12, 7, generator=generator)
    sigma = torch.linalg.svdvals(matrix)
    for rank in (1, 3, 6):
        approx = ops.truncated_svd(matrix, rank=rank)
        assert int(torch.linalg.matrix_rank(approx)) == rank
        tail = math.sqrt(float((sigma[rank:] ** 2).sum()))  # Eckart–Young
        assert abs(float(torch.linalg.norm(matrix - approx)) - tail) < 1e-4
    assert torch.equal(ops.truncated_svd(matrix, rank=7), matrix)  # full rank: no SVD
    energy = float((sigma[:2] ** 2).sum() / (sigma**2).sum())
    torch.testing.assert_close(ops.truncated_svd(matrix, energy=energy - 1e-4), ops.truncated_svd(matrix, rank=2))
    with pytest.raises(MergelabError, match="exactly one"):
        ops.truncated_svd(matrix)
    with pytest.raises(MergelabError, match="exactly one"):
        ops.truncated_svd(matrix, rank=2, energy=0.5)
    with pytest.raises(MergelabError, match="2-D"):
        ops.truncated_svd(torch.ones(3), rank=1)


@pytest.mark.parametrize("majority", [1.0, -1.0, 0.0])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_row_wise_disjoint_merge_equals_the_stacked_one_bit_for_bit(majority, mode):
    generator = torch.Generator().manual_seed(3)
    rows = [torch.round(torch.randn(5000, generator=generator) * 2) / 4 for _ in range(4)]  # exact zeros and cancellations
    rows[1][:50] = -rows[0][:50]
    stacked = torch.stack(rows)
    expected = ops.disjoint_merge(stacked, ops.resolve_zero_signs(ops.elect_signs(stacked), majority), mode)
    got = ops.disjoint_merge_rows(rows, majority, mode)
    assert torch.equal(got, expected) and bool(((ops.row_sum(rows) == 0) & (stacked != 0).any(0)).any())
    assert ops.sign_total_rows(rows) == ops.sign_total(ops.elect_signs(stacked))


def test_bracket_from_a_sample_and_band_cut_by_hand():
    sample = torch.arange(1.0, 101.0)  # |x| = 1..100; keep 20 %: κ = 81, the 20th largest
    bracket = ops.Bracket.guess(sample, 0.2)
    # m = 100, centre 20, margin 4·√(0.2·0.8·100) + 8 = 24: no rank above → high = +inf; below rank 44 → low = 57
    assert (bracket.low, bracket.high) == (57.0, float("inf"))
    band = bracket.inside(torch.cat([sample, -sample[:10]]))  # signs do not matter; 1..10 lie below the band
    assert band.tolist() == list(map(float, range(57, 101)))
    assert ops.band_cut(band, 0, 20) == (torch.tensor(81.0), 19, 1)
    assert ops.band_cut(band, 0, 45) is None  # κ below the band: the bracket missed


def test_sample_rows_takes_the_same_odd_strided_positions_of_every_row():
    base = torch.arange(100.0)
    models = [base + torch.linspace(-1, 1, 100) * (t + 1) for t in range(3)]
    rows = [ops.TaskRow(m, base) for m in models]
    samples = ops.sample_rows(rows, target=10)  # stride 100 // 10 = 10, made odd: 11
    for sample, model in zip(samples, models, strict=True):
        assert torch.equal(sample, (model - base)[::11].abs())
    owned = ops.sample_rows([ops.TaskRow(m - base) for m in models], target=10)
    assert all(torch.equal(a, b) for a, b in zip(owned, samples, strict=True))


def test_sample_target_grows_as_the_two_thirds_power_of_the_row():
    assert ops.sample_target(1000) == ops.SAMPLE_TARGET
    assert ops.sample_target(11_534_336) == round((2 * 11_534_336) ** (2 / 3))  # ≈ 81K
    assert 250_000 < ops.sample_target(65_536_000) < 260_000
