"""WGAN-GP on MNIST: a Wasserstein critic kept 1-Lipschitz by a gradient penalty, MLP nets, optional labels.
Gulrajani et al. 2017, "Improved Training of Wasserstein GANs" (arXiv:1704.00028).
Run: python wgan_gp.py --lambda-gp 10 --n-critic 5 --data-dir ../shared/data --inception-weights ../shared/weights/pt_inception-2015-12-05-pool3.pth
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro
from torch.utils.tensorboard import SummaryWriter

import eval_fid


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (the run name is {exp_name}__{seed}__{unix time})"""
    seed: int = 1
    """seed of torch, numpy, random and the batch order"""
    torch_deterministic: bool = True
    """deterministic kernels, so that the same seed on the same device gives the same result"""
    cuda: bool = True
    """train on CUDA when it is available"""
    bf16: bool = False
    """bf16 autocast for the networks (faster on CPUs with AVX512-BF16/AMX and on GPUs; losses stay fp32)"""

    # data
    data_dir: str = "data"
    """folder holding MNIST/raw (torchvision downloads it there when missing and online)"""
    num_train_images: int = 60000
    """train on the first N MNIST training images (fewer = shorter epochs, e.g. for smoke tests)"""

    # optimisation
    epochs: int = 100
    """number of passes of the critic over the training images (each critic step takes a fresh batch)"""
    batch_size: int = 64
    """images per critic and generator step"""
    lr_g: float = 1e-4
    """Adam learning rate of the generator"""
    lr_critic: float = 1e-4
    """Adam learning rate of the critic"""
    beta1: float = 0.0
    """Adam beta1 of both networks (0 as in the paper: momentum hurts the critic's moving target)"""
    beta2: float = 0.9
    """Adam beta2 of both networks"""
    latent_dim: int = 100
    """dimension of the generator's Gaussian input z"""
    lr_scale: float = 1.0
    """multiplies both learning rates, e.g. 0.5 with --fine-tune-from for the report's decay step"""
    lr_decay_epochs: tuple[int, ...] = ()
    """multiply both learning rates by --lr-decay-factor after each of these epochs (e.g. 150: a decay step in one run)"""
    lr_decay_factor: float = 0.5
    """the factor of each step of --lr-decay-epochs"""

    # the method
    lambda_gp: float = 10.0
    """weight of the gradient penalty lambda * E[(||grad D(x_hat)|| - 1)^2]"""
    n_critic: int = 5
    """critic steps per generator step"""
    critic_boost: bool = False
    """give the critic --boost-iters steps for the first --boost-first generator steps and every --boost-every-th"""
    boost_iters: int = 100
    """critic steps per generator step while boosting"""
    boost_first: int = 100
    """number of generator steps at the start that get boosted critic training"""
    boost_every: int = 500
    """every N-th generator step gets boosted critic training too"""
    conditional: bool = False
    """feed the digit label (one-hot) to the generator and the critic, so that a user can ask for a digit"""

    # evaluation, logging and checkpoints
    log_every: int = 100
    """log losses and the Wasserstein estimate every N generator steps"""
    eval_every: int = 1
    """fast metric (classifier FID, digit coverage) and sample grid every N epochs"""
    eval_samples: int = 10000
    """samples for the fast metric and for the final FID / precision / recall"""
    reference_size: int = 10000
    """MNIST test images that form the FID reference (the first N)"""
    inception_weights: Optional[str] = None
    """FID Inception state dict for offline use (../shared/weights/pt_inception-2015-12-05-pool3.pth); default: download"""
    cache_dir: str = eval_fid.DEFAULT_CACHE_DIR
    """where eval_fid caches its classifier and reference features"""
    checkpoint_every: int = 1
    """write runs/{run_name}/checkpoint.pt every N epochs (atomically)"""
    resume: Optional[str] = None
    """checkpoint to continue from: same run name, step, optimisers and random state"""
    fine_tune_from: Optional[str] = None
    """start a NEW run from this checkpoint's networks and optimisers (e.g. best.pt with --lr-scale 0.5 --epochs 30)"""
    save_samples: Optional[str] = None
    """write the final eval samples to this folder as lossless PNGs"""


NUM_CLASSES = 10


class Generator(nn.Module):
    """The imposed MLP: z (+ one-hot label) -> 256 -> 512 -> 1024 -> 784, LeakyReLU(0.2), Tanh."""

    def __init__(self, latent_dim: int, conditional: bool):
        super().__init__()
        self.conditional = conditional
        self.net = nn.Sequential(
            nn.Linear(latent_dim + NUM_CLASSES * conditional, 256), nn.LeakyReLU(0.2),
            nn.Linear(256, 512), nn.LeakyReLU(0.2),
            nn.Linear(512, 1024), nn.LeakyReLU(0.2),
            nn.Linear(1024, 784), nn.Tanh(),
        )  # fmt: skip

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.conditional:
            z = torch.cat([z, F.one_hot(labels, NUM_CLASSES).to(z.dtype)], dim=1)
        return self.net(z).view(-1, 1, 28, 28)


class Critic(nn.Module):
    """784 (+ one-hot label) -> 1024 -> 512 -> 256 -> 1 with LeakyReLU(0.2): an unbounded score, no sigmoid."""

    def __init__(self, conditional: bool):
        super().__init__()
        self.conditional = conditional
        self.net = nn.Sequential(
            nn.Linear(784 + NUM_CLASSES * conditional, 1024), nn.LeakyReLU(0.2),
            nn.Linear(1024, 512), nn.LeakyReLU(0.2),
            nn.Linear(512, 256), nn.LeakyReLU(0.2),
            nn.Linear(256, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x.flatten(1)
        if self.conditional:
            x = torch.cat([x, F.one_hot(labels, NUM_CLASSES).to(x.dtype)], dim=1)
        return self.net(x).squeeze(1)


def gradient_penalty(critic, real, fake, lambda_gp: float, labels=None, eps=None) -> torch.Tensor:
    """lambda * E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = eps*x + (1-eps)*G(z), eps ~ U[0, 1] per sample."""
    if eps is None:
        eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat, labels).float().sum(), x_hat, create_graph=True)
    return lambda_gp * (grad.flatten(1).norm(dim=1) - 1).square().mean()


def critic_steps_for(generator_step: int, args: Args) -> int:
    """Critic steps before generator step number `generator_step` (0-based), with the optional boost schedule."""
    boosted = args.critic_boost and (generator_step < args.boost_first or generator_step % args.boost_every == 0)
    return args.boost_iters if boosted else args.n_critic


@torch.no_grad()
def generate(generator: nn.Module, noise: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Samples in eval mode (batch norm uses its running statistics), then back to training mode."""
    generator.eval()
    batches = range(0, len(noise), batch_size)
    samples = torch.cat([generator(noise[i : i + batch_size], labels[i : i + batch_size]).float() for i in batches])
    generator.train()
    return samples


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, or one clear error line."""
    return eval_fid.load_checkpoint(path, {"generator", "critic", "epoch"}, Args.exp_name)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_samples <= 3:  # precision/recall use k=3 nearest neighbours: fail now, not after training
        eval_fid.fail(f"--eval-samples must be at least 4, got {args.eval_samples}")
    if args.lr_decay_factor <= 0 or any(epoch < 1 for epoch in args.lr_decay_epochs):
        eval_fid.fail("--lr-decay-factor must be positive and --lr-decay-epochs at least 1")
    if args.resume and args.fine_tune_from:
        eval_fid.fail("--resume continues a run and --fine-tune-from starts a new one: give only one")
    checkpoint_file = args.resume or args.fine_tune_from
    checkpoint = load_checkpoint(checkpoint_file) if checkpoint_file else None
    run_name = checkpoint["run_name"] if args.resume else f"{args.exp_name}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    provenance = eval_fid.provenance(device)  # the commit this process loaded, whatever lands while it runs
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    # MNIST as one [-1, 1] tensor on the device; batches are index slices, no per-sample PIL work.
    try:
        train_images, train_labels = eval_fid.load_mnist(args.data_dir, train=True)
        evaluator = eval_fid.Evaluator(
            args.data_dir, args.inception_weights, args.cache_dir, str(device), reference_size=args.reference_size
        )
        evaluator.classifier()  # trained once and cached; fail now rather than after training
        evaluator.inception()
    except eval_fid.EvalError as e:
        eval_fid.fail(str(e))
    train_images = (train_images[: args.num_train_images].float() / 127.5 - 1).unsqueeze(1).to(device)
    train_labels = train_labels[: args.num_train_images].to(device)
    steps_per_epoch = len(train_images) // args.batch_size
    if steps_per_epoch == 0:
        eval_fid.fail(f"--num-train-images {len(train_images)} is smaller than one batch of {args.batch_size}")
    batch_order = torch.Generator().manual_seed(args.seed)
    eval_noise = torch.randn(args.eval_samples, args.latent_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    eval_noise = eval_noise.to(device)
    eval_labels = (torch.arange(args.eval_samples) % NUM_CLASSES).to(device)  # balanced; a grid row holds 0..9
    grid_size, grid_row = (100, 10) if args.conditional else (64, 8)

    generator = Generator(args.latent_dim, args.conditional).to(device)
    critic = Critic(args.conditional).to(device)
    fused = device.type in ("cuda", "cpu")  # one kernel per step instead of one per parameter tensor
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2), fused=fused)
    optimizer_c = torch.optim.Adam(critic.parameters(), lr=args.lr_critic, betas=(args.beta1, args.beta2), fused=fused)

    start_epoch, global_step, train_seconds, best_metric, history = 0, 0, 0.0, float("inf"), []
    critic_step, critic_steps_since_g = 0, 0
    if checkpoint:  # its networks and optimisers
        try:
            generator.load_state_dict(checkpoint["generator"])
            critic.load_state_dict(checkpoint["critic"])
            optimizer_g.load_state_dict(checkpoint["optimizer_g"])
            optimizer_c.load_state_dict(checkpoint["optimizer_c"])
        except (RuntimeError, ValueError, KeyError) as e:
            eval_fid.fail(f"{checkpoint_file} does not match these networks/args: {' '.join(str(e).split())[:200]}")
    if args.resume:  # and where the run stopped: counters, history, random state
        start_epoch, global_step = checkpoint["epoch"], checkpoint["global_step"]
        train_seconds, best_metric = checkpoint["train_seconds"], checkpoint["best_metric"]
        history = checkpoint["history"]
        critic_step, critic_steps_since_g = checkpoint["critic_step"], checkpoint["critic_steps_since_g"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        batch_order.set_state(checkpoint["rng"]["batch_order"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        print(f"resumed {run_name} at epoch {start_epoch}, step {global_step}")

    def set_learning_rates(epoch: int):
        """The command line's rates win over a checkpoint's, scaled, stepped down after each of --lr-decay-epochs."""
        decay = args.lr_decay_factor ** sum(epoch > milestone for milestone in args.lr_decay_epochs)
        for optimizer, lr in ((optimizer_g, args.lr_g), (optimizer_c, args.lr_critic)):
            for group in optimizer.param_groups:
                group["lr"] = lr * args.lr_scale * decay

    # The run's folder is made only once nothing at the start can fail any more: a failed start leaves no runs/RUN.
    run_name, run_dir = eval_fid.claim_run_dir(run_name, resumed=bool(args.resume))
    if args.fine_tune_from:
        print(f"fine-tuning from {args.fine_tune_from} (epoch {checkpoint['epoch']}) as new run {run_name}")
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    def save_checkpoint(path: str, epoch: int):
        eval_fid.atomic_save(
            {
                "generator": generator.state_dict(),
                "critic": critic.state_dict(),
                "optimizer_g": optimizer_g.state_dict(),
                "optimizer_c": optimizer_c.state_dict(),
                "epoch": epoch,
                "global_step": global_step,
                "critic_step": critic_step,
                "critic_steps_since_g": critic_steps_since_g,
                "train_seconds": train_seconds,
                "best_metric": best_metric,
                "history": history,
                "run_name": run_name,
                "args": asdict(args),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "batch_order": batch_order.get_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                },
            },
            path,
        )

    checkpoint_path, best_path = f"{run_dir}/checkpoint.pt", f"{run_dir}/best.pt"
    for epoch in range(start_epoch + 1, args.epochs + 1):
        epoch_start, epoch_start_step = time.time(), global_step
        order = torch.randperm(len(train_images), generator=batch_order).to(device)
        set_learning_rates(epoch)
        writer.add_scalar("charts/learning_rate_g", optimizer_g.param_groups[0]["lr"], global_step)
        for step_in_epoch in range(steps_per_epoch):
            batch = order[step_in_epoch * args.batch_size : (step_in_epoch + 1) * args.batch_size]
            real, labels = train_images[batch], train_labels[batch]  # fakes get the same labels: x_hat is well posed

            # Critic step, on every batch: maximise E[D(x)] - E[D(G(z))] under the gradient penalty.
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            with autocast:
                with torch.no_grad():
                    fake = generator(z, labels)
                real_scores, fake_scores = critic(real, labels).float(), critic(fake, labels).float()
                penalty = gradient_penalty(critic, real, fake.float(), args.lambda_gp, labels)
                wasserstein = real_scores.mean() - fake_scores.mean()
                critic_loss = -wasserstein + penalty
            optimizer_c.zero_grad(set_to_none=True)
            critic_loss.backward()
            optimizer_c.step()
            critic_step += 1
            critic_steps_since_g += 1
            if critic_steps_since_g < critic_steps_for(global_step, args):
                continue
            critic_steps_since_g = 0

            # Generator step, after the critic's n_critic steps: minimise -E[D(G(z))].
            critic.requires_grad_(False)
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            with autocast:
                g_loss = -critic(generator(z, labels), labels).float().mean()
            optimizer_g.zero_grad(set_to_none=True)
            g_loss.backward()
            optimizer_g.step()
            critic.requires_grad_(True)
            global_step += 1

            if global_step % args.log_every == 0:  # the only host syncs of the loop
                c_value, g_value, w_value = critic_loss.item(), g_loss.item(), wasserstein.item()
                if not (np.isfinite(c_value) and np.isfinite(g_value)):
                    message = f"non-finite loss at step {global_step} (critic {c_value}, G {g_value})"
                    eval_fid.fail_diverged(message, checkpoint_path, args.resume)
                writer.add_scalar("losses/critic_loss", c_value, global_step)
                writer.add_scalar("losses/g_loss", g_value, global_step)
                writer.add_scalar("losses/wasserstein_estimate", w_value, global_step)
                writer.add_scalar("losses/gradient_penalty", penalty.item(), global_step)
                writer.add_scalar("charts/critic_steps", critic_step, global_step)
                steps_per_second = (global_step - epoch_start_step) / (time.time() - epoch_start)
                writer.add_scalar("charts/generator_steps_per_second", steps_per_second, global_step)
                print(
                    f"epoch {epoch} step {global_step}: critic_loss {c_value:.3f} g_loss {g_value:.3f} "
                    f"W {w_value:.3f} GP {penalty.item():.3f} | {steps_per_second:.1f} G steps/s"
                )
        train_seconds += time.time() - epoch_start
        writer.add_scalar("charts/epoch_seconds", time.time() - epoch_start, global_step)

        if epoch % args.eval_every == 0 or epoch == args.epochs:
            samples = generate(generator, eval_noise, eval_labels)
            metrics = evaluator.fast(samples, eval_labels if args.conditional else None)
            history.append({"epoch": epoch, "step": global_step, "train_seconds": train_seconds, **metrics})
            grid = torchvision.utils.make_grid(samples[:grid_size], nrow=grid_row, normalize=True, value_range=(-1, 1))
            writer.add_image("samples", grid, global_step)  # conditional: column j holds digit j
            torchvision.utils.save_image(grid, f"{run_dir}/samples_epoch{epoch:03d}.png")
            for key in ("classifier_fid", "digits_covered", "kl_to_uniform", "label_accuracy"):
                if key in metrics:
                    writer.add_scalar(f"eval/{key}", metrics[key], global_step)
            asked = f", {metrics['label_accuracy']:.1%} as asked" if args.conditional else ""
            print(
                f"epoch {epoch}: classifier FID {metrics['classifier_fid']:.2f}, "
                f"{metrics['digits_covered']}/10 digits{asked}, {train_seconds:.0f}s of training"
            )

        if epoch % args.checkpoint_every == 0 or epoch == args.epochs:
            weights_finite = all(torch.isfinite(p).all() for p in [*generator.parameters(), *critic.parameters()])
            if not weights_finite:
                eval_fid.fail_diverged(f"non-finite weights at epoch {epoch}", checkpoint_path, args.resume)
            improved = history and history[-1]["epoch"] == epoch and history[-1]["classifier_fid"] < best_metric
            if improved:
                best_metric = history[-1]["classifier_fid"]
            save_checkpoint(checkpoint_path, epoch)
            if improved:
                save_checkpoint(best_path, epoch)

    # Final evaluation: FID, KID, precision, recall on eval_samples samples of the last generator, then of best.pt
    # (the epoch the fast metric picked, as the reports picked theirs) from the same noise.
    samples = generate(generator, eval_noise, eval_labels)
    final = evaluator.full(samples, labels=eval_labels if args.conditional else None)
    best = None
    if os.path.exists(best_path):
        best_checkpoint = eval_fid.load_checkpoint(best_path, {"generator", "epoch", "global_step"}, Args.exp_name)
        best = {"epoch": best_checkpoint["epoch"], **final}  # best.pt may hold the last generator itself
        if best_checkpoint["global_step"] != global_step:
            generator.load_state_dict(best_checkpoint["generator"])  # `samples` stay the last generator's
            best_samples = generate(generator, eval_noise, eval_labels)
            best.update(evaluator.full(best_samples, labels=eval_labels if args.conditional else None))
    for key in ("fid", "kid", "precision", "recall", "classifier_fid", "digits_covered", "label_accuracy"):
        if key in final:
            writer.add_scalar(f"final/{key}", final[key], global_step)
        if best and key in best:
            writer.add_scalar(f"best/{key}", best[key], global_step)
    hparams = {
        key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
    }
    writer.add_hparams(hparams, {f"hparam/{k}": final[k] for k in ("fid", "kid", "precision", "recall")}, run_name=".")
    writer.close()
    summary = {
        "run_name": run_name,
        "epochs": args.epochs,
        "step": global_step,
        "critic_step": critic_step,
        "device": str(device),
        "train_seconds": train_seconds,
        "final": final,
        "best": best,
        "provenance": provenance,
        "history": history,
        "args": asdict(args),
    }
    with open(f"{run_dir}/metrics.json.tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(f"{run_dir}/metrics.json.tmp", f"{run_dir}/metrics.json")
    if args.save_samples:
        eval_fid.save_samples_png(samples, args.save_samples)
    print(eval_fid.format_table({k: v for k, v in final.items() if k != "class_histogram"}))
    if best:
        print(
            f"best.pt, epoch {best['epoch']}: FID {best['fid']:.2f} KID {best['kid']:.4f} "
            f"precision {best['precision']:.3f} recall {best['recall']:.3f}"
        )
    print(
        f"{run_name}: FID {final['fid']:.2f} KID {final['kid']:.4f} precision {final['precision']:.3f} "
        f"recall {final['recall']:.3f} after {args.epochs} epochs, {train_seconds:.0f}s of training on {device}"
    )
