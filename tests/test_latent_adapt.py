"""latent_adapt.py: class-wise Gaussian fit, balanced sampling, nearest-real similarity, and a tiny end-to-end run."""

import json

import numpy as np
import pytest
import torch

import latent_adapt
from conftest import (
    DATA_DIR,
    INCEPTION_WEIGHTS,
    digit_template_generator,
    needs_inception,
    needs_mnist,
    only_run_dir,
    run_script,
    separating_discriminator,
    write_checkpoint,
)


def test_class_gaussian_fit_recovers_known_means_and_variances():
    generator = torch.Generator().manual_seed(0)
    means, stds = torch.randn(10, 3, generator=generator), torch.rand(10, 3, generator=generator) + 0.2
    labels = torch.arange(10).repeat_interleave(20_000)
    latents = means[labels] + stds[labels] * torch.randn(len(labels), 3, generator=generator)
    fitted_means, fitted_stds = latent_adapt.fit_class_gaussians(latents, labels)
    by_class = latents.double().numpy().reshape(10, 20_000, 3)  # labels are sorted: one block per class
    np.testing.assert_allclose(fitted_means.numpy(), by_class.mean(1), atol=1e-5)
    np.testing.assert_allclose(fitted_stds.numpy(), by_class.std(1, ddof=1), rtol=1e-5)
    # And the truth, within 5 standard errors (mean: sigma/sqrt(n); variance: sigma^2 sqrt(2/n)).
    assert ((fitted_means - means).abs() < 5 * stds / 20_000**0.5).all()
    assert ((fitted_stds.square() - stds.square()).abs() < 5 * stds.square() * (2 / 20_000) ** 0.5).all()


def test_class_gaussian_fit_names_the_digits_it_cannot_fit():
    with pytest.raises(ValueError, match=r"digits \[3\]"):
        latent_adapt.fit_class_gaussians(
            torch.randn(30, 2), torch.tensor([d for d in range(10) if d != 3] * 3 + [0] * 3)
        )


def test_balanced_sampling_gives_exactly_per_class_samples_by_classifier_label():
    # "Generator": z itself; "classifier": the integer part of z[0], so N(d + 0.5, 0.6) often lands on a neighbour.
    def classify(x):
        return x[:, 0].floor().long().clamp(0, 9)

    means = torch.zeros(10, 4)
    means[:, 0] = torch.arange(10) + 0.5
    torch.manual_seed(0)
    samples, labels, draws = latent_adapt.sample_balanced(
        lambda z: z, classify, means, torch.full((10, 4), 0.6), per_class=37, batch_size=16, max_draws=10_000
    )
    assert len(samples) == 370 and torch.equal(classify(samples), labels)
    assert torch.equal(torch.bincount(classify(samples)), torch.full((10,), 37))
    assert all(d >= 37 for d in draws)
    with pytest.raises(RuntimeError, match="digit 0"):
        latent_adapt.sample_balanced(
            lambda z: z, lambda x: torch.full((len(x),), 5), means, torch.ones(10, 4), 1, 8, 64
        )


def test_nearest_real_similarity_and_thresholds_match_a_direct_loop():
    torch.manual_seed(0)
    fakes, predicted = torch.rand(40, 1, 4, 4), torch.randint(0, 10, (40,))
    reals, real_labels = torch.rand(100, 1, 4, 4), torch.arange(10).repeat(10)
    got = latent_adapt.nearest_real_similarity(fakes, predicted, latent_adapt.reals_by_digit(reals, real_labels))
    for fake, digit, similarity in zip(fakes, predicted, got):
        cosines = [
            torch.dot(fake.flatten(), r.flatten()) / (fake.norm() * r.norm()) for r in reals[real_labels == digit]
        ]
        assert similarity.item() == pytest.approx(max(cosines).item(), abs=1e-6)
    thresholds = latent_adapt.class_thresholds(got, predicted, 0.3)
    for digit in range(10):
        of_digit = got[predicted == digit].numpy()
        expected = np.quantile(of_digit, 0.3) if len(of_digit) else np.nan
        assert thresholds[digit].item() == pytest.approx(expected, abs=1e-6, nan_ok=True)


def test_histograms_image_marks_each_threshold_in_red():
    similarity, predicted = torch.rand(500), torch.arange(10).repeat(50)
    image = latent_adapt.histograms_image(similarity, predicted, torch.full((10,), 0.5))
    assert image.shape[0] == 3 and image.min() >= 0 and image.max() <= 1
    red = (image[0] > 0.8) & (image[1] < 0.2)
    top, bottom = red.split(red.shape[0] // 2)  # digits 0-4 above, 5-9 below
    assert top.any(dim=0).sum() == 5 and bottom.any(dim=0).sum() == 5  # one red column per panel


@needs_mnist
@needs_inception
def test_latent_adapt_end_to_end_on_a_generator_of_real_digits(tmp_path, cache_dir):
    torch.manual_seed(0)
    generator, _ = digit_template_generator()
    import vanilla_gan

    checkpoint = write_checkpoint(
        tmp_path / "templates.pt", generator, separating_discriminator(vanilla_gan.Discriminator(), generator)
    )
    tiny = [
        "--data-dir", DATA_DIR, "--inception-weights", INCEPTION_WEIGHTS, "--cache-dir", cache_dir,
        "--reference-size", 16, "--per-class", 3, "--num-latents", 500, "--batch-size", 100,
    ]  # fmt: skip
    result = run_script("latent_adapt.py", checkpoint, *tiny, "--save-samples", tmp_path / "pngs", cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["adapted"]["class_histogram"] == [3] * 10 and metrics["adapted"]["digits_covered"] == 10
    assert {"fid", "precision", "recall"} <= set(metrics["base"]) and {"fid", "precision", "recall"} <= set(
        metrics["adapted"]
    )
    assert sum(metrics["kept_per_digit"]) >= 250  # quantile 0.5 keeps about half of the 500 latents
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 30
    for image in ("similarity_histograms.png", "samples_base.png", "samples_adapted.png"):
        assert (run_dir / image).exists()
    assert "latent adaptation" in result.stdout.strip().splitlines()[-1]


@needs_mnist
@needs_inception
def test_a_generator_that_never_makes_some_digits_is_one_clear_error(tmp_path, cache_dir):
    import vanilla_gan

    torch.manual_seed(0)
    checkpoint = write_checkpoint(tmp_path / "noise.pt", vanilla_gan.Generator(100), vanilla_gan.Discriminator())
    result = run_script(
        "latent_adapt.py",
        checkpoint,
        "--data-dir",
        DATA_DIR,
        "--cache-dir",
        cache_dir,
        "--fast-only",
        "--per-class",
        2,
        "--num-latents",
        200,
        cwd=tmp_path,
        check=False,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "fewer than 2 kept latents" in lines[0], lines
