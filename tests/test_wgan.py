"""wgan_clip.py and wgan_gp.py: penalty, clipping, critic schedule, conditioning, and tiny end-to-end runs."""

import json

import pytest
import torch
import torch.nn as nn

import wgan_clip
import wgan_gp
from conftest import (
    DATA_DIR,
    INCEPTION_WEIGHTS,
    assert_divergence_stops_at_the_last_good_checkpoint,
    needs_inception,
    needs_mnist,
    only_run_dir,
    run_script,
)


class LinearCritic(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x, labels=None):
        return x.flatten(1) @ self.weight


def test_gradient_penalty_of_a_linear_critic():
    real, fake = torch.randn(6, 1, 2, 2), torch.randn(6, 1, 2, 2)
    unit = torch.tensor([0.5, 0.5, 0.5, 0.5])  # ||w|| = 1: a 1-Lipschitz critic pays nothing
    assert wgan_gp.gradient_penalty(LinearCritic(unit), real, fake, 10.0).item() == pytest.approx(0.0, abs=1e-10)
    w = torch.tensor([1.0, 2.0, 0.0, 2.0])  # ||w|| = 3 everywhere: penalty = lambda * (3 - 1)^2
    assert wgan_gp.gradient_penalty(LinearCritic(w), real, fake, 10.0).item() == pytest.approx(40.0, rel=1e-6)


def test_gradient_penalty_matches_a_hand_computation_at_the_interpolates():
    torch.manual_seed(0)
    w, v = torch.randn(5, 4), torch.randn(5)

    def critic(x, labels=None):
        return torch.tanh(x @ w.T) @ v

    real, fake, eps = torch.randn(3, 4), torch.randn(3, 4), torch.rand(3, 1)
    x_hat = eps * real + (1 - eps) * fake
    grads = ((1 - torch.tanh(x_hat @ w.T) ** 2) * v) @ w  # dD/dx = W^T (v * (1 - tanh^2(W x)))
    expected = 10.0 * ((grads.norm(dim=1) - 1) ** 2).mean()
    penalty = wgan_gp.gradient_penalty(critic, real, fake, 10.0, eps=eps)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


def test_weight_clipping_bounds_every_critic_weight_after_a_step():
    critic = wgan_clip.Critic()
    optimizer = torch.optim.RMSprop(critic.parameters(), lr=1.0)  # a huge step pushes weights far out
    (-critic(torch.randn(8, 1, 28, 28)).mean()).backward()
    optimizer.step()
    assert max(p.abs().max().item() for p in critic.parameters()) > 0.01
    wgan_clip.clip_weights(critic, 0.01)
    for p in critic.parameters():
        assert p.abs().max().item() <= 0.01


def expected_generator_steps(critic_steps: int, n_critic: int, boost=None) -> int:
    """The schedule as the issue states it, written independently of the scripts."""
    done, needed_so_far = 0, 0
    while True:
        boosted = boost and (done < boost["first"] or done % boost["every"] == 0)
        needed_so_far += boost["iters"] if boosted else n_critic
        if needed_so_far > critic_steps:
            return done
        done += 1


@pytest.mark.parametrize("critic_boost", [False, True])
def test_critic_schedule_counts(critic_boost):
    args = wgan_gp.Args(n_critic=5, critic_boost=critic_boost)  # boost: 100 steps for the first 100 and every 500th
    per_generator_step = [wgan_gp.critic_steps_for(g, args) for g in range(1001)]
    if critic_boost:
        assert per_generator_step[:100] == [100] * 100 and per_generator_step[500] == per_generator_step[1000] == 100
        assert sum(per_generator_step) == 100 * 100 + 2 * 100 + 5 * (1001 - 102)
    else:
        assert set(per_generator_step) == {5}


def test_conditional_networks_take_and_return_the_asked_shapes():
    generator, critic = wgan_gp.Generator(100, conditional=True), wgan_gp.Critic(conditional=True)
    labels = torch.tensor([0, 3, 9, 3])
    images = generator(torch.randn(4, 100), labels)
    assert images.shape == (4, 1, 28, 28) and critic(images, labels).shape == (4,)
    z = torch.randn(1, 100).repeat(2, 1)
    assert not torch.equal(*generator(z, torch.tensor([1, 7])))  # the label changes the image


def test_generator_batch_norm_flag():
    assert any(isinstance(m, nn.BatchNorm1d) for m in wgan_clip.Generator(100, batch_norm=True).modules())
    assert not any(isinstance(m, nn.BatchNorm1d) for m in wgan_clip.Generator(100, batch_norm=False).modules())


# --- tiny end-to-end runs: 1280 images = 20 critic steps per epoch ------------------------------

SMOKE = [
    "--data-dir", DATA_DIR, "--inception-weights", INCEPTION_WEIGHTS, "--num-train-images", 1280,
    "--eval-samples", 40, "--reference-size", 32, "--log-every", 1,
]  # fmt: skip


@needs_mnist
@needs_inception
@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "--generator-bn",
            "--critic-boost",
            "--boost-iters",
            3,
            "--boost-first",
            2,
            "--boost-every",
            4,
            "--lr-decay-epochs",
            1,
        ],
    ],
)
def test_wgan_clip_runs_counts_critic_steps_and_keeps_weights_clipped(tmp_path, cache_dir, extra):
    run_script("wgan_clip.py", *SMOKE, "--cache-dir", cache_dir, "--epochs", 2, *extra, cwd=tmp_path)
    checkpoint = torch.load(only_run_dir(tmp_path) / "checkpoint.pt", weights_only=True)
    boost = {"iters": 3, "first": 2, "every": 4} if extra else None
    assert checkpoint["critic_step"] == 40
    assert checkpoint["global_step"] == expected_generator_steps(40, 5, boost)
    assert max(t.abs().max().item() for t in checkpoint["critic"].values()) <= 0.01
    rate = 2.5e-5 if extra else 5e-5  # RMSProp's 5e-5, halved after epoch 1 with --lr-decay-epochs 1
    assert [g["lr"] for g in checkpoint["optimizer_g"]["param_groups"]] == [rate]
    if not extra:  # clipping bounds the critic, so it is the generator that overflows
        absurd = [*SMOKE, "--cache-dir", cache_dir, "--epochs", 3, "--lr-g", 1e38, "--lr-critic", 1e38]
        run_dir = only_run_dir(tmp_path)
        assert_divergence_stops_at_the_last_good_checkpoint("wgan_clip.py", run_dir, tmp_path / "diverged", *absurd)


@needs_mnist
@needs_inception
def test_wgan_gp_conditional_run_reports_label_accuracy_and_logs_the_wasserstein_estimate(tmp_path, cache_dir):
    run_script(
        "wgan_gp.py",
        "--lambda-gp",
        10,
        "--n-critic",
        5,
        "--conditional",
        *SMOKE,
        "--cache-dir",
        cache_dir,
        "--epochs",
        1,
        cwd=tmp_path,
    )
    run_dir = only_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["label_accuracy"] <= 1.0 and metrics["step"] == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(run_dir)).Reload().Tags()["scalars"]
    assert {"losses/wasserstein_estimate", "losses/gradient_penalty", "eval/label_accuracy"} <= set(scalars)


@needs_mnist
@needs_inception
def test_wgan_gp_resume_and_fine_tune_with_scaled_learning_rates(tmp_path, cache_dir):
    common = [*SMOKE, "--cache-dir", cache_dir]
    run_script("wgan_gp.py", *common, "--epochs", 1, cwd=tmp_path)
    first = only_run_dir(tmp_path)
    decay = ["--lr-decay-epochs", 1, "--lr-decay-factor", 0.1]
    resumed = run_script(
        "wgan_gp.py", *common, "--epochs", 2, *decay, "--resume", first / "checkpoint.pt", cwd=tmp_path
    )
    assert "at epoch 1, step 4" in resumed.stdout and only_run_dir(tmp_path) == first
    after_resume = torch.load(first / "checkpoint.pt", weights_only=True)
    assert after_resume["critic_step"] == 40
    assert [g["lr"] for g in after_resume["optimizer_c"]["param_groups"]] == [pytest.approx(1e-5)]  # 1e-4 x 0.1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(first)).Reload().Scalars("charts/learning_rate_g")
    assert [round(event.value, 9) for event in logged] == [1e-4, 1e-5]  # one per epoch, across the resume

    fine_dir = tmp_path / "fine"
    fine_dir.mkdir()
    run_script(
        "wgan_gp.py", *common, "--fine-tune-from", first / "best.pt", "--lr-scale", 0.5, "--epochs", 1, cwd=fine_dir
    )
    tuned = torch.load(only_run_dir(fine_dir) / "checkpoint.pt", weights_only=True)
    assert tuned["epoch"] == 1 and tuned["run_name"] != first.name  # a new run, one more epoch
    assert [g["lr"] for g in tuned["optimizer_g"]["param_groups"]] == [0.5e-4]
    assert [g["lr"] for g in tuned["optimizer_c"]["param_groups"]] == [0.5e-4]
    absurd = [*common, "--epochs", 3, "--lr-g", 1e38, "--lr-critic", 1e38]
    assert_divergence_stops_at_the_last_good_checkpoint("wgan_gp.py", first, tmp_path / "diverged", *absurd)
