"""vanilla_gan.py end to end with a tiny budget: outputs, resume, determinism and its one-line errors."""

import json
import subprocess

import pytest
import torch

from conftest import (
    DATA_DIR,
    INCEPTION_WEIGHTS,
    REPO,
    assert_divergence_stops_at_the_last_good_checkpoint,
    assert_same_weights,
    needs_inception,
    needs_mnist,
    only_run_dir,
    run_script,
)

pytestmark = [needs_mnist, needs_inception]


TINY = [
    "--data-dir", DATA_DIR, "--inception-weights", INCEPTION_WEIGHTS, "--num-train-images", 256, "--eval-samples", 32,
    "--reference-size", 32, "--log-every", 2,
]  # fmt: skip


def train(tmp_path, cache_dir, *extra, check=True):
    """4 steps per epoch (256 images, batch 64), FID on 32 samples against 32 test images."""
    return run_script("vanilla_gan.py", *TINY, "--cache-dir", cache_dir, *extra, cwd=tmp_path, check=check)


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, cache_dir):
    tmp_path = tmp_path_factory.mktemp("one_epoch")
    result = train(tmp_path, cache_dir, "--epochs", 1, "--save-samples", tmp_path / "pngs")
    return tmp_path, result


def test_a_run_writes_checkpoint_grid_events_metrics_and_samples(one_epoch_run):
    tmp_path, result = one_epoch_run
    run_dir = only_run_dir(tmp_path)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 4
    assert (run_dir / "best.pt").exists() and (run_dir / "samples_epoch001.png").exists()
    assert list(run_dir.glob("events.out.tfevents.*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["final"]) >= {"fid", "precision", "recall", "classifier_fid", "digits_covered"}
    assert metrics["history"][0]["epoch"] == 1 and metrics["step"] == 4
    assert {"kid", "kid_std"} <= set(metrics["final"]) and metrics["best"]["epoch"] == 1  # best.pt is epoch 1 here
    assert metrics["best"]["fid"] == metrics["final"]["fid"]  # ... so it holds the last generator: same scores
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert metrics["provenance"]["git_commit"] == (head or None) and metrics["provenance"]["threads"] >= 1
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 32
    assert "FID" in result.stdout.strip().splitlines()[-1]


def test_tensorboard_gets_losses_d_outputs_grid_metric_and_hparams(one_epoch_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = only_run_dir(one_epoch_run[0])
    events = EventAccumulator(str(run_dir)).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"losses/d_loss", "losses/g_loss", "charts/D(x)", "charts/D(G(z))", "eval/classifier_fid"} <= scalars
    assert "samples" in events.Tags()["images"]
    assert "hyperparameters/text_summary" in events.Tags()["tensors"]


def test_resume_continues_at_the_saved_step_and_matches_an_uninterrupted_run(one_epoch_run, tmp_path, cache_dir):
    first_dir = only_run_dir(one_epoch_run[0])
    decay_after_1 = ["--lr-decay-epochs", 1]  # the first epoch ran at full rate either way
    resumed = train(one_epoch_run[0], cache_dir, "--epochs", 2, *decay_after_1, "--resume", first_dir / "checkpoint.pt")
    assert "resumed" in resumed.stdout and "at epoch 1, step 4" in resumed.stdout
    assert only_run_dir(one_epoch_run[0]) == first_dir  # same run, same TensorBoard folder
    after_resume = torch.load(first_dir / "checkpoint.pt", weights_only=True)
    assert after_resume["epoch"] == 2 and after_resume["global_step"] == 8
    assert [h["epoch"] for h in after_resume["history"]] == [1, 2]
    for optimizer in ("optimizer_g", "optimizer_d"):  # epoch 2 ran at half the default 2e-4
        assert [group["lr"] for group in after_resume[optimizer]["param_groups"]] == [1e-4]

    train(tmp_path, cache_dir, "--epochs", 2, *decay_after_1)  # same seed, no interruption
    straight = torch.load(only_run_dir(tmp_path) / "checkpoint.pt", weights_only=True)
    assert_same_weights(straight, after_resume, "generator", "discriminator")


def test_corrupt_checkpoint_is_one_clear_error(tmp_path, cache_dir):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = train(tmp_path, cache_dir, "--resume", tmp_path / "bad.pt", check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'bad.pt'} is not a readable vanilla_gan checkpoint (corrupt or from another program)"
    ]


def test_mismatched_checkpoint_is_one_clear_error(one_epoch_run, cache_dir):
    checkpoint = only_run_dir(one_epoch_run[0]) / "checkpoint.pt"
    result = train(one_epoch_run[0], cache_dir, "--resume", checkpoint, "--latent-dim", 64, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "does not match" in lines[0]


def test_nan_losses_stop_the_run_and_keep_the_last_good_checkpoint(one_epoch_run, tmp_path, cache_dir):
    # An absurd learning rate overflows the weights within a few steps.
    flags = [*TINY, "--cache-dir", cache_dir, "--epochs", 3, "--lr-d", 1e38, "--lr-g", 1e38]
    assert_divergence_stops_at_the_last_good_checkpoint(
        "vanilla_gan.py", only_run_dir(one_epoch_run[0]), tmp_path, *flags
    )


def test_r1_and_bf16_flags_train_and_log_the_penalty(tmp_path, cache_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, cache_dir, "--epochs", 1, "--r1-gamma", 10, "--bf16")
    events = EventAccumulator(str(only_run_dir(tmp_path))).Reload()
    assert all(event.value > 0 for event in events.Scalars("losses/r1_penalty"))


def test_too_few_eval_samples_fail_before_training(tmp_path, cache_dir):
    result = train(tmp_path, cache_dir, "--eval-samples", 3, check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        "error: --eval-samples must be at least 4, got 3"
    ]


@pytest.mark.parametrize("flags", [["--lr-decay-factor", 0], ["--lr-decay-epochs", 0]])
def test_a_decay_that_is_not_a_schedule_is_one_line_before_any_run_folder(tmp_path, cache_dir, flags):
    result = train(tmp_path, cache_dir, *flags, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --lr-decay-factor must be positive and --lr-decay-epochs at least 1"
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("rate", [1.0, -0.1])
def test_a_dropout_rate_outside_0_1_is_one_line_before_any_run_folder(tmp_path, cache_dir, rate):
    result = train(tmp_path, cache_dir, "--d-dropout", rate, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --d-dropout must be in [0, 1), got {rate}"
    ]
    assert not (tmp_path / "runs").exists()
