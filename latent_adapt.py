"""Latent space adaptation: per digit, fit a Gaussian to the latents whose samples look most like real digits, sample it.
Post-hoc sampler of the "ShenaniGANs" student report (a trained GAN's N(0, I) replaced by 10 class-wise N(mu_y, sigma_y^2)).
Run: python latent_adapt.py runs/RUN/checkpoint.pt --data-dir ../shared/data --inception-weights ../shared/weights/pt_inception-2015-12-05-pool3.pth
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional

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
    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CHECKPOINT")]
    """checkpoint.pt or best.pt of an unconditional MNIST script with the imposed MLP generator (vanilla_gan.py, ...)"""

    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (the run name is {exp_name}__{checkpoint's run}__{seed}__{unix time})"""
    seed: int = 1
    """seed of the latents"""
    torch_deterministic: bool = True
    """deterministic kernels, so that the same seed on the same device gives the same result"""
    cuda: bool = True
    """sample on CUDA when it is available"""

    # the method
    num_latents: int = 20000
    """z ~ N(0, I) scored by the classifier and by their similarity to real digits of the predicted class"""
    quantile: float = 0.5
    """per digit, keep the latents whose similarity is at least this quantile of the digit's similarities (0 = keep all)"""
    per_class: int = 1000
    """samples per digit, by the classifier's label: 10 x per_class in all (the base sampler makes as many)"""
    batch_size: int = 1000
    """latents per generator / classifier / similarity batch"""
    max_draws_per_class: int = 200
    """give up (with an error) when a digit needs more than this many times per_class draws"""

    # evaluation and outputs
    data_dir: str = "data"
    """folder holding MNIST/raw (torchvision downloads it there when missing and online)"""
    inception_weights: Optional[str] = None
    """FID Inception state dict for offline use (../shared/weights/pt_inception-2015-12-05-pool3.pth); default: download"""
    cache_dir: str = eval_fid.DEFAULT_CACHE_DIR
    """where eval_fid caches its classifier and reference features"""
    reference_size: int = 10000
    """MNIST test images that form the FID reference (the first N)"""
    fast_only: bool = False
    """only the classifier metric (seconds) instead of FID, precision and recall (about 15 min per 10k samples on CPU)"""
    save_samples: Optional[str] = None
    """write the adapted samples here: a folder gets lossless PNGs, a .pt or .npz file gets one uint8 tensor"""


NUM_CLASSES = 10


class Generator(nn.Module):
    """The imposed MLP of the training scripts: z -> 256 -> 512 -> 1024 -> 784, LeakyReLU(0.2), Tanh."""

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


def load_generator(path: str) -> tuple[Generator, dict]:
    """The generator and the training run's info from a checkpoint, or one clear error line."""
    checkpoint = eval_fid.load_checkpoint(path, {"generator"})
    train_args = checkpoint.get("args", {})
    if type(train_args.get("latent_dim", 100)) is not int or train_args.get("latent_dim", 100) < 1:
        eval_fid.fail(
            f"{path} has latent_dim {train_args.get('latent_dim')!r} in its args; expected a positive integer"
        )
    if train_args.get("conditional"):
        eval_fid.fail(f"{path} holds a conditional generator; latent adaptation needs an unconditional one")
    generator = Generator(train_args.get("latent_dim", 100))
    try:
        generator.load_state_dict(checkpoint["generator"])
    except RuntimeError as e:
        eval_fid.fail(f"{path} does not hold the imposed MLP generator: {' '.join(str(e).split())[:200]}")
    info = {
        "run_name": checkpoint.get("run_name", Path(path).parent.name),
        "epoch": checkpoint.get("epoch"),
        "latent_dim": generator.net[0].in_features,
    }
    return generator.eval(), info


def reals_by_digit(images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Real images as unit-norm (M_d, 784) rows, one tensor per digit (computed once, used for every batch)."""
    unit = F.normalize(images.flatten(1).float(), dim=1)
    return [unit[labels == digit] for digit in range(NUM_CLASSES)]


def nearest_real_similarity(fakes: torch.Tensor, predicted: torch.Tensor, reals: list[torch.Tensor]) -> torch.Tensor:
    """Cosine similarity of each fake to its nearest real image of the fake's predicted digit (reals_by_digit's output).

    One matrix product per digit: the fakes predicted as y against the reals of digit y only.
    """
    fakes = F.normalize(fakes.flatten(1).float(), dim=1)
    similarity = torch.empty(len(fakes), device=fakes.device)
    for digit in range(NUM_CLASSES):
        of_digit = predicted == digit
        if of_digit.any():
            similarity[of_digit] = (fakes[of_digit] @ reals[digit].T).amax(dim=1)
    return similarity


def class_thresholds(similarity: torch.Tensor, predicted: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per digit, the `quantile` of the similarities of the latents predicted as that digit (NaN for an absent digit)."""
    thresholds = torch.full((NUM_CLASSES,), float("nan"))
    for digit in range(NUM_CLASSES):
        of_digit = similarity[predicted == digit]
        if len(of_digit):
            thresholds[digit] = torch.quantile(of_digit.float().cpu(), quantile)
    return thresholds


def fit_class_gaussians(latents: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the mean and standard deviation (diagonal, unbiased) of its latents: (10, d) each."""
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    if (counts < 2).any():
        missing = [d for d in range(NUM_CLASSES) if counts[d] < 2]
        raise ValueError(f"digits {missing} have fewer than 2 kept latents to fit a Gaussian to")
    means = torch.stack([latents[labels == d].mean(0) for d in range(NUM_CLASSES)])
    stds = torch.stack([latents[labels == d].std(0) for d in range(NUM_CLASSES)])
    return means, stds


@torch.no_grad()
def sample_balanced(
    generator: nn.Module,
    classify: Callable[[torch.Tensor], torch.Tensor],
    means: torch.Tensor,
    stds: torch.Tensor,
    per_class: int,
    batch_size: int,
    max_draws: int,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Exactly `per_class` samples of each digit as the classifier labels them, from z ~ N(mu_y, diag(sigma_y^2)).

    Returns samples (10 * per_class, 1, 28, 28) grouped by digit, their labels and the draws each digit needed.
    """
    samples, draws = [], []
    for digit in range(NUM_CLASSES):
        kept, num_kept, num_draws = [], 0, 0
        while num_kept < per_class:
            if num_draws >= max_draws:
                raise RuntimeError(f"digit {digit}: only {num_kept} of {per_class} samples after {num_draws} draws")
            z = means[digit] + stds[digit] * torch.randn(batch_size, means.shape[1], device=means.device)
            images = generator(z).float()
            images = images[classify(images) == digit]
            kept.append(images)
            num_kept += len(images)
            num_draws += batch_size
        samples.append(torch.cat(kept)[:per_class])
        draws.append(num_draws)
    labels = torch.arange(NUM_CLASSES, device=means.device).repeat_interleave(per_class)
    return torch.cat(samples), labels, draws


def histograms_image(
    similarity: torch.Tensor, predicted: torch.Tensor, thresholds: torch.Tensor, bins: int = 60
) -> torch.Tensor:
    """Per-digit histograms of the similarity (digits 0-4 top row, 5-9 bottom), threshold in red, as a (3, H, W) image.

    Drawn with tensor ops: the project needs no plotting library. All panels share the x range.
    """
    low, high, height, gap = similarity.min().item(), similarity.max().item(), 60, 4
    panel_width = 2 * bins
    image = torch.ones(3, 2 * height + 3 * gap, 5 * panel_width + 6 * gap)
    rows = torch.arange(height).unsqueeze(1)
    for digit in range(NUM_CLASSES):
        counts = torch.histc(similarity[predicted == digit].float().cpu(), bins, low, high)
        bar_heights = (counts / counts.max().clamp_min(1) * (height - 2)).round().repeat_interleave(2)
        panel = torch.where(rows >= height - bar_heights, 0.3, 0.92).expand(3, -1, -1).clone()  # grey bars
        if not thresholds[digit].isnan():
            column = int((thresholds[digit] - low) / max(high - low, 1e-12) * (panel_width - 1))
            panel[:, :, column] = torch.tensor([0.9, 0.1, 0.1]).unsqueeze(1)
        top, left = gap + (digit // 5) * (height + gap), gap + (digit % 5) * (panel_width + gap)
        image[:, top : top + height, left : left + panel_width] = panel
    return image


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not 0 <= args.quantile < 1:
        eval_fid.fail(f"--quantile must lie in [0, 1), got {args.quantile}")
    for name in ("num_latents", "per_class", "batch_size", "max_draws_per_class"):
        if getattr(args, name) < 1:
            eval_fid.fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if NUM_CLASSES * args.per_class < 4:  # precision/recall use k=3 nearest neighbours
        eval_fid.fail(f"--per-class {args.per_class} gives fewer than 4 samples")
    generator, source = load_generator(args.checkpoint)
    run_name = f"{args.exp_name}__{source['run_name']}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    provenance = eval_fid.provenance(device)  # the commit this process loaded, whatever lands while it runs
    generator = generator.to(device)
    try:
        evaluator = eval_fid.Evaluator(
            args.data_dir, args.inception_weights, args.cache_dir, str(device), reference_size=args.reference_size
        )
        evaluator.classifier()  # eval_fid's cached CNN (>= 99% MNIST test accuracy, checked when it is trained)
        if not args.fast_only:
            evaluator.inception()
        train_images, train_labels = eval_fid.load_mnist(args.data_dir, train=True)
    except eval_fid.EvalError as e:
        eval_fid.fail(str(e))
    # The run's folder is made only once nothing at the start can fail any more: a failed start leaves no runs/RUN.
    run_name, run_dir = eval_fid.claim_run_dir(run_name, resumed=False)
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )
    reals = reals_by_digit((train_images.float() / 255).to(device), train_labels.to(device))  # pixels in [0, 1]
    start = time.time()

    def classify(images: torch.Tensor) -> torch.Tensor:
        return evaluator.classifier_outputs(eval_fid.to_unit_range(images))[1]

    def generate(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([generator(z[i : i + args.batch_size]).float() for i in range(0, len(z), args.batch_size)])

    num_samples = NUM_CLASSES * args.per_class
    # The base sampler first, so that its samples are the same G(z) as drs.py's base with the same seed.
    base_samples = generate(torch.randn(num_samples, source["latent_dim"], device=device))

    # 1-2. Score many latents: the digit the classifier sees in G(z), and how close G(z) is to a real digit of it.
    latents = torch.randn(args.num_latents, source["latent_dim"], device=device)
    predicted, similarity = [], []
    for i in range(0, len(latents), args.batch_size):
        images = generate(latents[i : i + args.batch_size])
        predicted.append(classify(images))
        similarity.append(nearest_real_similarity((images + 1) / 2, predicted[-1], reals))
    predicted, similarity = torch.cat(predicted), torch.cat(similarity)

    # 3. Per-digit thresholds; 4. one diagonal Gaussian per digit over the kept latents.
    thresholds = class_thresholds(similarity, predicted, args.quantile)
    keep = similarity >= thresholds.to(device)[predicted]
    try:
        means, stds = fit_class_gaussians(latents[keep], predicted[keep])
        adapted_samples, _, draws = sample_balanced(
            generator, classify, means, stds, args.per_class, args.batch_size, args.max_draws_per_class * args.per_class
        )
    except (ValueError, RuntimeError) as e:
        eval_fid.fail(f"{e}; the generator rarely makes these digits (try a lower --quantile or more --num-latents)")
    adapt_seconds = time.time() - start
    kept_per_digit = torch.bincount(predicted[keep], minlength=NUM_CLASSES).tolist()
    print(
        f"kept {int(keep.sum())} of {args.num_latents} latents (per digit {kept_per_digit}); "
        f"draws per digit for {args.per_class} samples: {draws}; {adapt_seconds:.0f}s"
    )

    histograms = histograms_image(similarity.cpu(), predicted.cpu(), thresholds)
    torchvision.utils.save_image(histograms, f"{run_dir}/similarity_histograms.png")
    writer.add_image("similarity_histograms", histograms)
    for digit in range(NUM_CLASSES):
        writer.add_histogram(f"similarity/digit_{digit}", similarity[predicted == digit].cpu())

    results = {}
    for name, samples in (("base", base_samples), ("adapted", adapted_samples)):
        results[name] = (
            evaluator.fast(samples)
            if args.fast_only
            # drs.py and latent_adapt.py draw the same base samples from one checkpoint and seed: one Inception pass
            else evaluator.full(samples, cache_features=name == "base")
        )
        # Adapted (grouped by digit): column j shows ten samples of digit j. Base: its first 100 samples.
        shown = (
            samples.view(NUM_CLASSES, args.per_class, 1, 28, 28)[:, :10].transpose(0, 1).flatten(0, 1)
            if (name == "adapted" and args.per_class >= 10)
            else samples[:100]
        )
        grid = torchvision.utils.make_grid(shown, nrow=10, normalize=True, value_range=(-1, 1))
        writer.add_image(f"samples/{name}", grid)
        torchvision.utils.save_image(grid, f"{run_dir}/samples_{name}.png")
    headline = [
        k for k in ("fid", "kid", "precision", "recall", "classifier_fid", "digits_covered") if k in results["adapted"]
    ]
    for key in headline:
        writer.add_scalar(f"base/{key}", results["base"][key])
        writer.add_scalar(f"adapted/{key}", results["adapted"][key])
    hparams = {
        key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
    }
    writer.add_hparams(hparams, {f"hparam/{k}": results["adapted"][k] for k in headline}, run_name=".")
    writer.close()

    summary = {
        "run_name": run_name,
        "checkpoint": args.checkpoint,
        "source": source,
        "device": str(device),
        "provenance": provenance,
        "kept_per_digit": kept_per_digit,
        "thresholds": thresholds.tolist(),
        "draws_per_digit": draws,
        "adapt_seconds": adapt_seconds,
        "base": results["base"],
        "adapted": results["adapted"],
        "args": asdict(args),
    }
    with open(f"{run_dir}/metrics.json.tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(f"{run_dir}/metrics.json.tmp", f"{run_dir}/metrics.json")
    if args.save_samples:
        eval_fid.save_samples(adapted_samples, args.save_samples)
    print(
        eval_fid.format_comparison(
            {name: {k: v for k, v in m.items() if k != "class_histogram"} for name, m in results.items()}
        )
    )
    key = headline[0]
    print(
        f"{run_name}: {key} {results['base'][key]:.2f} -> {results['adapted'][key]:.2f} with latent adaptation "
        f"(quantile {args.quantile}, {num_samples} samples) on {device}"
    )
