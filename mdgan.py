"""MD-GAN: D embeds samples; real ones are pulled into a mixture of Gaussians on a simplex, fakes pushed out of it.
Eghbal-zadeh, Zellinger and Widmer 2019, "Mixture Density Generative Adversarial Networks" (arXiv:1811.00152).
Run: python mdgan.py --dataset ring8    (or --dataset mnist --data-dir ../shared/data --inception-weights ...)
"""

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torchvision
import tyro
from torch.utils.tensorboard import SummaryWriter

import eval_fid


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (the run name is {exp_name}__{dataset}__{seed}__{unix time})"""
    seed: int = 1
    """seed of torch, numpy, random and the batch order"""
    torch_deterministic: bool = True
    """deterministic kernels, so that the same seed on the same device gives the same result"""
    cuda: bool = True
    """train on CUDA when it is available"""
    bf16: bool = False
    """bf16 autocast for the networks (faster on CPUs with AVX512-BF16/AMX and on GPUs; losses stay fp32)"""

    # data
    dataset: Literal["ring8", "grid25", "grid9", "mnist"] = "ring8"
    """ring8: 8 Gaussians on a circle of radius 2 (std 0.02); grid25/grid9: 5x5/3x3 grids, spacing 2 (std 0.05)"""
    data_dir: str = "data"
    """folder holding MNIST/raw (torchvision downloads it there when missing and online)"""
    num_train_images: int = 60000
    """train on the first N MNIST training images (fewer = shorter epochs, e.g. for smoke tests)"""
    toy_steps_per_epoch: int = 1000
    """generator steps per epoch on the 2-D mixtures (fresh samples every step: there is no finite data set)"""

    # optimisation (None = the dataset's default: the paper's 2-D setting, or vanilla_gan.py's on MNIST)
    epochs: Optional[int] = None
    """number of epochs (default 40 on 2-D: four learning rates of 10,000 steps each; 100 on MNIST)"""
    batch_size: Optional[int] = None
    """samples per discriminator and generator step (default 512 on 2-D, about the authors' 500; 64 on MNIST)"""
    lr_g: Optional[float] = None
    """Adam learning rate of the generator (default 1e-3 on 2-D as in the authors' code, 2e-4 on MNIST)"""
    lr_d: Optional[float] = None
    """Adam learning rate of the discriminator (default 1e-3 on 2-D, 2e-4 on MNIST)"""
    lr_halve_every: Optional[int] = None
    """halve both learning rates every N generator steps; 0 keeps them constant (default 10,000 on 2-D as in the
    authors' code, constant on MNIST)"""
    beta1: float = 0.5
    """Adam beta1 of both networks (0.5 as in the authors' code)"""
    beta2: float = 0.999
    """Adam beta2 of both networks"""
    latent_dim: Optional[int] = None
    """dimension of the generator's input z (default 2 on 2-D as in the authors' code, 100 on MNIST)"""
    latent: Literal["normal", "uniform"] = "normal"
    """distribution of z: standard normal, or uniform on [-1, 1]^k as in the authors' 2-D code (on grid25 it did
    not cover more modes than normal z: see docs/unrolled_mdgan.md)"""

    # the method
    embedding_dim: int = 9
    """d: dimension of D's output embedding; the mixture has d+1 components on a simplex (authors' code: 9)"""
    cov_scale: Optional[float] = None
    """each component's covariance is cov_scale * I, centres at distance 1 from the origin (default 0.25 on 2-D as
    in the authors' code, where the components merge and lk peaks at the origin; 0.1 on MNIST, where lk peaks at
    the d+1 centres)"""
    mixture_lambda: Optional[float] = None
    """lambda in log(lambda - lk(D(G(z)))); default: the mixture's maximum likelihood, found numerically"""

    # evaluation, logging and checkpoints
    log_every: int = 100
    """log losses and D outputs every N generator steps"""
    eval_every: int = 1
    """evaluate (2-D: modes and scatter plot; MNIST: fast metric and grid) every N epochs"""
    eval_samples: int = 10000
    """samples for the per-epoch and final evaluation"""
    mode_min_share: float = 0.01
    """2-D: a mode counts as covered when it holds at least this share of the samples within 3 std of its centre"""
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
    """write the final eval samples to this folder (MNIST: lossless PNGs; 2-D: points.pt)"""


# The authors' 2-D lr and its halving, z size and covariance (on ring8, 0.1 covered 3/8 modes, 0.25 all 8); MNIST as
# vanilla_gan.py, with the narrower mixture whose lk peaks at its centres, which our MNIST runs used.
TOY_DEFAULTS = dict(epochs=40, batch_size=512, lr_g=1e-3, lr_d=1e-3, lr_halve_every=10000, latent_dim=2, cov_scale=0.25)
MNIST_DEFAULTS = dict(epochs=100, batch_size=64, lr_g=2e-4, lr_d=2e-4, lr_halve_every=0, latent_dim=100, cov_scale=0.1)


def mixture_modes(dataset: str) -> tuple[torch.Tensor, float]:
    """Centres (modes x 2) and standard deviation of the 2-D Gaussian mixtures."""
    if dataset == "ring8":
        angles = torch.arange(8) * (2 * math.pi / 8)
        return 2.0 * torch.stack([angles.cos(), angles.sin()], 1), 0.02
    side = {"grid25": 5, "grid9": 3}[dataset]
    axis = (torch.arange(side) - (side - 1) / 2) * 2.0
    return torch.cartesian_prod(axis, axis), 0.05


def latent_noise(n: int, dim: int, distribution: str, device="cpu", generator=None) -> torch.Tensor:
    """n inputs z for the generator, U(-1, 1)^dim or N(0, I)."""
    if distribution == "uniform":
        return 2 * torch.rand(n, dim, device=device, generator=generator) - 1
    return torch.randn(n, dim, device=device, generator=generator)


def scheduled_lr(base_lr: float, step: int, halve_every: int) -> float:
    """The learning rate after `step` generator steps: halved every `halve_every` steps, or constant when it is 0."""
    return base_lr * 0.5 ** (step // halve_every) if halve_every else base_lr


def sample_mixture(centres: torch.Tensor, std: float, n: int) -> torch.Tensor:
    """n points from the equal-weight mixture, drawn with the global RNG of the centres' device."""
    index = torch.randint(len(centres), (n,), device=centres.device)
    return centres[index] + std * torch.randn(n, 2, device=centres.device)


def mode_coverage(points: torch.Tensor, centres: torch.Tensor, std: float, min_share: float) -> dict:
    """Unrolled-GAN/VEEGAN metrics: a sample is high quality within 3 std of its nearest mode; a mode is covered
    when at least min_share of all samples are high-quality samples of that mode."""
    distance, nearest = torch.cdist(points.float(), centres.float()).min(1)
    high_quality = distance <= 3 * std
    per_mode = torch.bincount(nearest[high_quality], minlength=len(centres))
    return {
        "modes_covered": int((per_mode >= min_share * len(points)).sum()),
        "num_modes": len(centres),
        "high_quality": float(high_quality.float().mean()),
        "samples_per_mode": per_mode.tolist(),
    }


def scatter_image(real: torch.Tensor, fake: torch.Tensor, extent: float, size: int = 384) -> torch.Tensor:
    """A 3 x size x size scatter plot (real points grey, generated points red) drawn without matplotlib."""
    canvas = torch.ones(3, size, size)
    for points, colour in ((real, (0.6, 0.6, 0.6)), (fake, (0.85, 0.1, 0.1))):
        pixels = ((points.float().cpu() + extent) / (2 * extent) * (size - 2)).round().long()
        column, row = pixels[:, 0], (size - 2) - pixels[:, 1]  # y grows upwards in a plot, downwards in an image
        inside = (column >= 0) & (column < size - 1) & (row >= 0) & (row < size - 1)
        column, row = column[inside], row[inside]
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):  # 2x2 dots stay visible when the image is scaled down
            canvas[:, row + dy, column + dx] = torch.tensor(colour).unsqueeze(1)
    return canvas


EMBEDDING_BOUND = 2.5  # D's embeddings live in (-2.5, 2.5)^d, as in the authors' code


def bounded(x: torch.Tensor) -> torch.Tensor:
    """Squash D's output into the box (-EMBEDDING_BOUND, EMBEDDING_BOUND): without a bound D can push fakes
    arbitrarily far from every centre, where lk and hence the generator's gradient vanish."""
    return EMBEDDING_BOUND * (2 * torch.sigmoid(x) - 1)


class Generator(nn.Module):
    """The course's imposed MLP: z -> 256 -> 512 -> 1024 -> 784, LeakyReLU(0.2), Tanh."""

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
    """784 -> 1024 -> 512 -> 256 -> d with LeakyReLU(0.2): the imposed MLP with a bounded embedding, not a logit."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 1024), nn.LeakyReLU(0.2),
            nn.Linear(1024, 512), nn.LeakyReLU(0.2),
            nn.Linear(512, 256), nn.LeakyReLU(0.2),
            nn.Linear(256, embedding_dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bounded(self.net(x))


TOY_OUTPUT_BOUND = 6.0  # the authors' 2-D generator ends in 6 tanh: every mixture here lies inside (-6, 6)^2


class ToyGenerator(nn.Module):
    """The authors' 2-D generator: z -> 128 -> 128 -> 2 with ReLU and a bounded output, 6 tanh (on grid25 it covered
    23.6 modes on average over 5 seeds against 21.4 with a linear output, see docs/unrolled_mdgan.md)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return TOY_OUTPUT_BOUND * torch.tanh(self.net(z))


class ToyDiscriminator(nn.Module):
    """The authors' 2-D discriminator: 2 -> 128 -> 128 -> d with LeakyReLU(0.2) and a bounded embedding."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2), nn.Linear(128, embedding_dim)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bounded(self.net(x))


LOG_EPS = 1e-8  # keeps log(lambda - lk) finite when a fake lands on a centre (the authors' `reg`)


def simplex_centres(embedding_dim: int) -> torch.Tensor:
    """The d+1 vertices of a regular simplex in R^d, centred on the origin, at distance 1 from it."""
    corners = torch.eye(embedding_dim + 1, dtype=torch.float64)
    corners = corners - corners.mean(0)  # d+1 equidistant points spanning a d-dimensional subspace
    basis = torch.linalg.svd(corners)[2][:embedding_dim]  # orthonormal basis of that subspace
    centres = corners @ basis.T
    return (centres / centres.norm(dim=1, keepdim=True)).float()


def mixture_log_likelihood(embeddings: torch.Tensor, centres: torch.Tensor, variance: float) -> torch.Tensor:
    """log lk(e) = log sum_i 1/c N(e; mu_i, variance * I), by logsumexp: finite and with gradients far from every mode."""
    dim = centres.shape[1]
    log_normal = -torch.cdist(embeddings.float(), centres).square() / (2 * variance) - dim / 2 * math.log(
        2 * math.pi * variance
    )
    return torch.logsumexp(log_normal, dim=1) - math.log(len(centres))


def max_likelihood(centres: torch.Tensor, variance: float) -> float:
    """lambda = max_e lk(e). By symmetry the maximum near a centre lies on the segment from that centre to the
    origin (the other centres pull it slightly inwards), so a fine 1-D search along the segment finds it."""
    along = torch.linspace(0, 1, 20001, dtype=torch.float64).unsqueeze(1) * centres[0].double()
    return float(mixture_log_likelihood(along, centres, variance).exp().max())  # t = 0 is the origin


def generator_loss(fake_embeddings, centres, variance: float, lam: float) -> torch.Tensor:
    """log(lambda - lk(D(G(z)))), minimised: the generator pulls its embeddings onto the mixture's centres."""
    fake_lk = mixture_log_likelihood(fake_embeddings, centres, variance).exp()
    return torch.log(LOG_EPS + (lam - fake_lk).clamp_min(0)).mean()


def discriminator_loss(real_embeddings, fake_embeddings, centres, variance: float, lam: float) -> torch.Tensor:
    """-(log lk(D(x)) + log(lambda - lk(D(G(z))))): real embeddings into the mixture, fakes out of it.
    The fake term is exactly the generator's loss, which D maximises."""
    real_term = mixture_log_likelihood(real_embeddings, centres, variance).mean()
    return -(real_term + generator_loss(fake_embeddings, centres, variance, lam))


@torch.no_grad()
def generate(generator: nn.Module, noise: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([generator(noise[i : i + batch_size]).float() for i in range(0, len(noise), batch_size)])


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, or one clear error line."""
    return eval_fid.load_checkpoint(path, {"generator", "discriminator", "epoch", "args"}, Args.exp_name)


if __name__ == "__main__":
    args = tyro.cli(Args)
    toy = args.dataset != "mnist"
    for key, value in (TOY_DEFAULTS if toy else MNIST_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_samples <= 3:  # precision/recall use k=3 nearest neighbours: fail now, not after training
        eval_fid.fail(f"--eval-samples must be at least 4, got {args.eval_samples}")
    if args.embedding_dim < 1 or args.cov_scale <= 0:
        eval_fid.fail(
            f"--embedding-dim must be >= 1 and --cov-scale > 0, got {args.embedding_dim} and {args.cov_scale}"
        )
    if args.batch_size < 1 or args.toy_steps_per_epoch < 1:
        eval_fid.fail(
            f"--batch-size and --toy-steps-per-epoch must be >= 1, got {args.batch_size}, {args.toy_steps_per_epoch}"
        )
    if args.lr_halve_every < 0:
        eval_fid.fail(f"--lr-halve-every must be >= 0 steps (0: constant), got {args.lr_halve_every}")
    checkpoint_file = args.resume
    checkpoint = load_checkpoint(checkpoint_file) if checkpoint_file else None
    if checkpoint and checkpoint["args"].get("dataset") != args.dataset:  # same nets on 2-D: it would load silently
        eval_fid.fail(
            f"{args.resume} was trained with --dataset {checkpoint['args'].get('dataset')}; pass it to resume"
        )
    if checkpoint and checkpoint["args"].get("latent", "normal") != args.latent:  # before --latent, z was normal
        eval_fid.fail(
            f"{args.resume} was trained with --latent {checkpoint['args'].get('latent', 'normal')}; pass it to resume"
        )
    if checkpoint and toy and checkpoint.get("toy_output_bound") != TOY_OUTPUT_BOUND:  # same shapes: it would load
        eval_fid.fail(
            f"{args.resume} holds the earlier 2-D nets (linear generator output, ReLU discriminator); start a new run"
        )
    run_name = (
        checkpoint["run_name"] if checkpoint else f"{args.exp_name}__{args.dataset}__{args.seed}__{int(time.time())}"
    )

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    provenance = eval_fid.provenance(device)  # the commit this process loaded, whatever lands while it runs
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    # 2-D: the mixture is sampled afresh every step. MNIST: one [-1, 1] tensor on the device, sliced into batches.
    if toy:
        centres, std = mixture_modes(args.dataset)
        centres = centres.to(device)
        steps_per_epoch = args.toy_steps_per_epoch
        real_points = sample_mixture(centres, std, 2500)  # the grey cloud of the scatter plots
        extent = float(centres.abs().max()) + 1.5
    else:
        try:
            train_images = eval_fid.load_mnist(args.data_dir, train=True)[0][: args.num_train_images]
            evaluator = eval_fid.Evaluator(
                args.data_dir, args.inception_weights, args.cache_dir, str(device), reference_size=args.reference_size
            )
            evaluator.classifier()  # trained once and cached; fail now rather than after training
            evaluator.inception()
        except eval_fid.EvalError as e:
            eval_fid.fail(str(e))
        train_images = (train_images.float() / 127.5 - 1).unsqueeze(1).to(device)
        steps_per_epoch = len(train_images) // args.batch_size
        if steps_per_epoch == 0:
            eval_fid.fail(f"--num-train-images {len(train_images)} is smaller than one batch of {args.batch_size}")
    batch_order = torch.Generator().manual_seed(args.seed)
    eval_rng = torch.Generator().manual_seed(args.seed + 1)
    eval_noise = latent_noise(args.eval_samples, args.latent_dim, args.latent, generator=eval_rng).to(device)

    generator = (ToyGenerator(args.latent_dim) if toy else Generator(args.latent_dim)).to(device)
    discriminator = (ToyDiscriminator if toy else Discriminator)(args.embedding_dim).to(device)
    simplex = simplex_centres(args.embedding_dim).to(device)
    peak = max_likelihood(simplex, args.cov_scale)
    lam = args.mixture_lambda if args.mixture_lambda is not None else peak
    mixture = dict(centres=simplex, variance=args.cov_scale, lam=lam)
    print(f"mixture: {args.embedding_dim + 1} components on a simplex in R^{args.embedding_dim}, lambda = {lam:.6g}")
    if peak > 1.01 * mixture_log_likelihood(simplex[:1], simplex, args.cov_scale).exp():
        print(
            f"note: at --cov-scale {args.cov_scale} the components merge and lk peaks between the centres, not at "
            f"them (the authors' 2-D setting; the MNIST default is 0.1)"
        )
    fused = device.type in ("cuda", "cpu")  # one kernel per step instead of one per parameter tensor
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2), fused=fused)
    optimizer_d = torch.optim.Adam(
        discriminator.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2), fused=fused
    )

    def set_learning_rates(step: int):
        """Both optimisers' rates after `step` steps: the command line's, halved every --lr-halve-every steps."""
        for optimizer, lr in ((optimizer_g, args.lr_g), (optimizer_d, args.lr_d)):
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(lr, step, args.lr_halve_every)

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
    # The command line wins over a checkpoint: a resumed run may change its learning rates.
    set_learning_rates(global_step)

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
                "toy_output_bound": TOY_OUTPUT_BOUND if toy else None,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "batch_order": batch_order.get_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                },
            },
            path,
        )

    def evaluate(samples: torch.Tensor) -> dict:
        """2-D: modes covered and high-quality share; MNIST: classifier FID and digit coverage."""
        if toy:
            return mode_coverage(samples, centres, std, args.mode_min_share)
        return evaluator.fast(samples)

    checkpoint_path, best_path = f"{run_dir}/checkpoint.pt", f"{run_dir}/best.pt"
    for epoch in range(start_epoch + 1, args.epochs + 1):
        epoch_start = time.time()
        if not toy:
            order = torch.randperm(len(train_images), generator=batch_order).to(device)
        for step_in_epoch in range(steps_per_epoch):
            if toy:
                real = sample_mixture(centres, std, args.batch_size)
            else:
                real = train_images[order[step_in_epoch * args.batch_size : (step_in_epoch + 1) * args.batch_size]]
            z = latent_noise(args.batch_size, args.latent_dim, args.latent, device)

            # Discriminator step: real embeddings into the simplex mixture, fake ones out (one forward pass).
            with autocast:
                fake = generator(z)
                real_emb, fake_emb = discriminator(torch.cat([real, fake.detach()])).float().split(args.batch_size)
                d_loss = discriminator_loss(real_emb, fake_emb, **mixture)
            optimizer_d.zero_grad(set_to_none=True)
            d_loss.backward()
            optimizer_d.step()

            # Generator step: D's weights need no gradient here, only its input does.
            discriminator.requires_grad_(False)
            with autocast:
                g_loss = generator_loss(discriminator(fake).float(), **mixture)
            optimizer_g.zero_grad(set_to_none=True)
            g_loss.backward()
            optimizer_g.step()
            discriminator.requires_grad_(True)
            global_step += 1
            if args.lr_halve_every and global_step % args.lr_halve_every == 0:
                set_learning_rates(global_step)

            if global_step % args.log_every == 0:  # the only host syncs of the loop
                d_value, g_value = d_loss.item(), g_loss.item()
                if not (np.isfinite(d_value) and np.isfinite(g_value)):
                    message = f"non-finite loss at step {global_step} (D {d_value}, G {g_value})"
                    eval_fid.fail_diverged(message, checkpoint_path, args.resume)
                # lk / lambda in [0, 1] reads like D(x) and D(G(z)) of a plain GAN.
                d_real = (mixture_log_likelihood(real_emb, simplex, args.cov_scale).exp() / lam).mean().item()
                d_fake = (mixture_log_likelihood(fake_emb, simplex, args.cov_scale).exp() / lam).mean().item()
                writer.add_scalar("losses/d_loss", d_value, global_step)
                writer.add_scalar("losses/g_loss", g_value, global_step)
                writer.add_scalar("charts/lk(D(x))/lambda", d_real, global_step)
                writer.add_scalar("charts/lk(D(G(z)))/lambda", d_fake, global_step)
                steps_per_second = (step_in_epoch + 1) / (time.time() - epoch_start)
                writer.add_scalar("charts/steps_per_second", steps_per_second, global_step)
                writer.add_scalar("charts/learning_rate_g", optimizer_g.param_groups[0]["lr"], global_step)
                print(
                    f"epoch {epoch} step {global_step}: d_loss {d_value:.3f} g_loss {g_value:.3f} "
                    f"lk/lambda real {d_real:.3f} fake {d_fake:.3f} | {steps_per_second:.0f} steps/s"
                )
        train_seconds += time.time() - epoch_start
        writer.add_scalar("charts/epoch_seconds", time.time() - epoch_start, global_step)

        if epoch % args.eval_every == 0 or epoch == args.epochs:
            samples = generate(generator, eval_noise)
            metrics = evaluate(samples)
            history.append({"epoch": epoch, "step": global_step, "train_seconds": train_seconds, **metrics})
            if toy:
                image = scatter_image(real_points, samples[:2500], extent)
                writer.add_scalar("eval/modes_covered", metrics["modes_covered"], global_step)
                writer.add_scalar("eval/high_quality", metrics["high_quality"], global_step)
                print(
                    f"epoch {epoch}: {metrics['modes_covered']}/{metrics['num_modes']} modes, "
                    f"{metrics['high_quality']:.1%} high-quality samples, {train_seconds:.0f}s of training"
                )
            else:
                image = torchvision.utils.make_grid(samples[:64], nrow=8, normalize=True, value_range=(-1, 1))
                writer.add_scalar("eval/classifier_fid", metrics["classifier_fid"], global_step)
                writer.add_scalar("eval/digits_covered", metrics["digits_covered"], global_step)
                writer.add_scalar("eval/kl_to_uniform", metrics["kl_to_uniform"], global_step)
                print(
                    f"epoch {epoch}: classifier FID {metrics['classifier_fid']:.2f}, "
                    f"{metrics['digits_covered']}/10 digits, {train_seconds:.0f}s of training"
                )
            writer.add_image("samples", image, global_step)
            torchvision.utils.save_image(image, f"{run_dir}/samples_epoch{epoch:03d}.png")

        if epoch % args.checkpoint_every == 0 or epoch == args.epochs:
            weights_finite = all(
                torch.isfinite(p).all() for p in [*generator.parameters(), *discriminator.parameters()]
            )
            if not weights_finite:
                eval_fid.fail_diverged(f"non-finite weights at epoch {epoch}", checkpoint_path, args.resume)
            latest = history[-1] if history and history[-1]["epoch"] == epoch else None
            if latest:  # lower is better: classifier FID, or fewer modes then fewer high-quality samples
                score = -latest["modes_covered"] - latest["high_quality"] if toy else latest["classifier_fid"]
            improved = latest is not None and score < best_metric
            if improved:
                best_metric = score
            save_checkpoint(checkpoint_path, epoch)
            if improved:
                save_checkpoint(best_path, epoch)

    # Final evaluation on eval_samples samples of the last generator, then of best.pt (the epoch the run's metric
    # picked) from the same noise: modes on the 2-D mixtures; FID, KID, precision, recall on MNIST.
    def score(points: torch.Tensor) -> dict:
        return mode_coverage(points, centres, std, args.mode_min_share) if toy else evaluator.full(points)

    samples = generate(generator, eval_noise)
    final = score(samples)
    best = None
    if os.path.exists(best_path):
        best_checkpoint = eval_fid.load_checkpoint(best_path, {"generator", "epoch", "global_step"}, Args.exp_name)
        best = {"epoch": best_checkpoint["epoch"], **final}  # best.pt may hold the last generator itself
        if best_checkpoint["global_step"] != global_step:
            generator.load_state_dict(best_checkpoint["generator"])  # `samples` stay the last generator's
            best.update(score(generate(generator, eval_noise)))
    headline = ("modes_covered", "high_quality") if toy else ("fid", "kid", "precision", "recall")
    for key in headline:
        writer.add_scalar(f"final/{key}", final[key], global_step)
        if best:
            writer.add_scalar(f"best/{key}", best[key], global_step)
    hparams = {
        key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
    }
    writer.add_hparams(hparams, {f"hparam/{k}": final[k] for k in headline}, run_name=".")
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
    if args.save_samples and toy:
        os.makedirs(args.save_samples, exist_ok=True)
        eval_fid.atomic_save(samples.cpu(), f"{args.save_samples}/points.pt")
    elif args.save_samples:
        eval_fid.save_samples_png(samples, args.save_samples)
    if toy:
        print(
            f"{run_name}: {final['modes_covered']}/{final['num_modes']} modes covered, {final['high_quality']:.1%} "
            f"high-quality samples after {args.epochs} epochs, {train_seconds:.0f}s of training on {device}"
        )
    else:
        print(eval_fid.format_table({k: v for k, v in final.items() if k != "class_histogram"}))
        print(
            f"{run_name}: FID {final['fid']:.2f} KID {final['kid']:.4f} precision {final['precision']:.3f} "
            f"recall {final['recall']:.3f} after {args.epochs} epochs, {train_seconds:.0f}s of training on {device}"
        )
