"""Discriminator Rejection Sampling: keep a trained generator's sample x with probability sigmoid(F(x)), F from D's logit.
Azadi, Olsson, Darrell, Goodfellow and Odena 2019, "Discriminator Rejection Sampling" (arXiv:1810.06758).
Run: python drs.py runs/RUN/checkpoint.pt --data-dir ../shared/data --inception-weights ../shared/weights/pt_inception-2015-12-05-pool3.pth
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import torch.nn as nn
import torchvision
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import eval_fid


@dataclass
class Args:
    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CHECKPOINT")]
    """checkpoint.pt or best.pt of vanilla_gan.py, wgan_gp.py or wgan_clip.py (unconditional, imposed MLP nets)"""

    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (the run name is {exp_name}__{checkpoint's run}__{seed}__{unix time})"""
    seed: int = 1
    """seed of the latents, the acceptance draws and the calibration fakes"""
    torch_deterministic: bool = True
    """deterministic kernels, so that the same seed on the same device gives the same result"""
    cuda: bool = True
    """sample on CUDA when it is available"""

    # rejection sampling (defaults: the paper's section 3 and its reference pseudocode)
    num_samples: int = 10000
    """samples to produce, by the base sampler (plain G(z)) and by DRS alike"""
    burn_in: int = 10000
    """proposals scored only to estimate D*_max, the largest logit, before sampling starts"""
    gamma_percentile: float = 80.0
    """gamma = this percentile of F over each proposal batch (the paper uses 80-95; higher = stricter, fewer accepted)"""
    gamma: Optional[float] = None
    """a fixed gamma instead of the percentile (a very negative gamma accepts everything)"""
    epsilon: float = 1e-6
    """keeps log(1 - exp(D~ - D*_max - eps)) finite for the sample that holds the maximum"""
    proposal_batch: int = 1000
    """proposals generated and scored per batch"""
    max_proposals: int = 2_000_000
    """give up (with an error) after this many proposals"""

    # calibration of D's output into a logit of p_data / p_G
    calibrate: bool = True
    """Platt-scale D's output on real vs fresh fake images into a logit (needed for a WGAN critic, whose score is no logit)"""
    calibration_size: int = 10000
    """real images (the last N of MNIST train) and as many fresh fakes for the calibration"""

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
    """write the DRS samples here: a folder gets lossless PNGs, a .pt or .npz file gets one uint8 tensor"""


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


class Discriminator(nn.Module):
    """784 -> 1024 -> 512 -> 256 -> 1, LeakyReLU(0.2): vanilla_gan's discriminator (a logit) or a WGAN critic (a score)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 1024), nn.LeakyReLU(0.2),
            nn.Linear(1024, 512), nn.LeakyReLU(0.2),
            nn.Linear(512, 256), nn.LeakyReLU(0.2),
            nn.Linear(256, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).squeeze(1)


def renumber_linear_layers(state_dict: dict, module: nn.Sequential, prefix: str = "net.") -> dict:
    """Map the k-th Linear layer of a saved MLP to the k-th Linear of `module`.

    vanilla_gan's discriminator has a (weightless) dropout after each hidden layer (its layers are net.0, net.3, ...),
    the critics do not (net.0, net.2, ...): the same MLP under other indices.
    """
    saved = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith(prefix)})
    ours = [i for i, layer in enumerate(module) if isinstance(layer, nn.Linear)]
    if len(saved) != len(ours):
        raise ValueError(f"expected {len(ours)} linear layers, found {len(saved)}")
    return {
        f"{new}.{name}": state_dict[f"{prefix}{old}.{name}"]
        for old, new in zip(saved, ours)
        for name in ("weight", "bias")
    }


def load_networks(path: str) -> tuple[Generator, Discriminator, dict]:
    """Generator, discriminator/critic and the training run's info from a checkpoint, or one clear error line."""
    checkpoint = eval_fid.load_checkpoint(path, {"generator"})
    train_args = checkpoint.get("args", {})
    if type(train_args.get("latent_dim", 100)) is not int or train_args.get("latent_dim", 100) < 1:
        eval_fid.fail(
            f"{path} has latent_dim {train_args.get('latent_dim')!r} in its args; expected a positive integer"
        )
    if train_args.get("conditional"):
        eval_fid.fail(f"{path} holds a conditional generator; DRS here needs an unconditional one")
    score_key = "critic" if "critic" in checkpoint else "discriminator"
    if score_key not in checkpoint:
        eval_fid.fail(f"{path} holds no discriminator or critic; DRS needs one")
    generator, discriminator = Generator(train_args.get("latent_dim", 100)), Discriminator()
    try:
        generator.load_state_dict(checkpoint["generator"])
        discriminator.net.load_state_dict(renumber_linear_layers(checkpoint[score_key], discriminator.net))
    except (RuntimeError, ValueError, KeyError) as e:
        eval_fid.fail(
            f"{path} does not hold the imposed MLP GAN with a scalar {score_key}: {' '.join(str(e).split())[:200]}"
        )
    info = {
        "run_name": checkpoint.get("run_name", Path(path).parent.name),
        "epoch": checkpoint.get("epoch"),
        "score": score_key,
        "latent_dim": generator.net[0].in_features,
    }
    return generator.eval(), discriminator.eval(), info


def platt_scaling(real_scores: torch.Tensor, fake_scores: torch.Tensor, iterations: int = 50) -> tuple[float, float]:
    """(a, b) of the logistic regression P(real | s) = sigmoid(a*s + b), fitted by Newton's method in float64.

    For balanced classes a*s + b estimates log p_data(x) / p_G(x), the logit DRS needs (paper, section 3.1).
    A tiny ridge keeps the 2x2 Newton system solvable when D separates the two sets perfectly.
    """
    s = torch.cat([real_scores, fake_scores]).double()
    y = torch.cat([torch.ones_like(real_scores), torch.zeros_like(fake_scores)]).double()
    design = torch.stack([s, torch.ones_like(s)], dim=1)
    weights, ridge = torch.zeros(2, dtype=torch.float64), 1e-6 * len(s) * torch.eye(2, dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(design @ weights)
        gradient = design.T @ (p - y) + ridge @ weights
        hessian = (design * (p * (1 - p)).unsqueeze(1)).T @ design + ridge
        step = torch.linalg.solve(hessian, gradient)
        weights -= step
        if step.abs().max() < 1e-10:
            break
    return weights[0].item(), weights[1].item()


def drs_score(
    logits: torch.Tensor, max_logit: torch.Tensor, epsilon: float, gamma: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """F(x) = D~(x) - D*_max - log(1 - exp(D~(x) - D*_max - eps)) - gamma (paper, eq. 8); accept with sigmoid(F).

    log(1 - exp(u)) is computed as log(-expm1(u)): exact for the u -> 0- of the best samples.
    """
    delta = logits - max_logit
    return delta - torch.log(-torch.expm1(delta - epsilon)) - gamma


def acceptance_probability(
    logits: torch.Tensor, max_logit: torch.Tensor, epsilon: float, gamma: float | torch.Tensor
) -> torch.Tensor:
    return torch.sigmoid(drs_score(logits, max_logit, epsilon, gamma))


@torch.no_grad()
def in_batches(function, inputs: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([function(inputs[i : i + batch_size]).float() for i in range(0, len(inputs), batch_size)])


if __name__ == "__main__":
    args = tyro.cli(Args)
    for name in ("num_samples", "burn_in", "proposal_batch", "calibration_size"):
        if getattr(args, name) < (4 if name == "num_samples" else 1):  # precision/recall need k+1 = 4 samples
            eval_fid.fail(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if not 0 <= args.gamma_percentile <= 100:
        eval_fid.fail(f"--gamma-percentile must lie in [0, 100], got {args.gamma_percentile}")
    generator, discriminator, source = load_networks(args.checkpoint)
    if source["score"] == "critic" and not args.calibrate:
        eval_fid.fail("a WGAN critic's output is a score, not a logit: DRS on a critic needs --calibrate")
    run_name = f"{args.exp_name}__{source['run_name']}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    provenance = eval_fid.provenance(device)  # the commit this process loaded, whatever lands while it runs
    generator, discriminator = generator.to(device), discriminator.to(device)
    try:
        evaluator = eval_fid.Evaluator(
            args.data_dir, args.inception_weights, args.cache_dir, str(device), reference_size=args.reference_size
        )
        evaluator.classifier()
        if not args.fast_only:
            evaluator.inception()
        calibration_reals = eval_fid.load_mnist(args.data_dir, train=True)[0][-args.calibration_size :]
    except eval_fid.EvalError as e:
        eval_fid.fail(str(e))
    # The run's folder is made only once nothing at the start can fail any more: a failed start leaves no runs/RUN.
    run_name, run_dir = eval_fid.claim_run_dir(run_name, resumed=False)
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )
    start = time.time()

    def latents(n: int) -> torch.Tensor:
        return torch.randn(n, source["latent_dim"], device=device)

    # The base sampler first, so that its samples are the same G(z) as latent_adapt.py's base with the same seed.
    base_samples = in_batches(generator, latents(args.num_samples))

    # Calibration: a*D(x) + b fitted to tell reals (MNIST train's last images) from fresh fakes. Only a matters to
    # DRS (b cancels in D~ - D*_max): it turns the score's units into logit units; for vanilla D it fixes over- or
    # under-confidence.
    scale, shift = 1.0, 0.0
    if args.calibrate:
        reals = (calibration_reals.float() / 127.5 - 1).unsqueeze(1).to(device)
        real_scores = in_batches(discriminator, reals)
        fake_scores = in_batches(discriminator, in_batches(generator, latents(len(reals))))
        scale, shift = platt_scaling(real_scores.cpu(), fake_scores.cpu())
        if scale <= 0:
            eval_fid.fail(f"D scores the fakes above the reals (Platt slope {scale:.3g}); rejection by D cannot help")
        accuracy = (
            (real_scores * scale + shift > 0).float().mean() + (fake_scores * scale + shift < 0).float().mean()
        ) / 2
        print(
            f"calibration on {len(reals)} real + {len(reals)} fake images: logit = {scale:.4g} * D + {shift:.4g}, "
            f"accuracy {accuracy.item():.3f} on them"
        )

    def calibrated_logits(images: torch.Tensor) -> torch.Tensor:
        return discriminator(images).float() * scale + shift

    # Burn-in: D*_max, the largest logit seen, keeps growing as sampling proceeds (paper, algorithm 1).
    max_logit = in_batches(calibrated_logits, in_batches(generator, latents(args.burn_in))).max()

    accepted, num_accepted, proposals, logit_log, needed = [], 0, 0, [], None
    progress = tqdm(total=args.num_samples, desc="DRS", unit="sample", mininterval=5)
    while num_accepted < args.num_samples:
        if proposals >= args.max_proposals:
            eval_fid.fail(
                f"only {num_accepted} of {args.num_samples} samples accepted after {proposals} proposals; "
                "lower --gamma-percentile or raise --max-proposals"
            )
        with torch.no_grad():
            images = generator(latents(args.proposal_batch)).float()
            logits = calibrated_logits(images)
        max_logit = torch.maximum(max_logit, logits.max())
        score = drs_score(logits, max_logit, args.epsilon)
        gamma = torch.quantile(score, args.gamma_percentile / 100) if args.gamma is None else args.gamma
        keep = torch.rand(len(images), device=device) < acceptance_probability(logits, max_logit, args.epsilon, gamma)
        kept = int(keep.sum())  # the one host sync per batch of proposals
        if num_accepted + kept >= args.num_samples:  # count exactly the proposals the last needed sample took
            last_needed = keep.nonzero()[args.num_samples - num_accepted - 1].item()
            needed = proposals + last_needed + 1
        accepted.append(images[keep])
        logit_log.append(logits.cpu())
        num_accepted += kept
        proposals += len(images)
        progress.update(min(kept, args.num_samples - progress.n))
    progress.close()
    drs_samples = torch.cat(accepted)[: args.num_samples]
    sampling_seconds = time.time() - start
    acceptance_rate = args.num_samples / needed
    print(
        f"DRS: {needed} proposals for {args.num_samples} samples (acceptance rate {acceptance_rate:.3f}), "
        f"D*_max {max_logit.item():.3f}, {sampling_seconds:.0f}s"
    )

    results = {}
    for name, samples in (("base", base_samples), ("drs", drs_samples)):
        metrics = (
            evaluator.fast(samples)
            if args.fast_only
            # drs.py and latent_adapt.py draw the same base samples from one checkpoint and seed: one Inception pass
            else evaluator.full(samples, cache_features=name == "base")
        )
        results[name] = metrics
        grid = torchvision.utils.make_grid(samples[:100], nrow=10, normalize=True, value_range=(-1, 1))
        writer.add_image(f"samples/{name}", grid)
        torchvision.utils.save_image(grid, f"{run_dir}/samples_{name}.png")
        writer.add_histogram(f"logits/{name}", in_batches(calibrated_logits, samples.to(device)).cpu())
    writer.add_histogram("logits/all_proposals", torch.cat(logit_log))
    writer.add_scalar("drs/acceptance_rate", acceptance_rate)
    writer.add_scalar("drs/proposals", needed)
    headline = [
        k for k in ("fid", "kid", "precision", "recall", "classifier_fid", "digits_covered") if k in results["drs"]
    ]
    for key in headline:
        writer.add_scalar(f"base/{key}", results["base"][key])
        writer.add_scalar(f"drs/{key}", results["drs"][key])
    hparams = {
        key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
    }
    writer.add_hparams(hparams, {f"hparam/{k}": results["drs"][k] for k in headline}, run_name=".")
    writer.close()

    summary = {
        "run_name": run_name,
        "checkpoint": args.checkpoint,
        "source": source,
        "device": str(device),
        "provenance": provenance,
        "proposals": needed,
        "acceptance_rate": acceptance_rate,
        "max_logit": max_logit.item(),
        "calibration": {"scale": scale, "shift": shift},
        "sampling_seconds": sampling_seconds,
        "base": results["base"],
        "drs": results["drs"],
        "args": asdict(args),
    }
    with open(f"{run_dir}/metrics.json.tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(f"{run_dir}/metrics.json.tmp", f"{run_dir}/metrics.json")
    if args.save_samples:
        eval_fid.save_samples(drs_samples, args.save_samples)
    print(
        eval_fid.format_comparison(
            {name: {k: v for k, v in m.items() if k != "class_histogram"} for name, m in results.items()}
        )
    )
    key = headline[0]
    print(
        f"{run_name}: {key} {results['base'][key]:.2f} -> {results['drs'][key]:.2f} with DRS, "
        f"acceptance rate {acceptance_rate:.3f} ({needed} proposals for {args.num_samples} samples) on {device}"
    )
