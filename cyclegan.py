"""CycleGAN between MNIST (28x28) and USPS (16x16): two mappings trained with adversarial and cycle-consistency losses.
Zhu, Park, Isola & Efros 2017, "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks" (1703.10593).
Run: python cyclegan.py --bf16 --data-dir ../shared/data --inception-weights ../shared/weights/pt_inception-2015-12-05-pool3.pth
"""

import json
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
    """folder holding MNIST/raw and USPS/usps.bz2 (torchvision downloads them there when missing and online)"""
    num_train_images: int = 60000
    """use the first N MNIST and (at most 7,291) USPS training images (fewer = shorter epochs, e.g. for smoke tests)"""

    # optimisation
    epochs: int = 10
    """number of passes over the MNIST training images (USPS batches are drawn from their own shuffled passes)"""
    batch_size: int = 64
    """images of each domain per step"""
    lr: float = 2e-4
    """Adam learning rate of all four networks (the paper's value)"""
    beta1: float = 0.5
    """Adam beta1"""
    beta2: float = 0.999
    """Adam beta2"""

    # CycleGAN
    gan_loss: Literal["lsgan", "bce"] = "lsgan"
    """adversarial loss: least squares (the paper's choice, more stable) or the original cross-entropy"""
    lambda_cyc: float = 10.0
    """weight of the cycle losses |F(G(x)) - x|_1 + |G(F(y)) - y|_1"""
    lambda_id: float = 0.0
    """weight (times lambda_cyc, as in the paper's code) of the identity loss: G(y resized to 28) ~ y, F(x resized to 16) ~ x"""
    n_res_blocks: int = 2
    """residual blocks in each mapping, at 16x16 resolution"""
    channels: int = 64
    """channels of the mappings' residual trunk"""
    pool_size: int = 50
    """history of generated images per discriminator; each fake is swapped with a stored one with probability 1/2"""

    # evaluation, logging and checkpoints
    log_every: int = 100
    """log losses every N steps"""
    eval_every: int = 1
    """label-kept accuracy both ways (and a translation grid) every N epochs"""
    eval_samples: int = 10000
    """evaluate on the first N test images of each domain (USPS test has 2,007, MNIST test 10,000)"""
    reference_size: int = 10000
    """MNIST test images that form the FID reference of F(USPS test) (the first N)"""
    inception_weights: Optional[str] = None
    """FID Inception state dict for offline use (../shared/weights/pt_inception-2015-12-05-pool3.pth); default: download"""
    cache_dir: str = eval_fid.DEFAULT_CACHE_DIR
    """where eval_fid caches its MNIST and USPS classifiers and reference features"""
    checkpoint_every: int = 1
    """write runs/{run_name}/checkpoint.pt every N epochs (atomically)"""
    resume: Optional[str] = None
    """checkpoint to continue from: same run name, step, optimisers, pools and random state"""


MNIST_SIZE, USPS_SIZE = 28, 16


class ResidualBlock(nn.Module):
    """x + conv-IN-ReLU-conv-IN(x), as in the paper's generators."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"), nn.InstanceNorm2d(channels, affine=True),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(channels, affine=True),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MnistToUsps(nn.Module):
    """G: 28x28 -> pad to 32 -> conv 7x7 -> stride-2 conv -> 16x16 trunk with residual blocks -> conv -> Tanh."""

    def __init__(self, channels: int, n_res_blocks: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConstantPad2d(2, -1.0),  # 28 -> 32 with background (-1), so one stride-2 step lands on 16
            nn.Conv2d(1, channels // 2, 7, padding=3, padding_mode="reflect"), nn.InstanceNorm2d(channels // 2, affine=True), nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 4, 2, 1), nn.InstanceNorm2d(channels, affine=True), nn.ReLU(),
            *[ResidualBlock(channels) for _ in range(n_res_blocks)],
            nn.Conv2d(channels, 1, 7, padding=3, padding_mode="reflect"), nn.Tanh(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UspsToMnist(nn.Module):
    """F: 16x16 -> conv 7x7 -> trunk with residual blocks -> transposed conv to 32x32 -> conv -> crop to 28 -> Tanh."""

    def __init__(self, channels: int, n_res_blocks: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 7, padding=3, padding_mode="reflect"), nn.InstanceNorm2d(channels, affine=True), nn.ReLU(),
            *[ResidualBlock(channels) for _ in range(n_res_blocks)],
            nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1), nn.InstanceNorm2d(channels // 2, affine=True), nn.ReLU(),
            nn.Conv2d(channels // 2, 1, 7, padding=3, padding_mode="reflect"), nn.Tanh(),
        )  # fmt: skip

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)[:, :, 2:-2, 2:-2]  # 32 -> 28: the inverse of G's padding


class PatchDiscriminator(nn.Module):
    """PatchGAN: stride-2 4x4 convs 64 -> 128 (IN), then a 3x3 conv to one logit per patch (7x7 on MNIST, 4x4 on USPS)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 64, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 4, 2, 1), nn.InstanceNorm2d(128, affine=True), nn.LeakyReLU(0.2),
            nn.Conv2d(128, 1, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def init_weights(module: nn.Module):
    """The paper's code: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.InstanceNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def adversarial_loss(logits: torch.Tensor, is_real: bool, kind: str) -> torch.Tensor:
    """Least squares (D(x) - 1)^2 / D(x)^2, or cross-entropy against 1 / 0, averaged over patches and images."""
    if kind == "lsgan":
        return (logits - float(is_real)).square().mean()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(is_real)))


def cycle_loss(original: torch.Tensor, translated: torch.Tensor, back: nn.Module) -> torch.Tensor:
    """|back(translated) - original|_1, a mean over pixels: |F(G(x)) - x|_1 or |G(F(y)) - y|_1."""
    return (back(translated).float() - original.float()).abs().mean()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize, for the identity loss across the two sizes and for showing 16x16 images next to 28x28 ones."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def identity_loss(target_domain_images: torch.Tensor, mapping: nn.Module, source_size: int) -> torch.Tensor:
    """|mapping(y') - y|_1 where y' is y resized to the mapping's input size: a mapping should leave alone an image
    that already belongs to its target domain (the paper's identity loss, across the two image sizes)."""
    return cycle_loss(target_domain_images, resize(target_domain_images, source_size), mapping)


class HistoryPool:
    """The paper's image buffer: D sees past fakes too. Until full, fakes go in and pass through; then each fake,
    with probability 1/2, is swapped with a random stored one (the old image goes to D, the new one is stored).

    The random choices come from a CPU generator, so the pool causes no host-device sync; a batch's swaps hit
    distinct slots, a vectorised stand-in for the paper's one-image-at-a-time loop.
    """

    def __init__(self, size: int, image_shape: tuple, device, seed: int):
        self.size, self.filled = size, 0
        self.images = torch.zeros(size, *image_shape, device=device)
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, fakes: torch.Tensor) -> torch.Tensor:
        fakes = fakes.detach().float()
        if self.size == 0:
            return fakes
        out = fakes.clone()
        take = min(self.size - self.filled, len(fakes))
        self.images[self.filled : self.filled + take] = fakes[:take]
        self.filled += take
        swap = (torch.rand(len(fakes) - take, generator=self.rng) < 0.5).nonzero().flatten() + take
        swap = swap[: self.size]
        slots = torch.randperm(self.size, generator=self.rng)[: len(swap)].to(self.images.device)
        swap = swap.to(self.images.device)
        out[swap] = self.images[slots]
        self.images[slots] = fakes[swap]
        return out

    def state_dict(self) -> dict:
        return {"images": self.images, "filled": self.filled, "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict):
        self.images.copy_(state["images"])
        self.filled = state["filled"]
        self.rng.set_state(state["rng"])


@torch.no_grad()
def translate(mapping: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """A mapping applied in batches (eval mode is the same as train mode here: instance norm has no running stats)."""
    return torch.cat([mapping(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def label_kept(classifier: nn.Module, translated: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of translated digits the target domain's classifier reads as the source digit's label."""
    images01 = ((translated + 1) / 2).clamp(0, 1).contiguous(memory_format=torch.channels_last)
    predicted = torch.cat([classifier(images01[i : i + 1000]).argmax(1) for i in range(0, len(images01), 1000)])
    return (predicted == labels).double().mean().item()


def translation_grid(x: torch.Tensor, forward: nn.Module, backward: nn.Module, size: int) -> torch.Tensor:
    """Rows of x, forward(x), backward(forward(x)), all shown at `size` x `size` (16x16 images upsampled)."""
    with torch.no_grad():
        translated = forward(x)
        rows = [resize(x, size), resize(translated, size), resize(backward(translated), size)]
    return torchvision.utils.make_grid(torch.cat(rows).float(), nrow=len(x), normalize=True, value_range=(-1, 1))


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by this script, or one clear error line."""
    return eval_fid.load_checkpoint(path, {"mnist_to_usps", "usps_to_mnist", "epoch"}, Args.exp_name)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.eval_samples < 10:  # FID needs a few samples, and the translation grids show 10 test digits
        eval_fid.fail(f"--eval-samples must be at least 10, got {args.eval_samples}")
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

    # Both datasets as [-1, 1] tensors on the device; batches are index slices, no per-sample PIL work.
    try:
        mnist_train, _ = eval_fid.load_mnist(args.data_dir, train=True)
        mnist_test, mnist_test_labels = eval_fid.load_mnist(args.data_dir, train=False)
        usps_train, _ = eval_fid.load_usps(args.data_dir, train=True)
        usps_test, usps_test_labels = eval_fid.load_usps(args.data_dir, train=False)
        evaluator = eval_fid.Evaluator(
            args.data_dir, args.inception_weights, args.cache_dir, str(device), reference_size=args.reference_size
        )
        mnist_classifier = evaluator.classifier()  # trained once and cached; fail now rather than after training
        usps_classifier = eval_fid.load_or_train_classifier("USPS", args.data_dir, args.cache_dir, device)
        evaluator.inception()
    except eval_fid.EvalError as e:
        eval_fid.fail(str(e))

    def to_device(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 127.5 - 1).unsqueeze(1).to(device, memory_format=torch.channels_last)

    mnist_train, usps_train = (
        to_device(mnist_train[: args.num_train_images]),
        to_device(usps_train[: args.num_train_images]),
    )
    mnist_test, usps_test = to_device(mnist_test[: args.eval_samples]), to_device(usps_test[: args.eval_samples])
    mnist_test_labels = mnist_test_labels[: args.eval_samples].to(device)
    usps_test_labels = usps_test_labels[: args.eval_samples].to(device)
    steps_per_epoch = len(mnist_train) // args.batch_size
    usps_batches_per_pass = len(usps_train) // args.batch_size
    if steps_per_epoch == 0 or usps_batches_per_pass == 0:
        eval_fid.fail(f"--num-train-images {args.num_train_images} is smaller than one batch of {args.batch_size}")
    batch_order = torch.Generator().manual_seed(args.seed)

    mnist_to_usps = MnistToUsps(args.channels, args.n_res_blocks).to(device, memory_format=torch.channels_last)  # G
    usps_to_mnist = UspsToMnist(args.channels, args.n_res_blocks).to(device, memory_format=torch.channels_last)  # F
    mnist_critic = PatchDiscriminator().to(device, memory_format=torch.channels_last)  # D_X: real MNIST vs F(y)
    usps_critic = PatchDiscriminator().to(device, memory_format=torch.channels_last)  # D_Y: real USPS vs G(x)
    for network in (mnist_to_usps, usps_to_mnist, mnist_critic, usps_critic):
        network.apply(init_weights)
    fused = device.type in ("cuda", "cpu")  # one kernel per step instead of one per parameter tensor
    adam = dict(lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)
    optimizer_g = torch.optim.Adam([*mnist_to_usps.parameters(), *usps_to_mnist.parameters()], **adam)
    optimizer_d = torch.optim.Adam([*mnist_critic.parameters(), *usps_critic.parameters()], **adam)
    fake_mnist_pool = HistoryPool(args.pool_size, (1, MNIST_SIZE, MNIST_SIZE), device, seed=args.seed + 2)
    fake_usps_pool = HistoryPool(args.pool_size, (1, USPS_SIZE, USPS_SIZE), device, seed=args.seed + 3)
    networks = {
        "mnist_to_usps": mnist_to_usps,
        "usps_to_mnist": usps_to_mnist,
        "mnist_critic": mnist_critic,
        "usps_critic": usps_critic,
    }
    grid_mnist, grid_usps = mnist_test[:10], usps_test[:10]

    start_epoch, global_step, train_seconds, best_metric, history = 0, 0, 0.0, -1.0, []
    usps_order, usps_position = torch.randperm(len(usps_train), generator=batch_order).to(device), 0
    if checkpoint:  # its networks and optimisers
        try:
            for name, network in networks.items():
                network.load_state_dict(checkpoint[name])
            optimizer_g.load_state_dict(checkpoint["optimizer_g"])
            optimizer_d.load_state_dict(checkpoint["optimizer_d"])
            fake_mnist_pool.load_state_dict(checkpoint["pools"]["mnist"])
            fake_usps_pool.load_state_dict(checkpoint["pools"]["usps"])
        except (RuntimeError, ValueError, KeyError) as e:
            eval_fid.fail(f"{checkpoint_file} does not match these networks/args: {' '.join(str(e).split())[:200]}")
    if args.resume:  # and where the run stopped: counters, history, random state
        start_epoch, global_step = checkpoint["epoch"], checkpoint["global_step"]
        train_seconds, best_metric = checkpoint["train_seconds"], checkpoint["best_metric"]
        history = checkpoint["history"]
        usps_order, usps_position = checkpoint["usps_order"].to(device), checkpoint["usps_position"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        batch_order.set_state(checkpoint["rng"]["batch_order"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
        print(f"resumed {run_name} at epoch {start_epoch}, step {global_step}")
    # The command line wins over a checkpoint: a resumed run may change its learning rates.
    for optimizer in (optimizer_g, optimizer_d):
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
                **{name: network.state_dict() for name, network in networks.items()},
                "optimizer_g": optimizer_g.state_dict(),
                "optimizer_d": optimizer_d.state_dict(),
                "pools": {"mnist": fake_mnist_pool.state_dict(), "usps": fake_usps_pool.state_dict()},
                "usps_order": usps_order,
                "usps_position": usps_position,
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
        mnist_order = torch.randperm(len(mnist_train), generator=batch_order).to(device)
        for step_in_epoch in range(steps_per_epoch):
            x = mnist_train[mnist_order[step_in_epoch * args.batch_size : (step_in_epoch + 1) * args.batch_size]]
            if usps_position == usps_batches_per_pass:  # USPS is 8x smaller: start another shuffled pass
                usps_order, usps_position = torch.randperm(len(usps_train), generator=batch_order).to(device), 0
            y = usps_train[usps_order[usps_position * args.batch_size : (usps_position + 1) * args.batch_size]]
            usps_position += 1

            # Mappings step: fool both discriminators, come back by the cycle, optionally keep target-domain images.
            for critic in (mnist_critic, usps_critic):
                critic.requires_grad_(False)  # their weights need no gradient here, only their inputs do
            with autocast:
                fake_usps, fake_mnist = mnist_to_usps(x), usps_to_mnist(y)
                adversarial = adversarial_loss(usps_critic(fake_usps).float(), True, args.gan_loss) + adversarial_loss(
                    mnist_critic(fake_mnist).float(), True, args.gan_loss
                )
                cycle = cycle_loss(x, fake_usps, usps_to_mnist) + cycle_loss(y, fake_mnist, mnist_to_usps)
                g_loss = adversarial + args.lambda_cyc * cycle
                if args.lambda_id > 0:
                    identity = identity_loss(y, mnist_to_usps, MNIST_SIZE) + identity_loss(x, usps_to_mnist, USPS_SIZE)
                    g_loss = g_loss + args.lambda_id * args.lambda_cyc * identity
            optimizer_g.zero_grad(set_to_none=True)
            g_loss.backward()
            optimizer_g.step()
            for critic in (mnist_critic, usps_critic):
                critic.requires_grad_(True)

            # Discriminators step: real vs fakes from the history pools; halved, as in the paper, to slow D down.
            old_fake_usps, old_fake_mnist = fake_usps_pool(fake_usps), fake_mnist_pool(fake_mnist)
            with autocast:
                d_usps = adversarial_loss(usps_critic(y).float(), True, args.gan_loss) + adversarial_loss(
                    usps_critic(old_fake_usps).float(), False, args.gan_loss
                )
                d_mnist = adversarial_loss(mnist_critic(x).float(), True, args.gan_loss) + adversarial_loss(
                    mnist_critic(old_fake_mnist).float(), False, args.gan_loss
                )
                d_loss = 0.5 * (d_usps + d_mnist)
            optimizer_d.zero_grad(set_to_none=True)
            d_loss.backward()
            optimizer_d.step()
            global_step += 1

            if global_step % args.log_every == 0:  # the only host syncs of the loop
                values = {
                    "g_loss": g_loss.item(),
                    "d_loss": d_loss.item(),
                    "cycle_loss": cycle.item(),
                    "adversarial_loss": adversarial.item(),
                }
                if not all(np.isfinite(v) for v in values.values()):
                    message = f"non-finite loss at step {global_step} ({values})"
                    eval_fid.fail_diverged(message, checkpoint_path, args.resume)
                for key, value in values.items():
                    writer.add_scalar(f"losses/{key}", value, global_step)
                steps_per_second = (step_in_epoch + 1) / (time.time() - epoch_start)
                writer.add_scalar("charts/steps_per_second", steps_per_second, global_step)
                print(
                    f"epoch {epoch} step {global_step}: g_loss {values['g_loss']:.3f} d_loss {values['d_loss']:.3f} "
                    f"cycle {values['cycle_loss']:.3f} | {steps_per_second:.1f} steps/s"
                )
        train_seconds += time.time() - epoch_start
        writer.add_scalar("charts/epoch_seconds", time.time() - epoch_start, global_step)

        if epoch % args.eval_every == 0 or epoch == args.epochs:
            metrics = {
                "mnist_to_usps_label_kept": label_kept(
                    usps_classifier, translate(mnist_to_usps, mnist_test), mnist_test_labels
                ),
                "usps_to_mnist_label_kept": label_kept(
                    mnist_classifier, translate(usps_to_mnist, usps_test), usps_test_labels
                ),
            }
            history.append({"epoch": epoch, "step": global_step, "train_seconds": train_seconds, **metrics})
            for key, value in metrics.items():
                writer.add_scalar(f"eval/{key}", value, global_step)
            for name, grid in (
                ("mnist_to_usps", translation_grid(grid_mnist, mnist_to_usps, usps_to_mnist, MNIST_SIZE)),
                ("usps_to_mnist", translation_grid(grid_usps, usps_to_mnist, mnist_to_usps, MNIST_SIZE)),
            ):
                writer.add_image(f"translations/{name}", grid, global_step)  # rows: x, translated, back again
                torchvision.utils.save_image(grid, f"{run_dir}/{name}_epoch{epoch:03d}.png")
            print(
                f"epoch {epoch}: label kept MNIST->USPS {metrics['mnist_to_usps_label_kept']:.1%}, "
                f"USPS->MNIST {metrics['usps_to_mnist_label_kept']:.1%}, {train_seconds:.0f}s of training"
            )

        if epoch % args.checkpoint_every == 0 or epoch == args.epochs:
            if not all(torch.isfinite(p).all() for network in networks.values() for p in network.parameters()):
                eval_fid.fail_diverged(f"non-finite weights at epoch {epoch}", checkpoint_path, args.resume)
            # best.pt: the epoch whose weaker direction keeps the most labels
            worst_direction = (
                min(history[-1]["mnist_to_usps_label_kept"], history[-1]["usps_to_mnist_label_kept"]) if history else -1
            )
            improved = history and history[-1]["epoch"] == epoch and worst_direction > best_metric
            if improved:
                best_metric = worst_direction
            save_checkpoint(checkpoint_path, epoch)
            if improved:
                save_checkpoint(best_path, epoch)

    # Final evaluation of the last mappings, then of best.pt (the epoch that kept the most labels): label kept both
    # ways, and F(USPS test) as MNIST digits by FID, KID, precision and recall.
    def score_mappings() -> dict:
        usps_as_mnist = translate(usps_to_mnist, usps_test)
        return {
            "mnist_to_usps_label_kept": label_kept(
                usps_classifier, translate(mnist_to_usps, mnist_test), mnist_test_labels
            ),
            "usps_to_mnist_label_kept": label_kept(mnist_classifier, usps_as_mnist, usps_test_labels),
            **{f"usps_to_mnist_{key}": value for key, value in evaluator.full(usps_as_mnist).items()},
        }

    final = score_mappings()
    best = None
    if os.path.exists(best_path):
        best_checkpoint = eval_fid.load_checkpoint(best_path, {*networks, "epoch", "global_step"}, Args.exp_name)
        best = {"epoch": best_checkpoint["epoch"], **final}  # best.pt may hold the last mappings themselves
        if best_checkpoint["global_step"] != global_step:
            for name, network in networks.items():
                network.load_state_dict(best_checkpoint[name])
            best.update(score_mappings())
    for key in ("mnist_to_usps_label_kept", "usps_to_mnist_label_kept", "usps_to_mnist_fid", "usps_to_mnist_kid"):
        writer.add_scalar(f"final/{key}", final[key], global_step)
        if best:
            writer.add_scalar(f"best/{key}", best[key], global_step)
    hparams = {
        key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
    }
    metric_keys = ("mnist_to_usps_label_kept", "usps_to_mnist_label_kept", "usps_to_mnist_fid")
    writer.add_hparams(hparams, {f"hparam/{k}": final[k] for k in metric_keys}, run_name=".")
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
    print(eval_fid.format_table({k: v for k, v in final.items() if not k.endswith("class_histogram")}))
    print(
        f"{run_name}: label kept MNIST->USPS {final['mnist_to_usps_label_kept']:.1%}, USPS->MNIST "
        f"{final['usps_to_mnist_label_kept']:.1%}, FID of F(USPS test) {final['usps_to_mnist_fid']:.2f} after "
        f"{args.epochs} epochs, {train_seconds:.0f}s of training on {device}"
    )
