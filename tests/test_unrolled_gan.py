"""unrolled_gan.py: the surrogate D_K and its generator gradient against torch's own Adam and finite differences,
the 2-D mixtures and their mode metrics, and smoke runs on ring8 and MNIST."""

import copy
import json
import math

import pytest
import rescore_toy_checkpoints
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import unrolled_gan as ug
from conftest import (
    assert_divergence_stops_at_the_last_good_checkpoint,
    needs_inception,
    needs_mnist,
    only_run_dir,
    run_script,
    tiny_mnist_flags,
)


class TinyDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


@pytest.fixture
def tiny_problem():
    """float64 nets, a D that has already taken one Adam step (so the unroll starts from non-zero moments).
    eps is tiny so that our sqrt(v + eps^2) and torch's sqrt(v) + eps denominators agree to rounding."""
    torch.manual_seed(0)
    generator = nn.Linear(3, 2).double()
    discriminator = TinyDiscriminator().double()
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=0.05, betas=(0.5, 0.999), eps=1e-12)
    real, z = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    ug.discriminator_loss(*discriminator(torch.cat([real, generator(z).detach()])).split(8)).backward()
    optimizer.step()
    discriminator.requires_grad_(False)
    return generator, discriminator, optimizer, real, z


def unrolled_by_torch_adam(discriminator, optimizer, real, fake, steps, lr=None):
    """An independent D_K: a copy of D stepped K times by torch.optim.Adam from the same optimizer state."""
    copy_d = copy.deepcopy(discriminator).requires_grad_(True)
    copy_opt = torch.optim.Adam(copy_d.parameters())
    copy_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # load_state_dict would share the moments
    if lr is not None:
        copy_opt.param_groups[0]["lr"] = lr
    for _ in range(steps):
        copy_opt.zero_grad()
        ug.discriminator_loss(*copy_d(torch.cat([real, fake.detach()])).split(len(real))).backward()
        copy_opt.step()
    return copy_d.requires_grad_(False)


@pytest.mark.parametrize("unroll_lr", [None, 0.01])  # None: D's own learning rate
def test_unrolled_parameters_equal_k_steps_of_torch_adam(tiny_problem, unroll_lr):
    generator, discriminator, optimizer, real, z = tiny_problem
    fake = generator(z)
    ours = ug.unrolled_parameters(discriminator, optimizer, real, fake, steps=3, lr=unroll_lr)
    theirs = dict(unrolled_by_torch_adam(discriminator, optimizer, real, fake, 3, unroll_lr).named_parameters())
    for name, value in ours.items():
        torch.testing.assert_close(value.detach(), theirs[name], rtol=0, atol=1e-9)  # eps^2 vs eps: ~1e-11 here
        assert not torch.equal(value.detach(), dict(discriminator.named_parameters())[name])


def test_k1_generator_gradient_flows_through_the_update_and_matches_finite_differences(tiny_problem):
    generator, discriminator, optimizer, real, z = tiny_problem

    def surrogate_by_torch_adam() -> float:  # f_1(theta_G), evaluated without any autograd through the update
        fake = generator(z)
        unrolled = unrolled_by_torch_adam(discriminator, optimizer, real, fake, steps=1)
        return ug.generator_loss(unrolled(fake)).item()

    def autograd_gradient(steps: int) -> torch.Tensor:
        generator.zero_grad()
        fake = generator(z)
        params = ug.unrolled_parameters(discriminator, optimizer, real, fake, steps)
        ug.generator_loss(functional_call(discriminator, params, (fake,))).backward()
        return generator.weight.grad.clone()

    numeric = torch.zeros_like(generator.weight).view(-1)
    weight = generator.weight.data.view(-1)  # perturbed in place, outside autograd
    for index in range(len(weight)):
        original = weight[index].item()
        values = []
        for shift in (1e-6, -1e-6):
            weight[index] = original + shift
            values.append(surrogate_by_torch_adam())
        weight[index] = original
        numeric[index] = (values[0] - values[1]) / 2e-6
    numeric = numeric.view_as(generator.weight)
    unrolled_gradient = autograd_gradient(steps=1)
    torch.testing.assert_close(unrolled_gradient, numeric, rtol=1e-4, atol=1e-7)
    plain_gradient = autograd_gradient(steps=0)
    # A detached copy of D_1 would miss the d(theta_D^1)/d(theta_G) term: check that the term is really there.
    fake = generator(z)
    detached = unrolled_by_torch_adam(discriminator, optimizer, real, fake, steps=1)
    generator.zero_grad()
    ug.generator_loss(detached(generator(z))).backward()
    for other in (plain_gradient, generator.weight.grad):
        assert (unrolled_gradient - other).abs().max() > 1e-3 * unrolled_gradient.abs().max()


def test_minimax_generator_loss_is_the_saddle_objectives_fake_term():
    logits = 3 * torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ug.minimax_generator_loss(logits), torch.log(1 - torch.sigmoid(logits)).mean())
    # The authors' code gives G the gradient of minus D's loss; the real term does not depend on G.
    real_logits = torch.randn(32, dtype=torch.float64)
    minus_d_loss = -ug.discriminator_loss(real_logits, logits) + F.softplus(-real_logits).mean()
    torch.testing.assert_close(ug.minimax_generator_loss(logits), minus_d_loss)


def test_scheduled_lr_halves_every_n_steps_or_stays_constant():
    assert [ug.scheduled_lr(1e-3, step, 10) for step in (0, 9, 10, 25)] == [1e-3, 1e-3, 5e-4, 2.5e-4]
    assert ug.scheduled_lr(1e-3, 10**6, 0) == 1e-3


def test_mixtures_have_the_papers_geometry():
    ring, ring_std = ug.mixture_modes("ring8")
    assert ring.shape == (8, 2) and ring_std == 0.02
    torch.testing.assert_close(ring.norm(dim=1), torch.full((8,), 2.0))
    grid, grid_std = ug.mixture_modes("grid25")
    assert grid.shape == (25, 2) and grid_std == 0.05 and set(grid[:, 0].tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    assert ug.mixture_modes("grid9")[0].shape == (9, 2)


def test_mixture_std_is_the_std_of_samples():
    torch.manual_seed(0)
    for name, closed_form in (("ring8", math.sqrt(2 + 0.02**2)), ("grid25", math.sqrt(8 + 0.05**2))):
        centres, std = ug.mixture_modes(name)
        assert ug.mixture_std(centres, std) == pytest.approx(closed_form)
        points = ug.sample_mixture(centres, std, 200_000)
        torch.testing.assert_close(points.std(0), torch.full((2,), closed_form), rtol=0.01, atol=0)


def test_standardized_run_scores_the_generators_points_scaled_back(tmp_path):
    """With --standardize G learns the mixture / std: the scored points are its outputs times the std, the rescoring
    tool scales a standardised checkpoint's outputs back the same way, and a checkpoint resumes only the way it was
    trained."""
    flags = [
        "--dataset", "grid9", "--standardize", "--unroll-steps", 1, "--toy-steps-per-epoch", 5, "--batch-size", 32,
        "--eval-samples", 200, "--epochs", 1, "--save-samples", tmp_path / "points",
    ]  # fmt: skip
    run_script("unrolled_gan.py", *flags, cwd=tmp_path)
    checkpoint = only_run_dir(tmp_path) / "checkpoint.pt"
    generator = ug.ToyGenerator(256)
    generator.load_state_dict(torch.load(checkpoint, weights_only=True)["generator"])
    noise = torch.randn(200, 256, generator=torch.Generator().manual_seed(1 + 1))  # the script's eval noise for seed 1
    centres, std = ug.mixture_modes("grid9")
    with torch.no_grad():
        expected = generator(noise) * ug.mixture_std(centres, std)
    torch.testing.assert_close(torch.load(tmp_path / "points" / "points.pt"), expected)
    one_mode = torch.load(checkpoint, weights_only=True)  # G set to output the first mode, in standardised units
    one_mode["generator"]["net.4.weight"].zero_()
    one_mode["generator"]["net.4.bias"].copy_(centres[0] / ug.mixture_std(centres, std))
    torch.save(one_mode, tmp_path / "one_mode.pt")
    _, (rescored,) = rescore_toy_checkpoints.rescore(str(tmp_path / "one_mode.pt"), noise_seeds=(7,), samples=200)
    assert (rescored["modes_covered"], rescored["high_quality"], rescored["samples_per_mode"][0]) == (1, 1.0, 200)
    unscaled = run_script("unrolled_gan.py", *flags[:1], "grid9", "--resume", checkpoint, cwd=tmp_path, check=False)
    assert unscaled.returncode == 2 and unscaled.stderr.strip() == (
        f"error: {checkpoint} was trained with --standardize; resume it the same way"
    )


def test_mode_coverage_counts_modes_and_high_quality_samples():
    centres, std = ug.mixture_modes("ring8")
    torch.manual_seed(0)
    perfect = ug.sample_mixture(centres, std, 8000)
    metrics = ug.mode_coverage(perfect, centres, std, min_share=0.01)
    # Within 3 std of its centre in 2-D: P(chi2_2 <= 9) = 1 - exp(-4.5) = 0.9889.
    assert metrics["modes_covered"] == 8 and metrics["high_quality"] == pytest.approx(1 - math.exp(-4.5), abs=0.004)
    # 3 modes only, plus 40% of the mass far from every mode; one mode with 0.5% of samples is below the 1% share.
    three = torch.cat([centres[:3].repeat_interleave(1000, 0), torch.zeros(2020, 2), centres[3:4].repeat(30, 1)])
    metrics = ug.mode_coverage(three, centres, std, min_share=0.01)
    assert metrics["modes_covered"] == 3 and metrics["samples_per_mode"][3] == 30
    assert metrics["high_quality"] == pytest.approx(3030 / 5050)


def test_scatter_image_puts_points_where_they_are():
    image = ug.scatter_image(torch.tensor([[-1.0, 1.0]]), torch.tensor([[1.0, -1.0]]), extent=2.0, size=101)
    assert image.shape == (3, 101, 101)
    grey, red = torch.tensor([0.6, 0.6, 0.6]), torch.tensor([0.85, 0.1, 0.1])
    torch.testing.assert_close(image[:, 25, 25], grey)  # upper left: x < 0, y > 0
    torch.testing.assert_close(image[:, 74, 74], red)  # lower right
    assert (image == 1).all(0).float().mean() > 0.99


def test_ring8_smoke_run_writes_metrics_scatter_plots_and_resumes(tmp_path):
    tiny = [
        "--dataset", "ring8", "--unroll-steps", 2, "--toy-steps-per-epoch", 20, "--batch-size", 64,
        "--eval-samples", 500, "--log-every", 10, "--generator-loss", "minimax", "--lr-halve-every", 15,
    ]  # fmt: skip
    result = run_script("unrolled_gan.py", *tiny, "--epochs", 1, cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert "modes covered" in result.stdout.strip().splitlines()[-1]
    g_losses = [float(line.split("g_loss ")[1].split()[0]) for line in result.stdout.splitlines() if "g_loss" in line]
    assert g_losses and all(value < 0 for value in g_losses)  # log(1 - D) < 0; the non-saturating loss is > 0
    assert (run_dir / "samples_epoch001.png").exists() and (run_dir / "best.pt").exists()
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # 20 steps: halved once, at step 15
    assert saved["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 2)
    resumed = run_script("unrolled_gan.py", *tiny, "--epochs", 2, "--resume", run_dir / "checkpoint.pt", cwd=tmp_path)
    assert "at epoch 1, step 20" in resumed.stdout
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # 40 steps: halved at steps 15 and 30
    assert saved["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 4)  # the 2-D defaults, quartered
    assert saved["optimizer_d"]["param_groups"][0]["lr"] == pytest.approx(1e-4 / 4)
    # Resuming sets the command line's rates at once: with no halving left, nothing else would replace the saved ones.
    run_script(
        "unrolled_gan.py",
        *tiny,
        "--epochs",
        3,
        "--lr-halve-every",
        0,
        "--lr-d",
        3e-5,
        "--resume",
        run_dir / "checkpoint.pt",
        cwd=tmp_path,
    )
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert saved["optimizer_d"]["param_groups"][0]["lr"] == pytest.approx(3e-5)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 60 and metrics["final"]["num_modes"] == 8 and len(metrics["history"]) == 3
    other_data = run_script(
        "unrolled_gan.py", *tiny, "--dataset", "grid9", "--resume", run_dir / "checkpoint.pt", cwd=tmp_path, check=False
    )
    assert other_data.returncode == 2 and "was trained with --dataset ring8" in other_data.stderr
    absurd = [*tiny, "--epochs", 4, "--lr-halve-every", 0, "--lr-g", 1e38, "--lr-d", 1e38]
    assert_divergence_stops_at_the_last_good_checkpoint("unrolled_gan.py", run_dir, tmp_path / "diverged", *absurd)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--unroll-steps", -1], "--unroll-steps must be 0 or more, got -1"),
        (["--batch-size", 0], "--batch-size and --toy-steps-per-epoch must be >= 1, got 0, 1000"),
        (["--lr-halve-every", -1], "--lr-halve-every must be >= 0 steps (0: constant), got -1"),
        (
            ["--dataset", "mnist", "--standardize"],
            "--standardize is for the 2-D mixtures; MNIST is already scaled to [-1, 1]",
        ),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, flags, message):
    result = run_script("unrolled_gan.py", *flags, cwd=tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {message}"


@needs_mnist
@needs_inception
def test_mnist_smoke_run_reports_fid(tmp_path, cache_dir):
    flags = ["--dataset", "mnist", "--unroll-steps", 1, "--epochs", 1, *tiny_mnist_flags(cache_dir)]
    result = run_script("unrolled_gan.py", *flags, cwd=tmp_path)
    assert "FID" in result.stdout.strip().splitlines()[-1]
