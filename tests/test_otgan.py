"""otgan.py: the Sinkhorn plan against matrix scaling and exact optimal transport, the energy distance, and runs."""

import itertools
import json

import pytest
import torch

import otgan
from conftest import (
    assert_divergence_stops_at_the_last_good_checkpoint,
    assert_same_weights,
    needs_inception,
    needs_mnist,
    only_run_dir,
    run_script,
    tiny_mnist_flags,
)


def random_cost(n: int, m: int, seed: int) -> torch.Tensor:
    """Cosine costs (in [0, 2]) between random unit vectors, as the critic's embeddings give."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, 4, generator=generator), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, 4, generator=generator), dim=1)
    return otgan.cosine_cost(x, y)


@pytest.mark.parametrize("n, m", [(6, 6), (7, 4)])
def test_sinkhorn_plan_has_uniform_marginals_and_equals_plain_matrix_scaling(n, m):
    cost, eps = random_cost(n, m, seed=n), 0.1
    plan = otgan.sinkhorn_plan(cost, eps, iters=300)
    torch.testing.assert_close(plan.sum(1), torch.full((n,), 1 / n), rtol=0, atol=1e-4)
    torch.testing.assert_close(plan.sum(0), torch.full((m,), 1 / m), rtol=0, atol=1e-4)
    # The textbook form (Cuturi 2013) in float64, fine at this eps: M = diag(a) K diag(b), K = exp(-C / eps).
    kernel, a, b = torch.exp(-cost.double() / eps), torch.ones(n, dtype=torch.double), torch.ones(m, dtype=torch.double)
    for _ in range(300):
        a = (1 / n) / (kernel @ b)
        b = (1 / m) / (kernel.T @ a)
    torch.testing.assert_close(plan.double(), a[:, None] * kernel * b[None, :], rtol=1e-4, atol=1e-6)


def test_sinkhorn_distance_approaches_the_exact_assignment_cost_as_eps_shrinks():
    cost = random_cost(6, 6, seed=0)
    # With uniform marginals of equal size an optimal plan is a permutation (Birkhoff): try all 720.
    exact = min(sum(cost[i, j] for i, j in enumerate(p)).item() / 6 for p in itertools.permutations(range(6)))
    gaps = []
    for eps in (0.3, 0.1, 0.03, 0.01):
        plan = otgan.sinkhorn_plan(cost, eps, iters=2000)
        gaps.append((plan * cost).sum().item() - exact)
    assert all(gap > -1e-5 for gap in gaps)  # a feasible plan never beats the optimum
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3 < gaps[0]


def test_sinkhorn_survives_an_eps_where_exp_of_minus_cost_over_eps_underflows():
    cost = random_cost(5, 5, seed=1) + 1.0  # costs in [1, 3]: exp(-cost / 1e-3) is 0 in float32
    plan = otgan.sinkhorn_plan(cost, eps=1e-3, iters=500)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(0), torch.full((5,), 0.2), rtol=0, atol=1e-4)


def test_energy_distance_is_zero_for_identical_batches_and_only_positive_between_different_distributions():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    assert otgan.sinkhorn_distance(x, x, eps=0.01, iters=200) < 1e-3  # each point is its own match
    assert otgan.minibatch_energy_distance(x, x, x, x, eps=0.01, iters=200).abs() < 1e-6

    def energy(shift: float) -> torch.Tensor:
        """D^2 over 50 draws of four batches: reals from N(0, I), fakes from N(shift * e_0, I), then normalised."""
        offset = torch.zeros(8)
        offset[0] = shift
        draws = []
        for _ in range(50):
            x, x2, y, y2 = (torch.randn(16, 8) + (offset if k >= 2 else 0) for k in range(4))
            batches = (torch.nn.functional.normalize(b, dim=1) for b in (x, x2, y, y2))
            draws.append(otgan.minibatch_energy_distance(*batches, eps=0.1, iters=100))
        return torch.stack(draws)

    same, different = energy(0.0), energy(1.5)
    assert same.mean().abs() < 3 * same.std() / 50**0.5  # unbiased: zero in expectation for matching distributions
    assert different.mean() > 10 * different.std() / 50**0.5


def test_generator_gradient_flows_through_the_cost_not_the_plan():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(8, 5), dim=1)
    y = torch.nn.functional.normalize(torch.randn(8, 5), dim=1).requires_grad_()
    grad = torch.autograd.grad(otgan.sinkhorn_distance(x, y, eps=0.05, iters=200), y)[0]
    plan = otgan.sinkhorn_plan(otgan.cosine_cost(x, y), eps=0.05, iters=200)
    torch.testing.assert_close(grad, -(plan.T @ x))  # d/dy_j of sum_ij M_ij (1 - x_i . y_j), M held fixed


# --- end to end, tiny budgets --------------------------------------------------------------------------------------


def train(tmp_path, cache_dir, *extra, check=True):
    """128 images in steps of two real batches of 16: 4 steps per epoch, each logged."""
    flags = [*tiny_mnist_flags(cache_dir), "--batch-size", 16, "--log-every", 1, "--sinkhorn-iters", 20, "--n-gen", 2]
    return run_script("otgan.py", *flags, *extra, cwd=tmp_path, check=check)


@needs_mnist
@needs_inception
def test_otgan_alternates_critic_and_generator_steps_and_resumes_like_an_uninterrupted_run(tmp_path, cache_dir):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    interrupted.mkdir(), straight.mkdir()
    train(interrupted, cache_dir, "--epochs", 1, "--bf16")
    run_dir = only_run_dir(interrupted)
    resumed = train(interrupted, cache_dir, "--epochs", 2, "--bf16", "--resume", run_dir / "checkpoint.pt")
    assert "at epoch 1, step 4" in resumed.stdout
    train(straight, cache_dir, "--epochs", 2, "--bf16")
    after_resume = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    uninterrupted = torch.load(only_run_dir(straight) / "checkpoint.pt", weights_only=True)
    assert_same_weights(uninterrupted, after_resume, "generator", "critic")
    # 8 steps with --n-gen 2: the critic takes steps 0, 3, 6 and the generator the other five (Adam counts them).
    critic_steps = {state["step"].item() for state in after_resume["optimizer_c"]["state"].values()}
    generator_steps = {state["step"].item() for state in after_resume["optimizer_g"]["state"].values()}
    assert critic_steps == {3} and generator_steps == {5}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["final"]) >= {"fid", "precision", "recall"} and metrics["step"] == 8
    assert (run_dir / "samples_epoch002.png").exists()
    absurd = [*tiny_mnist_flags(cache_dir), "--batch-size", 16, "--sinkhorn-iters", 20, "--epochs", 3, "--lr", 1e38]
    assert_divergence_stops_at_the_last_good_checkpoint("otgan.py", run_dir, tmp_path / "diverged", *absurd)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    result = train(tmp_path, cache_dir, "--epochs", 2, "--resume", corrupt, check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"error: {corrupt} is not a readable otgan checkpoint (corrupt or from another program)"
    ]
