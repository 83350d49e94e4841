"""cyclegan.py: the mappings' sizes, the cycle and identity losses, the history pool, the USPS classifier, and a run."""

import json

import pytest
import torch

import cyclegan
import eval_fid
from conftest import (
    DATA_DIR,
    assert_divergence_stops_at_the_last_good_checkpoint,
    needs_inception,
    needs_mnist,
    only_run_dir,
    run_script,
    tiny_mnist_flags,
)

needs_usps = pytest.mark.skipif(
    not (DATA_DIR / "USPS" / "usps.bz2").exists(), reason=f"USPS not found under {DATA_DIR} (tests never download)"
)


@pytest.mark.parametrize("n_res_blocks", [0, 2])
def test_mappings_turn_28x28_into_16x16_and_back_and_discriminators_score_patches(n_res_blocks):
    mnist, usps = torch.rand(3, 1, 28, 28) * 2 - 1, torch.rand(3, 1, 16, 16) * 2 - 1
    to_usps, to_mnist = cyclegan.MnistToUsps(16, n_res_blocks), cyclegan.UspsToMnist(16, n_res_blocks)
    assert to_usps(mnist).shape == (3, 1, 16, 16) and to_mnist(usps).shape == (3, 1, 28, 28)
    assert to_usps(mnist).abs().max() <= 1 and to_mnist(usps).abs().max() <= 1
    critic = cyclegan.PatchDiscriminator()
    assert critic(mnist).shape == (3, 1, 7, 7) and critic(usps).shape == (3, 1, 4, 4)


def test_cycle_loss_is_zero_for_identity_mappings_and_the_mean_absolute_error_otherwise():
    x = torch.rand(4, 1, 28, 28)
    assert cyclegan.cycle_loss(x, x, torch.nn.Identity()) == 0
    shifted = cyclegan.cycle_loss(x, x, lambda images: images + 0.25)
    torch.testing.assert_close(shifted, torch.tensor(0.25))


def test_identity_loss_feeds_the_resized_target_image_and_compares_with_the_original():
    y = torch.rand(2, 1, 16, 16)
    seen = []

    def perfect(images):  # a mapping that returns the target-domain image unchanged, at its own size
        seen.append(images.shape)
        return y

    assert cyclegan.identity_loss(y, perfect, source_size=28) == 0 and seen == [(2, 1, 28, 28)]
    blank = cyclegan.identity_loss(y, lambda images: torch.zeros(2, 1, 16, 16), source_size=28)
    torch.testing.assert_close(blank, y.mean())


@pytest.mark.parametrize("kind", ["lsgan", "bce"])
def test_adversarial_losses_match_their_formulas(kind):
    logits = torch.tensor([[-1.0, 0.5], [2.0, 0.0]])
    if kind == "lsgan":
        real, fake = ((logits - 1) ** 2).mean(), (logits**2).mean()
    else:
        real, fake = -torch.sigmoid(logits).log().mean(), -(1 - torch.sigmoid(logits)).log().mean()
    torch.testing.assert_close(cyclegan.adversarial_loss(logits, True, kind), real)
    torch.testing.assert_close(cyclegan.adversarial_loss(logits, False, kind), fake)


def test_history_pool_fills_then_swaps_half_of_the_fakes_with_older_ones():
    pool = cyclegan.HistoryPool(size=50, image_shape=(1, 2, 2), device="cpu", seed=0)
    first = torch.zeros(50, 1, 2, 2)
    assert torch.equal(pool(first), first) and pool.filled == 50  # filling: everything passes through
    swapped_shares = []
    for step in range(1, 201):
        fakes = torch.full((8, 1, 2, 2), float(step))
        out = pool(fakes)
        assert torch.all((out == step) | (out < step))  # D gets each new fake or an older one, never a future one
        swapped_shares.append((out != step).float().mean())
        assert out.requires_grad is False
    share = torch.stack(swapped_shares).mean().item()
    assert abs(share - 0.5) < 0.05  # 1,600 coin flips: 4 standard errors is 0.05
    # The pool keeps recent fakes: ~4 of its 50 slots turn over per step, so the initial batch is long gone.
    assert pool.images.max() == 200 and pool.images.min() > 0 and pool.images.median() > 180


@needs_usps
def test_usps_classifier_is_accurate_and_cached(cache_dir):
    classifier = eval_fid.load_or_train_classifier("USPS", str(DATA_DIR), cache_dir, torch.device("cpu"))
    saved = torch.load(cache_dir / "usps_classifier_v1.pt", weights_only=True)
    assert saved["test_accuracy"] >= 0.95
    images, labels = eval_fid.load_usps(str(DATA_DIR), train=False)
    with torch.no_grad():
        predicted = classifier((images[:500].float() / 255).unsqueeze(1)).argmax(1)
    assert (predicted == labels[:500]).float().mean() > 0.93
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    eval_fid.load_or_train_classifier("USPS", str(DATA_DIR), cache_dir, torch.device("cpu"))  # from the cache
    assert torch.equal(torch.rand(1), expected)  # loading did not move the caller's random stream


@needs_mnist
@needs_usps
@needs_inception
def test_cyclegan_run_writes_grids_and_label_kept_metrics_and_resumes(tmp_path, cache_dir):
    flags = [*tiny_mnist_flags(cache_dir), "--batch-size", 32, "--log-every", 1, "--channels", 8, "--lambda-id", 0.5]
    run_script("cyclegan.py", *flags, "--epochs", 1, cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    resumed = run_script("cyclegan.py", *flags, "--epochs", 2, "--resume", run_dir / "checkpoint.pt", cwd=tmp_path)
    assert "at epoch 1, step 4" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = metrics["final"]
    assert 0 <= final["mnist_to_usps_label_kept"] <= 1 and 0 <= final["usps_to_mnist_label_kept"] <= 1
    assert final["usps_to_mnist_fid"] > 0 and final["usps_to_mnist_num_samples"] == 16
    assert [entry["epoch"] for entry in metrics["history"]] == [1, 2]
    assert (run_dir / "mnist_to_usps_epoch002.png").exists() and (run_dir / "usps_to_mnist_epoch002.png").exists()
    absurd = [*flags, "--epochs", 3, "--lr", 1e38]
    assert_divergence_stops_at_the_last_good_checkpoint("cyclegan.py", run_dir, tmp_path / "diverged", *absurd)
