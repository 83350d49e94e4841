"""OT-GAN on MNIST: the generator minimises a mini-batch energy distance built from Sinkhorn distances in a learned critic space.
Salimans, Zhang, Radford & Metaxas 2018, "Improving GANs Using Optimal Transport" (arXiv:1803.05573).
Run: python otgan.py --bf16 --data-dir ../shared/data --inception-weights ../shared/weights/pt_inception-2015-12-05-pool3.pth
"""

import json
import math
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
    """bf16 autocast for the networks (faster on CPUs with AVX512-BF16/AMX and on GPUs; Sinkhorn stays fp32)"""

    # data
    data_dir: str = "data"
    """folder holding MNIST/raw (torchvision downloads it there when missing and online)"""
    num_train_images: int = 60000
    """train on the first N MNIST training images (fewer = shorter epochs, e.g. for smoke tests)"""

    # optimisation
    epochs: int = 30
    """number of passes over the training images (each step draws two real batches X and X')"""
    batch_size: int = 256
    """images in each of the four batches X, X' (real) and Y, Y' (generated); the paper used 8000 on 8 GPUs"""
    lr: float = 3e-4
    """Adam learning rate of both networks (the paper's value)"""
    beta1: float = 0.5
    """Adam beta1 of both networks"""
    beta2: float = 0.999
    """Adam beta2 of both networks"""
    latent_dim: int = 100
    """dimension of the generator's Gaussian input z"""

    # OT-GAN
    n_gen: int = 5
    """generator steps per critic step (the report used 5 and also tried 2; the paper used 3)"""
    embedding_dim: int = 256
    """dimension of the critic's embedding v(x); the transport cost is 1 - cos(v(x), v(y))"""
    sinkhorn_eps: float = 0.05
    """entropic regularisation of the Sinkhorn plan, in units of the cosine cost (0..2); smaller = closer to exact OT"""
    sinkhorn_iters: int = 100
    """log-domain Sinkhorn iterations per transport plan"""

    # evaluation, logging and checkpoints
    log_every: int = 20
    """log the energy distance every N training steps"""
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
    """z -> dense 7x7x256, BN, ReLU -> conv 5x5 -> 128, BN, ReLU -> up 5x5 -> 64, BN, ReLU -> up 5x5 -> 1, Tanh (dcgan.py's G)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 7 * 7 * 256, bias=False), nn.Unflatten(1, (256, 7, 7)), nn.BatchNorm2d(256), nn.ReLU(),
            nn.Conv2d(256, 128, 5, padding=2, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 5, 2, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, 1, 5, 2, 2, 1), nn.Tanh(),
        )  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Critic(nn.Module):
    """conv 5x5 s2 -> 64, LReLU(0.2); conv 5x5 s2 -> 128, LReLU(0.2); dense -> embedding, L2-normalised.

    No batch norm: an image's embedding must not depend on which of the four batches it came with.
    """

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 64, 5, 2, 2), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 5, 2, 2), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(128 * 7 * 7, embedding_dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x).float(), dim=1)  # unit vectors: the cosine cost is then 1 - dot product


def dcgan_init(module: nn.Module):
    """DCGAN initialisation: conv and dense weights N(0, 0.02), batch-norm scales N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def cosine_cost(x_embedding: torch.Tensor, y_embedding: torch.Tensor) -> torch.Tensor:
    """C[i, j] = 1 - cos(v(x_i), v(y_j)) for unit-norm embeddings."""
    return 1 - x_embedding @ y_embedding.T


@torch.no_grad()
def sinkhorn_plan(cost: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Entropic transport plan between uniform marginals: argmin_M <M, C> - eps H(M), by Sinkhorn in the log domain.

    M = exp(u_i + v_j - C_ij / eps); u and v alternately make the row sums 1/n and the column sums 1/m. Working
    with log-sums keeps small eps from underflowing exp(-C/eps) to 0, which breaks the textbook matrix-scaling form.
    """
    n, m = cost.shape
    log_kernel = -cost.float() / eps
    log_row_mass, log_column_mass = -math.log(n), -math.log(m)
    u = torch.zeros(n, device=cost.device)
    v = torch.zeros(m, device=cost.device)
    for _ in range(iters):
        u = log_row_mass - torch.logsumexp(log_kernel + v[None, :], dim=1)
        v = log_column_mass - torch.logsumexp(log_kernel + u[:, None], dim=0)
    return torch.exp(log_kernel + u[:, None] + v[None, :])


def sinkhorn_distance(x_embedding: torch.Tensor, y_embedding: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """W_c(X, Y) = <M, C>: gradients flow through the cost C only; the plan M is a constant (the paper's choice,
    justified by the envelope theorem: M minimises the objective, so its own gradient contribution vanishes)."""
    cost = cosine_cost(x_embedding, y_embedding)
    return (sinkhorn_plan(cost, eps, iters) * cost).sum()


def minibatch_energy_distance(x, x_prime, y, y_prime, eps: float, iters: int) -> torch.Tensor:
    """D^2 = W(X,Y) + W(X,Y') + W(X',Y) + W(X',Y') - 2 W(X,X') - 2 W(Y,Y') on embeddings of two real (X, X') and two
    generated (Y, Y') batches (the paper's equation 9). Zero in expectation when generated and real data match."""

    def w(a, b):
        return sinkhorn_distance(a, b, eps, iters)

    return w(x, y) + w(x, y_prime) + w(x_prime, y) + w(x_prime, y_prime) - 2 * w(x, x_prime) - 2 * w(y, y_prime)


@torch.no_grad()
def generate(generator: nn.Module, noise: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Samples with G in eval mode: batch norm uses running statistics, so G(z) does not depend on z's batch."""
    was_training = generator.training
    generator.eval()
    samples = torch.cat([generator(noise[i : i + batch_size]).float() for i in range(0, len(noise), batch_size)])
    generator.train(was_training)
    return samples


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, or one clear error line."""
    return eval_fid.load_checkpoint(path, {"generator", "critic", "epoch"}, Args.exp_name)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_samples <= 3:  # precision/recall use k=3 nearest neighbours: fail now, not after training
        eval_fid.fail(f"--eval-samples must be at least 4, got {args.eval_samples}")
    if args.sinkhorn_eps <= 0 or args.sinkhorn_iters < 1 or args.n_gen < 1:
        eval_fid.fail("--sinkhorn-eps must be > 0, --sinkhorn-iters and --n-gen >= 1")
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
        train_images, _ = eval_fid.load_mnist(args.data_dir, train=True)
        evaluator = eval_fid.Evaluator(
            args.data_dir, args.inception_weights, args.cache_dir, str(device), reference_size=args.reference_size
        )
        evaluator.classifier()  # trained once and cached; fail now rather than after training
        evaluator.inception()
    except eval_fid.EvalError as e:
        eval_fid.fail(str(e))
    train_images = (train_images[: args.num_train_images].float() / 127.5 - 1).unsqueeze(1)
    train_images = train_images.to(device, memory_format=torch.channels_last)
    steps_per_epoch = len(train_images) // (2 * args.batch_size)  # X and X' are disjoint slices of one permutation
    if steps_per_epoch == 0:
        eval_fid.fail(f"--num-train-images {len(train_images)} is smaller than two batches of {args.batch_size}")
    batch_order = torch.Generator().manual_seed(args.seed)
    eval_noise = torch.randn(args.eval_samples, args.latent_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    eval_noise = eval_noise.to(device)

    generator = Generator(args.latent_dim).to(device, memory_format=torch.channels_last)
    critic = Critic(args.embedding_dim).to(device, memory_format=torch.channels_last)
    generator.apply(dcgan_init)
    critic.apply(dcgan_init)
    fused = device.type in ("cuda", "cpu")  # one kernel per step instead of one per parameter tensor
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)
    optimizer_c = torch.optim.Adam(critic.parameters(), lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)

    start_epoch, global_step, train_seconds, best_metric, history = 0, 0, 0.0, float("inf"), []
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
        torch.set_rng_state(checkpoint["rng"]["torch"])
        batch_order.set_state(checkpoint["rng"]["batch_order"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        print(f"resumed {run_name} at epoch {start_epoch}, step {global_step}")
    # The command line wins over a checkpoint: a resumed run may change its learning rates.
    for optimizer in (optimizer_g, optimizer_c):
        for group in optimizer.param_groups:
            group["lr"] = args.lr

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
                "critic": critic.state_dict(),
                "optimizer_g": optimizer_g.state_dict(),
                "optimizer_c": optimizer_c.state_dict(),
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
        epoch_start = time.time()
        order = torch.randperm(len(train_images), generator=batch_order).to(device)
        for step_in_epoch in range(steps_per_epoch):
            batch = order[2 * step_in_epoch * args.batch_size : 2 * (step_in_epoch + 1) * args.batch_size]
            real, real_prime = train_images[batch].chunk(2)
            z = torch.randn(2 * args.batch_size, args.latent_dim, device=device)
            # Algorithm 1: every (n_gen + 1)-th step the critic ascends the energy distance; the others, G descends it.
            critic_step = global_step % (args.n_gen + 1) == 0
            trained, frozen = (critic, generator) if critic_step else (generator, critic)
            frozen.requires_grad_(False)  # the other network's weights need no gradient (its input still may)
            with autocast:
                fake, fake_prime = generator(z).chunk(2)  # one G pass: batch norm sees Y and Y' together
                embeddings = critic(torch.cat([real, real_prime, fake, fake_prime]))  # one pass for all four
            distance = minibatch_energy_distance(*embeddings.float().chunk(4), args.sinkhorn_eps, args.sinkhorn_iters)
            optimizer = optimizer_c if critic_step else optimizer_g
            optimizer.zero_grad(set_to_none=True)
            (-distance if critic_step else distance).backward()
            optimizer.step()
            frozen.requires_grad_(True)
            global_step += 1

            if global_step % args.log_every == 0:  # the only host sync of the loop
                distance_value = distance.item()
                if not np.isfinite(distance_value):
                    message = f"non-finite energy distance at step {global_step}"
                    eval_fid.fail_diverged(message, checkpoint_path, args.resume)
                writer.add_scalar("losses/energy_distance", distance_value, global_step)
                steps_per_second = (step_in_epoch + 1) / (time.time() - epoch_start)
                writer.add_scalar("charts/steps_per_second", steps_per_second, global_step)
                print(
                    f"epoch {epoch} step {global_step}: energy distance {distance_value:.4f} "
                    f"| {steps_per_second:.2f} steps/s"
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
            if not all(torch.isfinite(p).all() for p in [*generator.parameters(), *critic.parameters()]):
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
