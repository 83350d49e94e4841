"""The evaluator's math against independent computations."""

import math

import numpy as np
import pytest
import torch

import eval_fid


def features_with_exact_moments(mean: torch.Tensor, std: torch.Tensor, n: int = 500, seed: int = 0) -> torch.Tensor:
    """n points whose empirical mean is `mean` and empirical covariance is diag(std^2), exactly."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # whiten: identity covariance
    return mean + z * std


def test_frechet_distance_of_identical_sets_is_zero():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    assert eval_fid.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_gaussians():
    mean_a, std_a = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5, 3.0])
    mean_b, std_b = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([2.0, 2.0, 1.0, 0.1])
    a, b = features_with_exact_moments(mean_a, std_a, seed=2), features_with_exact_moments(mean_b, std_b, seed=3)
    # Diagonal covariances commute: Tr(S_a + S_b - 2 sqrt(S_a S_b)) = sum (s_a - s_b)^2.
    expected = ((mean_a - mean_b) ** 2).sum() + ((std_a.double() - std_b.double()) ** 2).sum()
    assert eval_fid.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("count_a, count_b, dims", [(300, 200, 8), (7, 5, 10)])  # d-space and sample-space paths
def test_frechet_distance_matches_pytorch_fids_sqrtm(count_a, count_b, dims):
    from pytorch_fid.fid_score import calculate_frechet_distance

    generator = torch.Generator().manual_seed(count_a)
    a = torch.randn(count_a, dims, generator=generator, dtype=torch.float64)
    a = a @ torch.randn(dims, dims, generator=generator, dtype=torch.float64)
    b = 1.5 * torch.randn(count_b, dims, generator=generator, dtype=torch.float64) + 0.3
    moments = [(x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False)) for x in (a, b)]
    expected = calculate_frechet_distance(*moments[0], *moments[1])
    assert eval_fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_knn_radii_match_a_brute_force_loop():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = []
    for i in range(len(x)):
        others = [((x[i] - x[j]) ** 2).sum().item() for j in range(len(x)) if j != i]
        expected.append(sorted(others)[2])  # third nearest neighbour
    radii = eval_fid.knn_radii(x, k=3, chunk=7)  # small chunks exercise the chunking
    np.testing.assert_allclose(radii.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_precision_recall_of_a_set_against_itself_is_one():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(5))
    assert eval_fid.precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_of_disjoint_clusters_is_zero():
    gen = torch.Generator().manual_seed(6)
    real, fake = torch.randn(100, 16, generator=gen), torch.randn(100, 16, generator=gen) + 100.0
    assert eval_fid.precision_recall(real, fake) == (0.0, 0.0)


def test_precision_counts_the_share_of_fakes_on_the_real_manifold():
    gen = torch.Generator().manual_seed(7)
    real = torch.randn(100, 16, generator=gen)
    fake = torch.cat([real[:50], torch.randn(50, 16, generator=gen) + 100.0])  # half on, half far off
    precision, _ = eval_fid.precision_recall(real, fake)
    assert precision == 0.5


def test_precision_recall_needs_more_than_k_points():
    x = torch.randn(3, 4)
    with pytest.raises(eval_fid.EvalError, match="more than 3"):
        eval_fid.precision_recall(x, x, k=3)


def test_class_coverage_counts_digits_and_kl():
    uniform = eval_fid.class_coverage(torch.arange(10).repeat(30))
    assert uniform["class_histogram"] == [30] * 10
    assert uniform["digits_covered"] == 10 and uniform["kl_to_uniform"] == pytest.approx(0.0, abs=1e-12)
    collapsed = eval_fid.class_coverage(torch.full((100,), 7))
    assert collapsed["digits_covered"] == 1 and collapsed["kl_to_uniform"] == pytest.approx(math.log(10))
    # 4% of the samples is less than half the fair share of 10%: not covered.
    mostly = eval_fid.class_coverage(torch.cat([torch.zeros(96, dtype=torch.long), torch.ones(4, dtype=torch.long)]))
    assert mostly["digits_covered"] == 1


@pytest.mark.parametrize(
    "samples, expected",
    [
        (torch.tensor([[[0, 255]], [[51, 102]]], dtype=torch.uint8), [[0.0, 1.0], [0.2, 0.4]]),
        (torch.tensor([[[-1.0, 1.0]], [[0.0, 0.5]]]), [[0.0, 1.0], [0.5, 0.75]]),
    ],
)
def test_to_unit_range_reads_uint8_and_tanh_ranges(samples, expected):
    out = eval_fid.to_unit_range(samples)
    assert out.shape == (2, 1, 1, 2)
    np.testing.assert_allclose(out.flatten(1).numpy(), expected, atol=1e-6)


def mmd2_by_loops(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 written out pair by pair, with the cubic kernel (a.b / d + 1)^3."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return within - 2 * across


def test_polynomial_mmd2_equals_the_pairwise_sum():
    draws = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, 4, generator=draws, dtype=torch.float64), torch.randn(12, 4, generator=draws) + 0.3
    assert eval_fid.polynomial_mmd2(x, y) == pytest.approx(mmd2_by_loops(x, y.double()), rel=1e-10)


def test_kid_of_two_draws_of_one_distribution_is_zero_within_its_spread_and_positive_for_a_shift():
    draws = torch.Generator().manual_seed(6)
    a, b = torch.randn(2000, 16, generator=draws), torch.randn(2000, 16, generator=draws)
    mean, std = eval_fid.kernel_inception_distance(a, b, num_subsets=50, subset_size=500)
    assert abs(mean) < 3 * std and std > 0
    shifted, shifted_std = eval_fid.kernel_inception_distance(a, b + 0.5, num_subsets=50, subset_size=500)
    assert shifted > 10 * shifted_std


def test_kid_uses_smaller_subsets_for_small_sets_and_each_full_subset_gives_the_same_value():
    draws = torch.Generator().manual_seed(7)
    a, b = torch.randn(30, 5, generator=draws, dtype=torch.float64), torch.randn(40, 5, generator=draws) * 1.5
    mean, std = eval_fid.kernel_inception_distance(a[:30], b[:30].double(), num_subsets=4)  # subsets of 30 = whole sets
    assert mean == pytest.approx(mmd2_by_loops(a, b[:30].double()), rel=1e-10) and std == pytest.approx(0, abs=1e-12)
    eval_fid.kernel_inception_distance(a, b, num_subsets=2)  # 30 vs 40: subsets of 30, no error


def test_kid_matches_torch_fidelity_on_the_same_features():
    metric_kid = pytest.importorskip("torch_fidelity.metric_kid")
    draws = torch.Generator().manual_seed(8)
    real, fake = torch.randn(300, 64, generator=draws, dtype=torch.float64), torch.randn(300, 64, generator=draws) + 0.1
    fake = fake.double()
    ours, _ = eval_fid.kernel_inception_distance(real, fake, num_subsets=3, subset_size=300)
    theirs = metric_kid.kid_features_to_metric(real, fake, kid_subsets=3, kid_subset_size=300, verbose=False)
    assert ours == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
