"""Vanilla GAN on MNIST: MLP generator and discriminator, non-saturating loss, optional R1 penalty.
Goodfellow et al. 2014 (arXiv:1406.2661); R1 penalty: Mescheder et al. 2018 (arXiv:1801.04406).
Run: python vanilla_gan.py --data-dir ../shared/data --inception-weights ../shared/weights/pt_inception-2015-12-05-pool3.pth
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
    """number of passes over the training images"""
    batch_size: int = 64
    """images per discriminator and generator step"""
    lr_g: float = 2e-4
    """Adam learning rate of the generator"""
    lr_d: float = 2e-4
    """Adam learning rate of the discriminator"""
    beta1: float = 0.5
    """Adam beta1 of both networks (0.5 as in DCGAN: less momentum, less oscillation)"""
    beta2: float = 0.999
    """Adam beta2 of both networks"""
    latent_dim: int = 100
    """dimension of the generator's Gaussian input z"""
    lr_decay_epochs: tuple[int, ...] = ()
    """multiply both learning rates by --lr-decay-factor after each of these epochs (e.g. 150: a decay step in one run)"""
    lr_decay_factor: float = 0.5
    """the factor of each step of --lr-decay-epochs"""

    # the method
    r1_gamma: float = 0.0
    """R1 penalty weight gamma in gamma/2 * E||grad_x D(x)||^2 on real images (0 = off; try 10)"""
    d_dropout: float = 0.0
    """dropout after each hidden layer of D while training (0 = off); it adds no weights, the nets stay the imposed ones"""

    # evaluation, logging and checkpoints
    log_every: int = 100
    """log losses and D outputs every N generator steps"""
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
    save_samples: Optional[str] = None
    """write the final eval samples to this folder as lossless PNGs"""


class Generator(nn.Module):
    """The imposed MLP: z -> 256 -> 512 -> 1024 -> 784, LeakyReLU(0.2), Tanh."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 256), nn.LeakyReLU(0.2),
            nn.Linear(256, 512), nn.LeakyReLU(0.2),
            nn.Linear(512, 1024), nn.LeakyReLU(0.2),
            nn.Linear(1024, 784), nn.Tanh(),
        )  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, 1, 28, 28)


class Discriminator(nn.Module):
    """784 -> 1024 -> 512 -> 256 -> 1 with LeakyReLU(0.2); returns the logit (the sigmoid lives in the loss)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 1024), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(1024, 512), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(256, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).squeeze(1)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), written with softplus on logits: -log sigmoid(l) = softplus(-l)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss -log D(G(z)): strong gradients while D still rejects the fakes."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma/2 * E||grad_x D(x)||^2 on real images; `real` must require grad and have produced `real_logits`."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return gamma / 2 * grad.square().flatten(1).sum(1).mean()


@torch.no_grad()
def generate(generator: nn.Module, noise: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Samples in eval mode (batch norm uses its running statistics), then back to training mode."""
    generator.eval()
    batches = range(0, len(noise), batch_size)
    samples = torch.cat([generator(noise[i : i + batch_size]).float() for i in batches])
    generator.train()
    return samples


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, or one clear error line."""
    return eval_fid.load_checkpoint(path, {"generator", "discriminator", "epoch"}, Args.exp_name)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_samples <= 3:  # precision/recall use k=3 nearest neighbours: fail now, not after training
        eval_fid.fail(f"--eval-samples must be at least 4, got {args.eval_samples}")
    if args.lr_decay_factor <= 0 or any(epoch < 1 for epoch in args.lr_decay_epochs):
        eval_fid.fail("--lr-decay-factor must be positive and --lr-decay-epochs at least 1")
    if not 0 <= args.d_dropout < 1:  # nn.Dropout would raise only once the networks are built
        eval_fid.fail(f"--d-dropout must be in [0, 1), got {args.d_dropout}")
    checkpoint_file = args.resume
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
        train_images = eval_fid.load_mnist(args.data_dir, train=True)[0]
        evaluator = eval_fid.Evaluator(
            args.data_dir, args.inception_weights, args.cache_dir, str(device), reference_size=args.reference_size
        )
        evaluator.classifier()  # trained once and cached; fail now rather than after training
        evaluator.inception()
    except eval_fid.EvalError as e:
        eval_fid.fail(str(e))
    train_images = (train_images[: args.num_train_images].float() / 127.5 - 1).unsqueeze(1).to(device)
    steps_per_epoch = len(train_images) // args.batch_size
    if steps_per_epoch == 0:
        eval_fid.fail(f"--num-train-images {len(train_images)} is smaller than one batch of {args.batch_size}")
    batch_order = torch.Generator().manual_seed(args.seed)
    eval_noise = torch.randn(args.eval_samples, args.latent_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    eval_noise = eval_noise.to(device)

    generator = Generator(args.latent_dim).to(device)
    discriminator = Discriminator(args.d_dropout).to(device)
    fused = device.type in ("cuda", "cpu")  # one kernel per step instead of one per parameter tensor
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2), fused=fused)
    optimizer_d = torch.optim.Adam(
        discriminator.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2), fused=fused
    )

    start_epoch, global_step, train_seconds, best_metric, history = 0, 0, 0.0, float("inf"), []
    if checkpoint:  # its networks and optimisers
        try:
            generator.load_state_dict(checkpoint["generator"])
            discriminator.load_state_dict(checkpoint["discriminator"])
            optimizer_g.load_state_dict(checkpoint["optimizer_g"])
            optimizer_d.load_state_dict(checkpoint["optimizer_d"])
        except (RuntimeError, ValueError, KeyError) as e:
            eval_fid.fail(f"{checkpoint_file} does not match these networks/args: {' '.join(str(e).split())[:200]}")
    if args.resume:  # and where the run stopped: counters, history, random state
        start_epoch, global_step = checkpoint["epoch"], checkpoint["global_step"]
        train_seconds, best_metric = checkpoint["train_seconds"], checkpoint["best_metric"]
        history = checkpoint["history"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        batch_order.set_state(checkpoint["rng"]["batch_order"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        print(f"resumed {run_name} at epoch {start_epoch}, step {global_step}")

    def set_learning_rates(epoch: int):
        """The command line's rates win over a checkpoint's, stepped down after each of --lr-decay-epochs."""
        decay = args.lr_decay_factor ** sum(epoch > milestone for milestone in args.lr_decay_epochs)
        for optimizer, lr in ((optimizer_g, args.lr_g), (optimizer_d, args.lr_d)):
            for group in optimizer.param_groups:
                group["lr"] = lr * decay

    # The run's folder is made only once nothing at the start can fail any more: a failed start leaves no runs/RUN.
    run_name, run_dir = eval_fid.claim_run_dir(run_name, resumed=bool(args.resume))
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    def save_checkpoint(path: str, epoch: int):
        eval_fid.atomic_save(
            {
                "generator": generator.state_dict(),
                "discriminator": discriminator.state_dict(),
                "optimizer_g": optimizer_g.state_dict(),
                "optimizer_d": optimizer_d.state_dict(),
                "epoch": epoch,
                "global_step": global_step,
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
            real = train_images[batch]

            # Discriminator step: real and fake in one forward pass (no batch norm, so it is the same math).
            z = torch.randn(args.batch_size, args.latent_dim, device=device)
            real.requires_grad_(args.r1_gamma > 0)
            with autocast:
                fake = generator(z)
                real_logits, fake_logits = (
                    discriminator(torch.cat([real, fake.detach()])).float().split(args.batch_size)
                )
                d_loss = discriminator_loss(real_logits, fake_logits)
                r1 = (
                    r1_penalty(real_logits, real, args.r1_gamma)
                    if args.r1_gamma > 0
                    else torch.zeros((), device=device)
                )
            optimizer_d.zero_grad(set_to_none=True)
            (d_loss + r1).backward()
            optimizer_d.step()

            # Generator step: D's weights need no gradient here, only its input does.
            discriminator.requires_grad_(False)
            with autocast:
                g_loss = generator_loss(discriminator(fake).float())
            optimizer_g.zero_grad(set_to_none=True)
            g_loss.backward()
            optimizer_g.step()
            discriminator.requires_grad_(True)
            global_step += 1

            if global_step % args.log_every == 0:  # the only host syncs of the loop
                d_value, g_value = d_loss.item(), g_loss.item()
                if not (np.isfinite(d_value) and np.isfinite(g_value)):
                    message = f"non-finite loss at step {global_step} (D {d_value}, G {g_value})"
                    eval_fid.fail_diverged(message, checkpoint_path, args.resume)
                d_real, d_fake = torch.sigmoid(real_logits).mean().item(), torch.sigmoid(fake_logits).mean().item()
                writer.add_scalar("losses/d_loss", d_value, global_step)
                writer.add_scalar("losses/g_loss", g_value, global_step)
                writer.add_scalar("losses/r1_penalty", r1.item(), global_step)
                writer.add_scalar("charts/D(x)", d_real, global_step)
                writer.add_scalar("charts/D(G(z))", d_fake, global_step)
                steps_per_second = (global_step - epoch_start_step) / (time.time() - epoch_start)
                writer.add_scalar("charts/generator_steps_per_second", steps_per_second, global_step)
                print(
                    f"epoch {epoch} step {global_step}: d_loss {d_value:.3f} g_loss {g_value:.3f} "
                    f"D(x) {d_real:.3f} D(G(z)) {d_fake:.3f} | {steps_per_second:.1f} G steps/s"
                )
        train_seconds += time.time() - epoch_start
        writer.add_scalar("charts/epoch_seconds", time.time() - epoch_start, global_step)

        if epoch % args.eval_every == 0 or epoch == args.epochs:
            samples = generate(generator, eval_noise)
            metrics = evaluator.fast(samples)
            history.append({"epoch": epoch, "step": global_step, "train_seconds": train_seconds, **metrics})
            grid = torchvision.utils.make_grid(samples[:64], nrow=8, normalize=True, value_range=(-1, 1))
            writer.add_image("samples", grid, global_step)
            torchvision.utils.save_image(grid, f"{run_dir}/samples_epoch{epoch:03d}.png")
            for key in ("classifier_fid", "digits_covered", "kl_to_uniform"):
                writer.add_scalar(f"eval/{key}", metrics[key], global_step)
            print(
                f"epoch {epoch}: classifier FID {metrics['classifier_fid']:.2f}, "
                f"{metrics['digits_covered']}/10 digits, {train_seconds:.0f}s of training"
            )

        if epoch % args.checkpoint_every == 0 or epoch == args.epochs:
            weights_finite = all(
                torch.isfinite(p).all() for p in [*generator.parameters(), *discriminator.parameters()]
            )
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
    samples = generate(generator, eval_noise)
    final = evaluator.full(samples)
    best = None
    if os.path.exists(best_path):
        best_checkpoint = eval_fid.load_checkpoint(best_path, {"generator", "epoch", "global_step"}, Args.exp_name)
        best = {"epoch": best_checkpoint["epoch"], **final}  # best.pt may hold the last generator itself
        if best_checkpoint["global_step"] != global_step:
            generator.load_state_dict(best_checkpoint["generator"])  # `samples` stay the last generator's
            best_samples = generate(generator, eval_noise)
            best.update(evaluator.full(best_samples))
    for key in ("fid", "kid", "precision", "recall", "classifier_fid", "digits_covered"):
        writer.add_scalar(f"final/{key}", final[key], global_step)
        if best:
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
