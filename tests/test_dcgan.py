"""dcgan.py: minibatch discrimination and virtual batch norm against direct computations, label targets, and runs."""

import json

import pytest
import torch

import dcgan
from conftest import (
    assert_divergence_stops_at_the_last_good_checkpoint,
    assert_same_weights,
    needs_inception,
    needs_mnist,
    only_run_dir,
    run_script,
    tiny_mnist_flags,
)


def minibatch_features_by_loop(features: torch.Tensor, T: torch.Tensor, num_kernels: int, kernel_dim: int):
    """Salimans et al. 2016, section 3.2, one sample and one kernel at a time."""
    M = (features @ T).view(len(features), num_kernels, kernel_dim)
    out = torch.zeros(len(features), num_kernels, dtype=features.dtype)
    for i in range(len(features)):
        for b in range(num_kernels):
            out[i, b] = sum(torch.exp(-(M[i, b] - M[j, b]).abs().sum()) for j in range(len(features)) if j != i)
    return torch.cat([features, out], dim=1)


def test_minibatch_discrimination_matches_a_loop_in_value_and_gradient():
    torch.manual_seed(0)
    layer = dcgan.MinibatchDiscrimination(in_features=6, num_kernels=4, kernel_dim=3).double()
    features = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    fast = layer(features)
    assert fast.shape == (5, 6 + 4)
    slow = minibatch_features_by_loop(features, layer.T, 4, 3)
    torch.testing.assert_close(fast, slow)
    weights = torch.randn_like(slow)
    grads_fast = torch.autograd.grad((fast * weights).sum(), (features, layer.T))
    grads_slow = torch.autograd.grad((slow * weights).sum(), (features, layer.T))
    for g_fast, g_slow in zip(grads_fast, grads_slow):
        torch.testing.assert_close(g_fast, g_slow)


def test_minibatch_discrimination_sees_a_collapsed_batch():
    layer = dcgan.MinibatchDiscrimination(in_features=6, num_kernels=4, kernel_dim=3)
    collapsed = layer(torch.randn(1, 6).repeat(8, 1))[:, 6:]
    assert torch.allclose(collapsed, torch.full_like(collapsed, 7.0))  # exp(0) for each of the 7 others
    spread = layer(100 * torch.randn(8, 6))[:, 6:]
    assert spread.max() < 0.1


def test_virtual_batch_norm_uses_only_the_reference_batch_and_the_sample_itself():
    torch.manual_seed(0)
    reference_size, eps = 4, 1e-5
    layer = dcgan.VirtualBatchNorm(channels=3, reference_size=reference_size, eps=eps)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 0.5])), layer.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    reference, batch = torch.randn(reference_size, 3, 5, 5), torch.randn(6, 3, 5, 5)
    out = layer(torch.cat([reference, batch]))[reference_size:]
    other_batch = torch.cat([batch[:1], 10 * torch.randn(5, 3, 5, 5) + 3])  # only sample 0 stays the same
    assert torch.equal(layer(torch.cat([reference, other_batch]))[reference_size], out[0])
    # The reference implementation's formula for sample 0, written out.
    x, new = batch[0], 1 / (reference_size + 1)
    mean = new * x.mean((1, 2)) + (1 - new) * reference.mean((0, 2, 3))
    mean_sq = new * x.square().mean((1, 2)) + (1 - new) * reference.square().mean((0, 2, 3))
    expected = (x - mean.view(3, 1, 1)) / (mean_sq - mean.square() + eps).sqrt().view(3, 1, 1)
    expected = expected * layer.weight.view(3, 1, 1) + layer.bias.view(3, 1, 1)
    torch.testing.assert_close(out[0], expected.detach())


def test_generator_with_vbn_makes_each_sample_independent_of_its_batch_in_training_mode():
    torch.manual_seed(0)
    generator = dcgan.Generator(dcgan.Args(vbn=True, vbn_reference_size=8)).train()
    z = torch.randn(4, 100)
    with torch.no_grad():
        alone, in_a_batch = generator(z[:1]), generator(torch.cat([z[:1], 5 * torch.randn(7, 100)]))
    torch.testing.assert_close(alone[0], in_a_batch[0])
    plain = dcgan.Generator(dcgan.Args()).train()  # batch norm: the batch does change a sample (the contrast)
    with torch.no_grad():
        assert not torch.allclose(plain(z[:2])[0], plain(torch.cat([z[:1], 5 * torch.randn(7, 100)]))[0])


@pytest.mark.parametrize("kernel_size", [3, 4, 5])
def test_every_kernel_size_maps_z_to_28x28_and_back_to_one_logit(kernel_size):
    args = dcgan.Args(kernel_size=kernel_size, conditional=True, minibatch_disc=(8, 3), disc_bn=True)
    labels = torch.arange(6) % 10
    images = dcgan.Generator(args)(torch.randn(6, 100), labels)
    assert images.shape == (6, 1, 28, 28) and images.abs().max() <= 1
    assert dcgan.Discriminator(args)(images, labels).shape == (6,)


def test_conditional_discriminator_can_tell_labels_apart():
    """The label is projected onto the image's features: switching it changes the logit by an image-dependent amount."""
    torch.manual_seed(0)
    discriminator = dcgan.Discriminator(dcgan.Args(conditional=True))
    images = torch.randn(2, 1, 28, 28)
    logits = discriminator(images.repeat_interleave(2, 0), torch.tensor([0, 1, 0, 1]))
    per_label_shift = logits[1] - logits[0], logits[3] - logits[2]
    assert not torch.allclose(*per_label_shift)


def test_targets_have_the_asked_values_and_flip_rate():
    torch.manual_seed(0)
    assert torch.equal(dcgan.discriminator_targets(5, 0.9, 0.1, 0.0, "cpu"), torch.full((5,), 0.9))
    targets = dcgan.discriminator_targets(200_000, 0.9, 0.0, 0.05, "cpu")
    assert torch.equal(targets.unique(), torch.tensor([0.0, 0.9]))
    assert abs((targets == 0.0).double().mean().item() - 0.05) < 0.003  # 6 standard errors


def test_discriminator_loss_with_smoothed_targets_is_the_cross_entropy():
    real_logits, fake_logits = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    real_t, fake_t = torch.full((2,), 0.9), torch.full((2,), 0.1)

    def cross_entropy(logits, t):
        p = torch.sigmoid(logits)
        return -(t * p.log() + (1 - t) * (1 - p).log()).mean()

    expected = cross_entropy(real_logits, real_t) + cross_entropy(fake_logits, fake_t)
    torch.testing.assert_close(dcgan.discriminator_loss(real_logits, fake_logits, real_t, fake_t), expected)


# --- end to end, tiny budgets --------------------------------------------------------------------------------------

ALL_TRICKS = [
    "--conditional", "--real-label", 0.9, "--fake-label", 0.1, "--label-flip", 0.05, "--replay-size", 128,
    "--replay-every", 2, "--minibatch-disc", 10, 3, "--vbn", "--vbn-reference-size", 8, "--disc-bn",
    "--kernel-size", 3,
]  # fmt: skip


def train(tmp_path, cache_dir, *extra, check=True):
    """2 steps per epoch (128 images, batch 64), each logged; FID on 16 samples against 16 test images."""
    return run_script("dcgan.py", *tiny_mnist_flags(cache_dir), "--log-every", 1, *extra, cwd=tmp_path, check=check)


@needs_mnist
@needs_inception
def test_every_trick_at_once_trains_resumes_like_an_uninterrupted_run_and_reports_label_accuracy(tmp_path, cache_dir):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    interrupted.mkdir(), straight.mkdir()
    train(interrupted, cache_dir, *ALL_TRICKS, "--epochs", 1)
    run_dir = only_run_dir(interrupted)
    first = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert first["replay"]["filled"] == 128 and first["replay"]["images"].abs().sum() > 0
    resumed = train(interrupted, cache_dir, *ALL_TRICKS, "--epochs", 2, "--resume", run_dir / "checkpoint.pt")
    assert "at epoch 1, step 2" in resumed.stdout
    train(straight, cache_dir, *ALL_TRICKS, "--epochs", 2)
    after_resume = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    uninterrupted = torch.load(only_run_dir(straight) / "checkpoint.pt", weights_only=True)
    assert_same_weights(uninterrupted, after_resume, "generator", "discriminator")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["final"]["label_accuracy"] <= 1 and metrics["epochs"] == 2
    assert (run_dir / "samples_epoch002.png").exists()
    absurd = [*tiny_mnist_flags(cache_dir), *ALL_TRICKS, "--epochs", 3, "--lr-g", 1e38, "--lr-d", 1e38]
    assert_divergence_stops_at_the_last_good_checkpoint("dcgan.py", run_dir, tmp_path / "diverged", *absurd)


@needs_mnist
@needs_inception
def test_plain_run_with_bf16_and_a_mismatched_resume_is_one_clear_error(tmp_path, cache_dir):
    train(tmp_path, cache_dir, "--epochs", 1, "--bf16", "--kernel-size", 4, "--g-activation", "leaky_relu")
    checkpoint = only_run_dir(tmp_path) / "checkpoint.pt"
    metrics = json.loads((only_run_dir(tmp_path) / "metrics.json").read_text())
    assert set(metrics["final"]) >= {"fid", "precision", "recall", "classifier_fid"}
    result = train(tmp_path, cache_dir, "--epochs", 2, "--resume", checkpoint, "--minibatch-disc", 4, 2, check=False)
    error_lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(error_lines) == 1
    assert error_lines[0].startswith(f"error: {checkpoint} does not match these networks/args")
