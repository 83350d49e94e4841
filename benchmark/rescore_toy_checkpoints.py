"""Re-score unrolled_gan.py checkpoints of the 2-D mixtures on fresh noise (not a test).

A run picks `best.pt` by its evaluation on one fixed noise batch (seed + 1), so that batch's score of `best.pt` is
chosen, not measured. This draws new noise batches the run never saw and reports modes covered and the
high-quality share of each, with the run's own metric and threshold.

Run: python benchmark/rescore_toy_checkpoints.py runs/RUN/best.pt runs/RUN/checkpoint.pt --noise-seeds 1000 1001 1002
Prints a Markdown table; docs/unrolled_mdgan.md quotes its output.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import unrolled_gan  # noqa: E402


@dataclass
class Args:
    checkpoints: tyro.conf.Positional[tuple[str, ...]]
    """checkpoint.pt / best.pt files written by unrolled_gan.py on ring8, grid25 or grid9"""
    noise_seeds: tuple[int, ...] = (1000, 1001, 1002)
    """one fresh noise batch per seed (the runs evaluate on seed + 1 of their training seed, 2-8 here)"""
    samples: int = 10000
    """points per noise batch, as the runs' --eval-samples"""


def rescore(path: str, noise_seeds: tuple[int, ...], samples: int) -> tuple[dict, list[dict]]:
    """The checkpoint and its scores, one per noise seed."""
    checkpoint = unrolled_gan.load_checkpoint(path)
    run_args = checkpoint["args"]
    if run_args.get("dataset") == "mnist":
        unrolled_gan.eval_fid.fail(f"{path} is an MNIST run; score it with eval_fid.py")
    try:
        centres, std = unrolled_gan.mixture_modes(run_args["dataset"])
        generator = unrolled_gan.ToyGenerator(run_args["latent_dim"])
        generator.load_state_dict(checkpoint["generator"])
        min_share = run_args["mode_min_share"]
    except (KeyError, RuntimeError, ValueError):  # e.g. an mdgan.py checkpoint: other args, other nets
        unrolled_gan.eval_fid.fail(f"{path} is not a 2-D unrolled_gan.py checkpoint")
    data_scale = unrolled_gan.mixture_std(centres, std) if run_args.get("standardize", False) else 1.0
    generator.eval()
    scores = []
    with torch.no_grad():
        for seed in noise_seeds:
            noise = torch.randn(samples, run_args["latent_dim"], generator=torch.Generator().manual_seed(seed))
            points = unrolled_gan.generate(generator, noise) * data_scale
            scores.append(unrolled_gan.mode_coverage(points, centres, std, min_share))
    return checkpoint, scores


if __name__ == "__main__":
    args = tyro.cli(Args)
    rescored = [(path, *rescore(path, args.noise_seeds, args.samples)) for path in args.checkpoints]  # errors first
    print(f"| checkpoint | epoch | {' | '.join(f'noise seed {s}' for s in args.noise_seeds)} |")
    print(f"|---|---|{'---|' * len(args.noise_seeds)}")
    for path, checkpoint, scores in rescored:
        cells = " | ".join(f"{s['modes_covered']}/{s['num_modes']}, {s['high_quality']:.1%}" for s in scores)
        print(f"| {checkpoint['run_name']}/{Path(path).name} | {checkpoint['epoch']} | {cells} |")
