"""Speed of vanilla_gan.py against the pure-compute floor of its nets and a DataLoader-fed loop (not a test).

Run: python benchmark/speed_vanilla_gan.py --data-dir ../shared/data --inception-weights ../shared/weights/pt_inception-2015-12-05-pool3.pth
Prints a Markdown table; docs/vanilla_gan.md quotes its output (results/vanilla_gan/speed_vanilla_gan.txt).
"""

import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torchvision
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import eval_fid  # noqa: E402
from vanilla_gan import Discriminator, Generator, discriminator_loss, generator_loss  # noqa: E402


@dataclass
class BenchArgs:
    data_dir: str = "data"
    """folder holding MNIST/raw"""
    inception_weights: Optional[str] = None
    """FID Inception weights for offline use"""
    epochs: int = 1
    """full epochs of vanilla_gan.py to time per precision"""
    floor_steps: int = 300
    """steps timed for the compute floor and the DataLoader loop (extrapolated to one epoch)"""
    batch_size: int = 64
    """batch size (vanilla_gan.py's default)"""


def time_compute_floor(steps: int, batch_size: int, bf16: bool, next_real) -> float:
    """Seconds per step of the same D and G updates, with `next_real()` supplying the real batch."""
    torch.manual_seed(0)
    generator, discriminator = Generator(100), Discriminator()
    optimizer_g = torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.5, 0.999), fused=True)
    optimizer_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.5, 0.999), fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def step():
        real = next_real()
        with autocast:
            fake = generator(torch.randn(batch_size, 100))
            real_logits, fake_logits = discriminator(torch.cat([real, fake.detach()])).float().split(batch_size)
            d_loss = discriminator_loss(real_logits, fake_logits)
        optimizer_d.zero_grad(set_to_none=True)
        d_loss.backward()
        optimizer_d.step()
        discriminator.requires_grad_(False)
        with autocast:
            g_loss = generator_loss(discriminator(fake).float())
        optimizer_g.zero_grad(set_to_none=True)
        g_loss.backward()
        optimizer_g.step()
        discriminator.requires_grad_(True)

    for _ in range(20):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def time_script_epoch(args: BenchArgs, bf16: bool) -> float:
    """Seconds of training per epoch of vanilla_gan.py itself (its own clock, evaluation excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, str(REPO / "vanilla_gan.py"), "--data-dir", str(Path(args.data_dir).resolve()),
            "--epochs", str(args.epochs), "--eval-every", "1000", "--eval-samples", "64", "--reference-size", "64",
            "--log-every", "100000", "--batch-size", str(args.batch_size),
        ]  # fmt: skip
        if args.inception_weights:
            command += ["--inception-weights", str(Path(args.inception_weights).resolve())]
        if bf16:
            command.append("--bf16")
        subprocess.run(command, cwd=tmp, check=True, capture_output=True)
        (metrics_file,) = Path(tmp).glob("runs/*/metrics.json")
        return json.loads(metrics_file.read_text())["train_seconds"] / args.epochs


if __name__ == "__main__":
    args = tyro.cli(BenchArgs)
    steps_per_epoch = 60000 // args.batch_size
    images = eval_fid.load_mnist(args.data_dir, train=True)[0]
    tensor_data = (images.float() / 127.5 - 1).unsqueeze(1)
    fixed_batch = tensor_data[: args.batch_size].clone()

    loader = torch.utils.data.DataLoader(
        torchvision.datasets.MNIST(
            args.data_dir,
            train=True,
            transform=torchvision.transforms.Compose(
                [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize([0.5], [0.5])]
            ),
        ),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
    )
    loader_iter = iter(loader)

    rows = []
    for bf16 in (False, True):
        precision = "bf16 autocast" if bf16 else "fp32"
        floor = time_compute_floor(args.floor_steps, args.batch_size, bf16, lambda: fixed_batch)
        loader_iter = iter(loader)
        dataloader = time_compute_floor(args.floor_steps, args.batch_size, bf16, lambda: next(loader_iter)[0])
        script = time_script_epoch(args, bf16)
        rows.append((precision, "compute floor (same nets, fixed batch, no data/logging)", floor * steps_per_epoch))
        rows.append(
            (precision, "same loop fed by a torchvision DataLoader (PIL per sample)", dataloader * steps_per_epoch)
        )
        rows.append((precision, "vanilla_gan.py (measured by its own clock)", script))

    evaluator = eval_fid.Evaluator(args.data_dir, args.inception_weights, device="cpu")
    samples = tensor_data[:10000]
    evaluator.fast(samples)  # warm-up, classifier and reference features cached
    start = time.perf_counter()
    evaluator.fast(samples)
    fast_seconds = time.perf_counter() - start
    probe = eval_fid.to_unit_range(tensor_data[:200])
    evaluator.inception_features(probe[:50])  # warm-up
    start = time.perf_counter()
    evaluator.inception_features(probe)
    inception_rate = len(probe) / (time.perf_counter() - start)

    print(
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"batch {args.batch_size}, {steps_per_epoch} steps per epoch\n")
    print("| precision | what | seconds per epoch |\n|---|---|---|")
    for precision, what, seconds in rows:
        print(f"| {precision} | {what} | {seconds:.1f} |")
    print(f"\nfast metric (classifier FID + coverage), 10,000 samples: {fast_seconds:.2f} s")
    print(f"FID Inception, channels_last fp32: {inception_rate:.1f} images/s")
