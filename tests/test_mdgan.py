"""mdgan.py: the simplex mixture, its likelihood and lambda against closed forms and torch.distributions, the
losses' direction, and smoke runs on grid9 and MNIST."""

import json
import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import mdgan
from conftest import (
    assert_divergence_stops_at_the_last_good_checkpoint,
    needs_inception,
    needs_mnist,
    only_run_dir,
    run_script,
    tiny_mnist_flags,
)


@pytest.mark.parametrize("dim", [1, 2, 9])
def test_simplex_centres_are_equidistant_unit_vectors_around_the_origin(dim):
    centres = mdgan.simplex_centres(dim)
    assert centres.shape == (dim + 1, dim)
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(dim + 1))
    torch.testing.assert_close(centres.mean(0), torch.zeros(dim), atol=1e-6, rtol=0)
    distances = torch.cdist(centres, centres)[~torch.eye(dim + 1, dtype=torch.bool)]
    # Unit vectors with pairwise cosine -1/d: squared distance 2 + 2/d.
    torch.testing.assert_close(distances, torch.full_like(distances, math.sqrt(2 + 2 / dim)))


def torch_distributions_likelihood(points, centres, variance):
    """The mixture density from torch.distributions, component by component: an independent computation."""
    dim = centres.shape[1]
    components = [MultivariateNormal(mu.double(), variance * torch.eye(dim, dtype=torch.float64)) for mu in centres]
    return torch.stack([c.log_prob(points.double()).exp() for c in components]).mean(0)


def test_likelihood_matches_torch_distributions_and_the_closed_form_at_a_centre():
    centres, variance = mdgan.simplex_centres(9), 0.25
    points = torch.randn(50, 9, generator=torch.Generator().manual_seed(0)) * 0.7
    ours = mdgan.mixture_log_likelihood(points, centres, variance).exp().double()
    torch.testing.assert_close(ours, torch_distributions_likelihood(points, centres, variance), rtol=1e-5, atol=0)
    at_centre = mdgan.mixture_log_likelihood(centres[:1], centres, variance).exp().item()
    peak = (2 * math.pi * variance) ** -4.5  # N(mu; mu, variance I) in 9 dimensions
    closed_form = (peak + 9 * peak * math.exp(-(2 + 2 / 9) / (2 * variance))) / 10
    assert at_centre == pytest.approx(closed_form, rel=1e-5)


def test_lambda_is_the_maximum_and_sits_at_a_centre():
    centres, variance = mdgan.simplex_centres(9), mdgan.MNIST_DEFAULTS["cov_scale"]
    lam = mdgan.max_likelihood(centres, variance)
    at_centres = mdgan.mixture_log_likelihood(centres, centres, variance).exp()
    assert (at_centres <= lam).all() and lam == pytest.approx(at_centres[0].item(), rel=1e-3)
    # Gradient ascent from 64 random starts never beats lambda and converges next to a centre.
    points = (torch.randn(64, 9, generator=torch.Generator().manual_seed(1)) * 0.5).requires_grad_()
    optimizer = torch.optim.Adam([points], lr=0.02)
    for _ in range(600):
        optimizer.zero_grad()
        (-mdgan.mixture_log_likelihood(points, centres, variance).sum()).backward()
        optimizer.step()
    found = mdgan.mixture_log_likelihood(points.detach(), centres, variance).exp()
    assert found.max() <= lam * (1 + 1e-6) and found.max() >= lam * (1 - 1e-4)
    assert torch.cdist(points.detach()[found.argmax()].unsqueeze(0), centres).min() < 0.05


def test_with_the_authors_wider_components_lambda_is_found_at_the_origin():
    centres, variance = mdgan.simplex_centres(9), mdgan.TOY_DEFAULTS["cov_scale"]
    at_origin = mdgan.mixture_log_likelihood(torch.zeros(1, 9), centres, variance).exp().item()
    at_centre = mdgan.mixture_log_likelihood(centres[:1], centres, variance).exp().item()
    assert at_origin > at_centre and mdgan.max_likelihood(centres, variance) == pytest.approx(at_origin, rel=1e-6)


def test_losses_pull_real_and_fake_embeddings_the_intended_ways():
    centres, variance = mdgan.simplex_centres(2), 0.25
    lam = mdgan.max_likelihood(centres, variance)
    near = (centres[:1] * 0.8).requires_grad_()
    mdgan.generator_loss(near, centres, variance, lam).backward()
    moved = near.detach() - 0.01 * near.grad  # a gradient step of G's loss moves the fake towards the centre
    assert (moved - centres[0]).norm() < (near.detach() - centres[0]).norm()
    # D's loss: lower with real on a centre and fake far away than the other way round.
    far = torch.tensor([[3.0, 3.0]])
    good = mdgan.discriminator_loss(centres[:1], far, centres, variance, lam)
    bad = mdgan.discriminator_loss(far, centres[:1], centres, variance, lam)
    assert good < bad and torch.isfinite(bad)
    lk_real = torch_distributions_likelihood(centres[:1], centres, variance)
    assert good.item() == pytest.approx(-(math.log(lk_real.item()) + math.log(mdgan.LOG_EPS + lam)), rel=1e-4)


def test_latent_noise_is_the_asked_distribution():
    uniform = mdgan.latent_noise(20000, 2, "uniform", generator=torch.Generator().manual_seed(0))
    normal = mdgan.latent_noise(20000, 2, "normal", generator=torch.Generator().manual_seed(0))
    assert uniform.shape == normal.shape == (20000, 2)
    assert uniform.min() >= -1 and uniform.max() <= 1
    assert uniform.var(0) == pytest.approx(torch.full((2,), 1 / 3), abs=0.02)  # Var U(-1, 1) = 1/3
    assert normal.abs().max() > 3 and normal.var(0) == pytest.approx(torch.ones(2), abs=0.05)


def test_lr_halving_schedule_reaches_the_optimisers(tmp_path):
    assert [mdgan.scheduled_lr(1e-3, step, 10) for step in (0, 9, 10, 25)] == [1e-3, 1e-3, 5e-4, 2.5e-4]
    assert mdgan.scheduled_lr(1e-3, 10**6, 0) == 1e-3  # --lr-halve-every 0: constant
    flags = [
        "--dataset", "grid9", "--toy-steps-per-epoch", 20, "--batch-size", 32, "--eval-samples", 100,
        "--lr-halve-every", 35, "--lr-g", 1e-3, "--lr-d", 2e-3,
    ]  # fmt: skip
    run_script("mdgan.py", *flags, "--epochs", 2, cwd=tmp_path)
    checkpoint = only_run_dir(tmp_path) / "checkpoint.pt"
    saved = torch.load(checkpoint, weights_only=True)  # 40 steps: halved once, at step 35
    assert saved["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
    assert saved["optimizer_d"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    run_script("mdgan.py", *flags, "--epochs", 3, "--resume", checkpoint, cwd=tmp_path)
    saved = torch.load(checkpoint, weights_only=True)  # steps 41-60 cross no halving: the resume set the rate
    assert saved["global_step"] == 60 and saved["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(5e-4)


def test_grid9_smoke_run_and_resume_guard(tmp_path):
    toy_flags = ["--dataset", "grid9", "--toy-steps-per-epoch", 20, "--batch-size", 64, "--eval-samples", 500]
    result = run_script("mdgan.py", *toy_flags, "--epochs", 1, "--log-every", 10, cwd=tmp_path)
    assert "lambda = " in result.stdout and "modes covered" in result.stdout.strip().splitlines()[-1]
    assert "note: at --cov-scale 0.25 the components merge" in result.stdout  # the 2-D default is the authors' 0.25
    run_dir = only_run_dir(tmp_path)
    assert (run_dir / "samples_epoch001.png").exists() and (run_dir / "metrics.json").exists()
    run_args = json.loads((run_dir / "metrics.json").read_text())["args"]
    assert run_args["latent"] == "normal" and run_args["lr_halve_every"] == 10000  # the authors' 2-D schedule
    absurd = [*toy_flags, "--epochs", 2, "--lr-g", 1e38, "--lr-d", 1e38]
    assert_divergence_stops_at_the_last_good_checkpoint("mdgan.py", run_dir, tmp_path / "diverged", *absurd)
    checkpoint = run_dir / "checkpoint.pt"
    result = run_script(
        "mdgan.py", *toy_flags, "--epochs", 2, "--resume", checkpoint, "--latent", "uniform", cwd=tmp_path, check=False
    )
    assert result.returncode != 0 and "trained with --latent normal" in result.stderr.strip().splitlines()[-1]
    earlier_nets = torch.load(checkpoint, weights_only=True)
    del earlier_nets["toy_output_bound"]  # what a checkpoint of the linear-output 2-D generator looked like
    torch.save(earlier_nets, checkpoint)
    result = run_script("mdgan.py", *toy_flags, "--epochs", 2, "--resume", checkpoint, cwd=tmp_path, check=False)
    assert result.returncode != 0 and "earlier 2-D nets" in result.stderr.strip().splitlines()[-1]


@needs_mnist
@needs_inception
def test_mnist_smoke_run_reports_fid(tmp_path, cache_dir):
    result = run_script("mdgan.py", "--dataset", "mnist", "--epochs", 1, *tiny_mnist_flags(cache_dir), cwd=tmp_path)
    assert "FID" in result.stdout.strip().splitlines()[-1]
    assert "note:" not in result.stdout  # MNIST's default 0.1: lk peaks at the centres
