"""vanilla_gan.py's losses and R1 penalty against hand computations."""

import pytest
import torch
import torch.nn as nn

from vanilla_gan import (
    Discriminator,
    Generator,
    discriminator_loss,
    generator_loss,
    r1_penalty,
)


def test_losses_match_the_probability_form():
    real_logits, fake_logits = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([-0.5, 1.5, 0.0])
    d_real, d_fake = torch.sigmoid(real_logits), torch.sigmoid(fake_logits)
    expected_d = -torch.log(d_real).mean() - torch.log(1 - d_fake).mean()
    assert discriminator_loss(real_logits, fake_logits).item() == pytest.approx(expected_d.item(), rel=1e-6)
    assert generator_loss(fake_logits).item() == pytest.approx(-torch.log(d_fake).mean().item(), rel=1e-6)


def test_losses_stay_finite_for_extreme_logits():
    logits = torch.tensor([-200.0, 200.0])
    assert torch.isfinite(discriminator_loss(logits, logits)) and torch.isfinite(generator_loss(logits))


def test_r1_penalty_of_a_linear_critic_is_gamma_half_weight_norm():
    linear = nn.Linear(6, 1)
    x = torch.randn(5, 6, requires_grad=True)
    expected = 10.0 / 2 * linear.weight.square().sum()
    assert r1_penalty(linear(x).squeeze(1), x, gamma=10.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_r1_penalty_matches_the_hand_derived_gradient_of_a_tanh_net():
    torch.manual_seed(0)
    w, v = torch.randn(4, 3), torch.randn(4)
    x = torch.randn(7, 3, requires_grad=True)
    logits = torch.tanh(x @ w.T) @ v  # D(x) = v . tanh(W x)
    hand_grad = ((1 - torch.tanh(x @ w.T) ** 2) * v) @ w  # dD/dx = W^T (v * (1 - tanh^2(W x)))
    expected = 2.0 / 2 * hand_grad.square().sum(1).mean()
    assert r1_penalty(logits, x, gamma=2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_r1_penalty_is_differentiable_in_the_discriminator_weights():
    discriminator = Discriminator()
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    r1_penalty(discriminator(x), x, gamma=1.0).backward()
    first_layer = discriminator.net[0].weight  # double backprop reaches the weights (the last bias has no say in dD/dx)
    assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0


def test_networks_have_the_imposed_shapes():
    generator, discriminator = Generator(100), Discriminator()
    widths = [m.out_features for m in generator.net if isinstance(m, nn.Linear)]
    assert widths == [256, 512, 1024, 784]
    assert [m.out_features for m in discriminator.net if isinstance(m, nn.Linear)] == [1024, 512, 256, 1]
    images = generator(torch.randn(3, 100))
    assert images.shape == (3, 1, 28, 28) and images.abs().max() <= 1
    assert discriminator(images).shape == (3,)
