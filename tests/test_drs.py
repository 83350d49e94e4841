"""drs.py: the acceptance formula, Platt calibration, checkpoint formats, and tiny end-to-end runs."""

import json
import math

import numpy as np
import pytest
import torch

import drs
import vanilla_gan
import wgan_gp
from conftest import (
    DATA_DIR,
    INCEPTION_WEIGHTS,
    needs_inception,
    needs_mnist,
    only_run_dir,
    run_script,
    separating_discriminator,
    write_checkpoint,
)


def test_acceptance_probability_equals_the_papers_formula_on_known_logits():
    logits, max_logit, eps, gamma = torch.tensor([-3.0, 0.0, 1.5, 2.0]), torch.tensor(2.0), 1e-6, 0.7
    expected = []
    for d in logits.tolist():  # F = D - D_max - log(1 - exp(D - D_max - eps)) - gamma, p = 1 / (1 + exp(-F))
        f = d - 2.0 - math.log(1 - math.exp(d - 2.0 - eps)) - gamma
        expected.append(1 / (1 + math.exp(-f)))
    got = drs.acceptance_probability(logits.double(), max_logit.double(), eps, gamma)
    assert got.tolist() == pytest.approx(expected, rel=1e-9)


def test_acceptance_is_monotone_in_the_logit_and_gamma_to_minus_infinity_accepts_everything():
    logits = torch.linspace(-20, 5, 1001)
    p = drs.acceptance_probability(logits, logits.max(), 1e-6, gamma=0.0)
    assert (p.diff() > 0).all() and 0 < p.min() and p.max() < 1
    assert (drs.acceptance_probability(logits, logits.max(), 1e-6, gamma=-1e4) == 1).all()


def test_platt_scaling_recovers_a_known_logistic_model():
    generator = torch.Generator().manual_seed(0)
    scores = 2 * torch.randn(200_000, generator=generator, dtype=torch.float64)
    is_real = torch.rand(200_000, generator=generator, dtype=torch.float64) < torch.sigmoid(1.5 * scores - 0.5)
    a, b = drs.platt_scaling(scores[is_real], scores[~is_real])
    assert a == pytest.approx(1.5, abs=0.03) and b == pytest.approx(-0.5, abs=0.03)
    # First-order optimality checked with autograd: the mean BCE is flat at (a, b) up to the ridge's 1e-6 * a.
    weights = torch.tensor([a, b], dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(weights[0] * scores + weights[1], is_real.double())
    (gradient,) = torch.autograd.grad(loss, weights)
    assert gradient.abs().max() < 1e-5


@pytest.mark.parametrize("network", [vanilla_gan.Discriminator, lambda: wgan_gp.Critic(conditional=False)])
def test_discriminator_and_critic_checkpoints_load_into_the_same_mlp(network):
    torch.manual_seed(0)
    trained = network()
    ours = drs.Discriminator()
    ours.net.load_state_dict(drs.renumber_linear_layers(trained.state_dict(), ours.net))
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(ours(x), trained(x))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An untrained generator (noise digits) with a discriminator and a critic that already tell MNIST from it."""
    folder = tmp_path_factory.mktemp("drs_checkpoints")
    torch.manual_seed(0)
    generator = vanilla_gan.Generator(100)
    return {
        "discriminator": write_checkpoint(
            folder / "vanilla.pt", generator, separating_discriminator(vanilla_gan.Discriminator(), generator)
        ),
        "critic": write_checkpoint(
            folder / "wgan.pt",
            generator,
            separating_discriminator(wgan_gp.Critic(conditional=False), generator),
            "critic",
        ),
    }


def run_drs(tmp_path, cache_dir, checkpoint, *extra, check=True):
    tiny = [
        "--data-dir", DATA_DIR, "--inception-weights", INCEPTION_WEIGHTS, "--cache-dir", cache_dir,
        "--num-samples", 16, "--reference-size", 16, "--burn-in", 64, "--proposal-batch", 32,
        "--calibration-size", 64,
    ]  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    return run_script("drs.py", checkpoint, *tiny, *extra, cwd=tmp_path, check=check)


@needs_mnist
@needs_inception
def test_drs_on_a_critic_writes_metrics_grids_and_samples(tmp_path, cache_dir, checkpoints):
    result = run_drs(tmp_path, cache_dir, checkpoints["critic"], "--save-samples", tmp_path / "drs.pt")
    run_dir = only_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["source"]["score"] == "critic" and metrics["calibration"]["scale"] > 0
    assert metrics["proposals"] >= 16 and metrics["acceptance_rate"] == pytest.approx(16 / metrics["proposals"])
    for name in ("base", "drs"):
        assert {"fid", "precision", "recall", "classifier_fid", "digits_covered"} <= set(metrics[name])
        assert (run_dir / f"samples_{name}.png").exists()
    samples = torch.load(tmp_path / "drs.pt")
    assert samples.dtype == torch.uint8 and samples.shape == (16, 1, 28, 28)
    assert "acceptance rate" in result.stdout.strip().splitlines()[-1]


@needs_mnist
@needs_inception
def test_a_very_negative_gamma_accepts_every_proposal_and_a_strict_one_rejects(tmp_path, cache_dir, checkpoints):
    common = [cache_dir, checkpoints["discriminator"], "--fast-only", "--num-samples", 64]
    run_drs(tmp_path / "all", *common, "--gamma", -1000)
    run_drs(tmp_path / "strict", *common, "--gamma-percentile", 95)
    accept_all, strict = (
        json.loads(next((tmp_path / d / "runs").iterdir()).joinpath("metrics.json").read_text())
        for d in ("all", "strict")
    )
    assert accept_all["proposals"] == 64 and accept_all["acceptance_rate"] == 1.0
    assert strict["acceptance_rate"] < 0.5


@needs_mnist
@needs_inception
def test_same_seed_gives_the_same_samples(tmp_path, cache_dir, checkpoints):
    for name in ("a", "b"):
        run_drs(
            tmp_path / name,
            cache_dir,
            checkpoints["discriminator"],
            "--fast-only",
            "--save-samples",
            tmp_path / f"{name}.npz",
        )
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["samples"], b["samples"])


@needs_mnist
@needs_inception
def test_bad_checkpoints_and_an_uncalibrated_critic_are_one_clear_error(tmp_path, cache_dir, checkpoints):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    conditional = torch.load(checkpoints["critic"], weights_only=True)
    conditional["args"]["conditional"] = True
    torch.save(conditional, tmp_path / "conditional.pt")
    cases = {
        tmp_path / "bad.pt": "is not a readable CleanGAN checkpoint",
        tmp_path / "conditional.pt": "conditional generator",
        tmp_path / "missing.pt": "does not exist",
    }
    for checkpoint, message in cases.items():
        result = run_drs(tmp_path, cache_dir, checkpoint, "--fast-only", check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], lines
    result = run_drs(tmp_path, cache_dir, checkpoints["critic"], "--fast-only", "--no-calibrate", check=False)
    assert result.returncode == 2 and "needs --calibrate" in result.stderr.strip().splitlines()[-1]
