"""DCGAN on MNIST with the practical guide's training tricks, each a flag and off by default.
Radford et al. 2015 (arXiv:1511.06434); tricks: Salimans et al. 2016, "Improved Techniques for Training GANs" (1606.03498).
Run: python dcgan.py --bf16 --data-dir ../shared/data --inception-weights ../shared/weights/pt_inception-2015-12-05-pool3.pth
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
    epochs: int = 25
    """number of passes over the training images"""
    batch_size: int = 64
    """images per discriminator and generator step"""
    lr_g: float = 1e-4
    """Adam learning rate of the generator"""
    lr_d: float = 1e-4
    """Adam learning rate of the discriminator"""
    beta1: float = 0.5
    """Adam beta1 of both networks (0.5 as in DCGAN: less momentum, less oscillation)"""
    beta2: float = 0.999
    """Adam beta2 of both networks"""
    latent_dim: int = 100
    """dimension of the generator's Gaussian input z"""

    # the architecture
    kernel_size: Literal[3, 4, 5] = 5
    """kernel size of every convolution in both networks (the guide compares 3, 4 and 5)"""
    g_activation: Literal["relu", "leaky_relu"] = "relu"
    """hidden activation of the generator: ReLU as in DCGAN, or LeakyReLU(0.2) as in the TensorFlow tutorial"""
    disc_bn: bool = False
    """batch norm after the discriminator's second convolution (the report found it hurt)"""

    # the tricks
    conditional: bool = False
    """one-hot label concatenated to z in G and projected onto D's features at its dense layer; logs a per-class grid"""
    real_label: float = 1.0
    """discriminator target for real images: 0.9 is one-sided label smoothing"""
    fake_label: float = 0.0
    """discriminator target for fakes: 0.1 (with --real-label 0.9) is two-sided smoothing, which the guide saw collapse"""
    label_flip: float = 0.0
    """share of discriminator targets swapped between real and fake in each batch (noisy labels), e.g. 0.05"""
    replay_size: int = 0
    """experience replay: a pool of the N most recent generated images (0 = off)"""
    replay_every: int = 5
    """with --replay-size: one extra discriminator step on a batch drawn from the pool every K generator steps"""
    minibatch_disc: Optional[tuple[int, int]] = None
    """minibatch discrimination with B kernels of dimension C before D's dense layers, e.g. `--minibatch-disc 100 5`"""
    vbn: bool = False
    """virtual batch norm in G: each sample normalised by a fixed reference batch's statistics plus its own"""
    vbn_reference_size: int = 64
    """size of the fixed reference batch of --vbn (it goes through G with every batch)"""

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


NUM_CLASSES = 10


class VirtualBatchNorm(nn.Module):
    """Batch norm whose statistics come from a fixed reference batch plus the sample itself (Salimans et al. 2016).

    The first `reference_size` rows of the input are the reference batch, normalised by their own statistics; every
    other row by the reference mean/mean-square mixed with its own (over space) at weight 1/(reference_size + 1), as
    in the authors' code. So a sample's output never depends on the rest of its batch.
    """

    def __init__(self, channels: int, reference_size: int, eps: float = 1e-5):
        super().__init__()
        self.reference_size, self.eps = reference_size, eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # statistics in fp32 even under bf16 autocast
        reference = x32[: self.reference_size]
        reference_mean = reference.mean((0, 2, 3), keepdim=True)
        reference_mean_sq = reference.square().mean((0, 2, 3), keepdim=True)
        own_weight = 1.0 / (self.reference_size + 1)
        mean = own_weight * x32.mean((2, 3), keepdim=True) + (1 - own_weight) * reference_mean
        mean_sq = own_weight * x32.square().mean((2, 3), keepdim=True) + (1 - own_weight) * reference_mean_sq
        is_reference = torch.arange(len(x), device=x.device).view(-1, 1, 1, 1) < self.reference_size
        mean = torch.where(is_reference, reference_mean, mean)
        mean_sq = torch.where(is_reference, reference_mean_sq, mean_sq)
        normalised = (x32 - mean) * torch.rsqrt(mean_sq - mean.square() + self.eps)
        return (normalised * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(x.dtype)


class Generator(nn.Module):
    """z (+ one-hot) -> dense 7x7x256, BN, act -> conv 5x5 -> 128, BN, act -> up 5x5 -> 64, BN, act -> up 5x5 -> 1, Tanh."""

    def __init__(self, args: Args):
        super().__init__()
        self.conditional, self.vbn, k = args.conditional, args.vbn, args.kernel_size
        ref = args.vbn_reference_size

        def norm(channels: int) -> nn.Module:
            return VirtualBatchNorm(channels, ref) if args.vbn else nn.BatchNorm2d(channels)

        def act() -> nn.Module:
            return nn.ReLU() if args.g_activation == "relu" else nn.LeakyReLU(0.2)

        # A stride-1 transposed convolution is a convolution; Conv2d's "same" padding keeps 7x7 for even kernels too.
        # Stride-2 transposed convolutions double the size for k = 3, 4, 5 with padding (k-1)//2, output_padding k%2.
        self.net = nn.Sequential(
            nn.Linear(args.latent_dim + NUM_CLASSES * args.conditional, 7 * 7 * 256, bias=False),
            nn.Unflatten(1, (256, 7, 7)), norm(256), act(),
            nn.Conv2d(256, 128, k, padding="same", bias=False), norm(128), act(),
            nn.ConvTranspose2d(128, 64, k, 2, (k - 1) // 2, k % 2, bias=False), norm(64), act(),
            nn.ConvTranspose2d(64, 1, k, 2, (k - 1) // 2, k % 2), nn.Tanh(),
        )  # fmt: skip
        if args.vbn:  # fixed once; saved in the state dict so a resumed run keeps the same reference batch
            self.register_buffer("reference_z", torch.randn(ref, args.latent_dim))
            self.register_buffer("reference_labels", torch.arange(ref) % NUM_CLASSES)

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.vbn:
            z = torch.cat([self.reference_z.to(z.dtype), z])
            labels = torch.cat([self.reference_labels, labels]) if self.conditional else None
        if self.conditional:
            z = torch.cat([z, F.one_hot(labels, NUM_CLASSES).to(z.dtype)], dim=1)
        images = self.net(z)
        return images[len(self.reference_z) :] if self.vbn else images


class MinibatchDiscrimination(nn.Module):
    """Appends o(x_i)_b = sum_{j != i} exp(-||M_i,b - M_j,b||_1) to f(x_i), with M_i = f(x_i) T, T in R^{A x B x C}.

    Samples that look like the rest of their batch get large o: the discriminator can see a collapsed batch.
    """

    def __init__(self, in_features: int, num_kernels: int, kernel_dim: int):
        super().__init__()
        self.num_kernels, self.kernel_dim = num_kernels, kernel_dim
        self.T = nn.Parameter(torch.randn(in_features, num_kernels * kernel_dim) / math.sqrt(in_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        rows = features @ self.T.to(features.dtype)
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # bf16 is too coarse for exp(-L1 distance)
        rows = rows.view(-1, self.num_kernels, self.kernel_dim)
        l1 = (rows.unsqueeze(0) - rows.unsqueeze(1)).abs().sum(3)  # (N, N, B): ||M_i,b - M_j,b||_1
        closeness = torch.exp(-l1).sum(1) - 1  # j = i adds exp(0) = 1 (with zero gradient): drop it
        return torch.cat([features, closeness.to(features.dtype)], dim=1)


class Discriminator(nn.Module):
    """conv 5x5 s2 -> 64, LReLU(0.2); conv 5x5 s2 -> 128, [BN], LReLU(0.2); [minibatch disc]; dense -> 1 (a logit).

    Conditional: the label enters the dense layer as a projection (Miyato & Koyama 2018, arXiv:1802.05637): the logit
    gains <embed(y), features>, i.e. the one-hot times a learned matrix dotted with the features. A plain one-hot
    concatenated before the output could only shift the logit per class; concatenated to a hidden dense layer it
    collapsed every label to one image (docs/dcgan.md, the ablation); the projection lets D judge image and label together.
    """

    def __init__(self, args: Args):
        super().__init__()
        k, self.conditional = args.kernel_size, args.conditional
        self.features = nn.Sequential(
            nn.Conv2d(1, 64, k, 2, (k - 1) // 2), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, k, 2, (k - 1) // 2), *([nn.BatchNorm2d(128)] if args.disc_bn else []), nn.LeakyReLU(0.2),
            nn.Flatten(),
        )  # fmt: skip
        width = 128 * 7 * 7
        self.minibatch = MinibatchDiscrimination(width, *args.minibatch_disc) if args.minibatch_disc else nn.Identity()
        width += args.minibatch_disc[0] if args.minibatch_disc else 0
        self.head = nn.Linear(width, 1)
        if args.conditional:  # one row per class; the same N(0, 0.02) start as the dense weights
            self.label_projection = nn.Parameter(0.02 * torch.randn(NUM_CLASSES, width))

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.minibatch(self.features(x))
        logits = self.head(h).squeeze(1)
        if self.conditional:
            # A one-hot product rather than label_projection[labels]: indexing's backward accumulates rows in
            # a thread-dependent order on CPU, so the same seed would not give the same weights.
            one_hot = F.one_hot(labels, NUM_CLASSES).to(h.dtype)
            logits = logits + ((one_hot @ self.label_projection.to(h.dtype)) * h).sum(1)
        return logits


def dcgan_init(module: nn.Module):
    """DCGAN initialisation: conv and dense weights N(0, 0.02), batch-norm scales N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, VirtualBatchNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def discriminator_targets(n: int, target: float, other: float, flip_rate: float, device) -> torch.Tensor:
    """n targets equal to `target`, each swapped to `other` with probability flip_rate (noisy labels)."""
    targets = torch.full((n,), target, device=device)
    if flip_rate > 0:
        targets = torch.where(torch.rand(n, device=device) < flip_rate, other, targets)
    return targets


def discriminator_loss(real_logits, fake_logits, real_targets, fake_targets) -> torch.Tensor:
    """Cross-entropy of D against (possibly smoothed or flipped) targets, real and fake batches weighted equally."""
    return F.binary_cross_entropy_with_logits(real_logits, real_targets) + F.binary_cross_entropy_with_logits(
        fake_logits, fake_targets
    )


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating -log D(G(z)); smoothing is for D only: G always aims at 1."""
    return F.softplus(-fake_logits).mean()


@torch.no_grad()
def generate(generator: nn.Module, noise: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Samples with G in eval mode: batch norm uses running statistics, so G(z) does not depend on z's batch."""
    was_training = generator.training
    generator.eval()
    samples = torch.cat(
        [
            generator(noise[i : i + batch_size], labels[i : i + batch_size]).float()
            for i in range(0, len(noise), batch_size)
        ]
    )
    generator.train(was_training)
    return samples


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, or one clear error line."""
    return eval_fid.load_checkpoint(path, {"generator", "discriminator", "epoch"}, Args.exp_name)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_samples <= 3:  # precision/recall use k=3 nearest neighbours: fail now, not after training
        eval_fid.fail(f"--eval-samples must be at least 4, got {args.eval_samples}")
    if args.minibatch_disc and min(args.minibatch_disc) < 1:
        eval_fid.fail(f"--minibatch-disc needs positive B and C, got {args.minibatch_disc}")
    if args.vbn and args.vbn_reference_size < 2:
        eval_fid.fail(f"--vbn-reference-size must be at least 2, got {args.vbn_reference_size}")
    if args.replay_size and (args.replay_size < args.batch_size or args.replay_every < 1):
        eval_fid.fail(f"--replay-size must hold one batch ({args.batch_size}) and --replay-every be >= 1")
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

    # MNIST as one [-1, 1] channels_last tensor on the device; batches are index slices, no per-sample PIL work.
    try:
        train_images, train_labels = eval_fid.load_mnist(args.data_dir, train=True)
        evaluator = eval_fid.Evaluator(
            args.data_dir, args.inception_weights, args.cache_dir, str(device), reference_size=args.reference_size
        )
        evaluator.classifier()  # trained once and cached; fail now rather than after training
        evaluator.inception()
    except eval_fid.EvalError as e:
        eval_fid.fail(str(e))
    train_images = (train_images[: args.num_train_images].float() / 127.5 - 1).unsqueeze(1)
    train_images = train_images.to(device, memory_format=torch.channels_last)
    train_labels = train_labels[: args.num_train_images].to(device)
    steps_per_epoch = len(train_images) // args.batch_size
    if steps_per_epoch == 0:
        eval_fid.fail(f"--num-train-images {len(train_images)} is smaller than one batch of {args.batch_size}")
    batch_order = torch.Generator().manual_seed(args.seed)
    eval_noise = torch.randn(args.eval_samples, args.latent_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    eval_noise = eval_noise.to(device)
    eval_labels = (torch.arange(args.eval_samples) % NUM_CLASSES).to(device)  # balanced; a grid row holds 0..9
    grid_size, grid_row = (100, 10) if args.conditional else (64, 8)

    generator = Generator(args).to(device, memory_format=torch.channels_last)  # ~same speed on CPU, faster on GPU
    discriminator = Discriminator(args).to(device, memory_format=torch.channels_last)
    generator.apply(dcgan_init)
    discriminator.apply(dcgan_init)
    fused = device.type in ("cuda", "cpu")  # one kernel per step instead of one per parameter tensor
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=args.lr_g, betas=(args.beta1, args.beta2), fused=fused)
    optimizer_d = torch.optim.Adam(
        discriminator.parameters(), lr=args.lr_d, betas=(args.beta1, args.beta2), fused=fused
    )
    # Experience replay: a ring buffer of recent fakes (and their labels) on the device.
    replay_images = torch.zeros(args.replay_size, 1, 28, 28, device=device)
    replay_labels = torch.zeros(args.replay_size, dtype=torch.long, device=device)
    replay_filled, replay_next = 0, 0

    start_epoch, global_step, train_seconds, best_metric, history = 0, 0, 0.0, float("inf"), []
    if checkpoint:  # its networks and optimisers
        try:
            generator.load_state_dict(checkpoint["generator"])
            discriminator.load_state_dict(checkpoint["discriminator"])
            optimizer_g.load_state_dict(checkpoint["optimizer_g"])
            optimizer_d.load_state_dict(checkpoint["optimizer_d"])
            replay_images.copy_(checkpoint["replay"]["images"])
            replay_labels.copy_(checkpoint["replay"]["labels"])
        except (RuntimeError, ValueError, KeyError) as e:
            eval_fid.fail(f"{checkpoint_file} does not match these networks/args: {' '.join(str(e).split())[:200]}")
    if args.resume:  # and where the run stopped: counters, history, random state
        start_epoch, global_step = checkpoint["epoch"], checkpoint["global_step"]
        replay_filled, replay_next = checkpoint["replay"]["filled"], checkpoint["replay"]["next"]
        train_seconds, best_metric = checkpoint["train_seconds"], checkpoint["best_metric"]
        history = checkpoint["history"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        batch_order.set_state(checkpoint["rng"]["batch_order"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        print(f"resumed {run_name} at epoch {start_epoch}, step {global_step}")
    # The command line wins over a checkpoint: a resumed run may change its learning rates.
    for optimizer, lr in ((optimizer_g, args.lr_g), (optimizer_d, args.lr_d)):
        for group in optimizer.param_groups:
            group["lr"] = lr

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
                "replay": {
                    "images": replay_images,
                    "labels": replay_labels,
                    "filled": replay_filled,
                    "next": replay_next,
                },
                "rng": {
                    "torch": torch.get_rng_state(),
                    "batch_order": batch_order.get_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                },
            },
            path,
        )

    def d_targets(n: int):
        """Real and fake targets for one discriminator step: smoothed values, a --label-flip share swapped."""
        real = discriminator_targets(n, args.real_label, args.fake_label, args.label_flip, device)
        fake = discriminator_targets(n, args.fake_label, args.real_label, args.label_flip, device)
        return real, fake

    checkpoint_path, best_path = f"{run_dir}/checkpoint.pt", f"{run_dir}/best.pt"
    for epoch in range(start_epoch + 1, args.epochs + 1):
        epoch_start = time.time()
        order = torch.randperm(len(train_images), generator=batch_order).to(device)
        for step_in_epoch in range(steps_per_epoch):
            batch = order[step_in_epoch * args.batch_size : (step_in_epoch + 1) * args.batch_size]
            real, labels = train_images[batch], train_labels[batch]  # fakes get the same labels (conditional)
            z = torch.randn(args.batch_size, args.latent_dim, device=device)

            # Discriminator step: real and fake batches in separate passes, so batch norm and minibatch
            # discrimination compare a sample only with its own kind (as in DCGAN and the guide).
            real_targets, fake_targets = d_targets(args.batch_size)
            with autocast:
                fake = generator(z, labels)
                real_logits = discriminator(real, labels).float()
                fake_logits = discriminator(fake.detach(), labels).float()
                d_loss = discriminator_loss(real_logits, fake_logits, real_targets, fake_targets)
            optimizer_d.zero_grad(set_to_none=True)
            d_loss.backward()
            optimizer_d.step()

            # Generator step: D's weights need no gradient here, only its input does.
            discriminator.requires_grad_(False)
            with autocast:
                g_loss = generator_loss(discriminator(fake, labels).float())
            optimizer_g.zero_grad(set_to_none=True)
            g_loss.backward()
            optimizer_g.step()
            discriminator.requires_grad_(True)
            global_step += 1

            # Experience replay: remember these fakes; every K steps, one more D step with old fakes.
            if args.replay_size:
                slots = (replay_next + torch.arange(args.batch_size, device=device)) % args.replay_size
                replay_images[slots], replay_labels[slots] = fake.detach().float(), labels
                replay_next = (replay_next + args.batch_size) % args.replay_size
                replay_filled = min(replay_filled + args.batch_size, args.replay_size)
                if global_step % args.replay_every == 0:
                    picked = torch.randint(replay_filled, (args.batch_size,), device=device)
                    replay_real_targets, replay_fake_targets = d_targets(args.batch_size)
                    with autocast:
                        replay_loss = discriminator_loss(
                            discriminator(real, labels).float(),
                            discriminator(replay_images[picked], replay_labels[picked]).float(),
                            replay_real_targets,
                            replay_fake_targets,
                        )
                    optimizer_d.zero_grad(set_to_none=True)
                    replay_loss.backward()
                    optimizer_d.step()

            if global_step % args.log_every == 0:  # the only host syncs of the loop
                d_value, g_value = d_loss.item(), g_loss.item()
                if not (np.isfinite(d_value) and np.isfinite(g_value)):
                    message = f"non-finite loss at step {global_step} (D {d_value}, G {g_value})"
                    eval_fid.fail_diverged(message, checkpoint_path, args.resume)
                d_real, d_fake = torch.sigmoid(real_logits).mean().item(), torch.sigmoid(fake_logits).mean().item()
                writer.add_scalar("losses/d_loss", d_value, global_step)
                writer.add_scalar("losses/g_loss", g_value, global_step)
                writer.add_scalar("charts/D(x)", d_real, global_step)
                writer.add_scalar("charts/D(G(z))", d_fake, global_step)
                steps_per_second = (step_in_epoch + 1) / (time.time() - epoch_start)
                writer.add_scalar("charts/steps_per_second", steps_per_second, global_step)
                print(
                    f"epoch {epoch} step {global_step}: d_loss {d_value:.3f} g_loss {g_value:.3f} "
                    f"D(x) {d_real:.3f} D(G(z)) {d_fake:.3f} | {steps_per_second:.1f} steps/s"
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
