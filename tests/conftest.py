"""Shared fixtures: the offline data and Inception weights in ../shared, and one cache per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock  # comes with torch


def _share_the_cores_between_xdist_workers():
    """Each xdist worker (and the scripts it runs) gets its share of the cores, set before torch is imported:
    two workers of two threads each on two cores made the suite slower than one worker (OpenMP threads spin)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))


_share_the_cores_between_xdist_workers()

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmark"))  # the benchmark's runner, report and tools, tested here too
SHARED = Path(os.environ.get("CLEANGAN_SHARED", REPO.parent / "shared"))
DATA_DIR = SHARED / "data"
INCEPTION_WEIGHTS = SHARED / "weights" / "pt_inception-2015-12-05-pool3.pth"

MNIST_PRESENT = (DATA_DIR / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists()
needs_mnist = pytest.mark.skipif(
    not MNIST_PRESENT,
    reason=f"MNIST raw files not found under {DATA_DIR} (tests never download)",
)
needs_inception = pytest.mark.skipif(
    not INCEPTION_WEIGHTS.exists(),
    reason=f"FID Inception weights not found at {INCEPTION_WEIGHTS} (tests never download)",
)


def pytest_configure(config):
    # pytorch-fid 0.3.0 passes scipy's deprecated `disp`; and covariances of < 2048 samples are singular by design here.
    config.addinivalue_line("filterwarnings", "ignore:The `disp` argument is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:Matrix is singular")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole session, shared by the xdist workers: the MNIST digit classifier is trained once
    (~45 s on 2 cores), by whichever worker comes first, while the others wait for it."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if "PYTEST_XDIST_WORKER" in os.environ else root  # the workers' common folder
    cache = root / "cleangan_cache"
    with FileLock(str(root / "cleangan_cache.lock")):
        cache.mkdir(exist_ok=True)
        if MNIST_PRESENT:
            import torch

            import eval_fid

            eval_fid.load_or_train_classifier("MNIST", str(DATA_DIR), cache, torch.device("cpu"))
    return cache


def tiny_mnist_flags(cache_dir: Path) -> list:
    """Offline data and weights, the session cache, 128 training images, FID on 16 samples against 16 test images."""
    return [
        "--data-dir", DATA_DIR, "--inception-weights", INCEPTION_WEIGHTS, "--cache-dir", cache_dir,
        "--num-train-images", 128, "--eval-samples", 16, "--reference-size", 16,
    ]  # fmt: skip


def run_script(script: str, *args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, from `cwd`."""
    result = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def run_script_in_this_process(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """Run a script's `__main__` inside the test process (torch is imported once, so a start that fails costs
    milliseconds, not a new interpreter): for checks that end before training. Same result type as run_script."""
    import contextlib
    import io
    import runpy
    from unittest import mock

    out, err, returncode = io.StringIO(), io.StringIO(), 0
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with (
            mock.patch.object(sys, "argv", [script, *map(str, args)]),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as e:
        returncode = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess([script, *args], returncode, out.getvalue(), err.getvalue())


def only_run_dir(cwd: Path) -> Path:
    """The one run folder a script wrote under `cwd`/runs (fails if there are several)."""
    (run_dir,) = (Path(cwd) / "runs").iterdir()
    return run_dir


def mnist_train_images(count: int) -> tuple:
    """The first `count` MNIST training images as floats in [-1, 1] (N, 1, 28, 28) and their labels."""
    import torchvision

    dataset = torchvision.datasets.MNIST(root=DATA_DIR, train=True, download=False)
    return (dataset.data[:count].float() / 127.5 - 1).unsqueeze(1), dataset.targets[:count]


def separating_discriminator(discriminator, generator, latent_dim: int = 100, steps: int = 30):
    """`discriminator` after a few BCE steps on real digits vs `generator`'s outputs: it scores the reals higher."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    reals = mnist_train_images(256)[0]
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-4)
    for _ in range(steps):
        with torch.no_grad():
            fakes = generator(torch.randn(64, latent_dim))
        logits = discriminator(torch.cat([reals[torch.randint(256, (64,))], fakes])).squeeze()
        loss = F.binary_cross_entropy_with_logits(logits, torch.cat([torch.ones(64), torch.zeros(64)]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return discriminator


def digit_template_generator(gain: float = 50.0):
    """vanilla_gan's imposed MLP set by hand so that G(z) is a real training digit, chosen by the decile of z[0].

    Layer 1 makes steep ramps u_k = gain * (z[0] - t_k) and u_k - 1 at the 9 inner deciles t_k of N(0, 1);
    layers 2-3 pass them on (LeakyReLU keeps u >= 0, shrinks u < 0 to 0.008u); the last layer adds, per ramp
    pair, the difference of consecutive digit templates. Each digit then has probability 1/10, which a
    generator trained for seconds cannot promise.
    """
    import torch
    from scipy.stats import norm

    import vanilla_gan

    images, labels = mnist_train_images(1000)
    templates = torch.stack([images[labels == d][0].flatten() for d in range(10)])
    preimages = torch.atanh(0.98 * templates)  # the Tanh at the end outputs the digit itself
    knots = torch.tensor(norm.ppf([k / 10 for k in range(1, 10)]), dtype=torch.float32)
    generator = vanilla_gan.Generator(100)
    first, second, third, last = (layer for layer in generator.net if isinstance(layer, torch.nn.Linear))
    with torch.no_grad():
        for layer in (first, second, third, last):
            layer.weight.zero_(), layer.bias.zero_()
        first.weight[:18, 0] = gain
        first.bias[:18] = (-gain * knots).repeat_interleave(2) - torch.tensor([0.0, 1.0]).repeat(9)
        second.weight[:18, :18] = torch.eye(18)
        third.weight[:18, :18] = torch.eye(18)
        steps = preimages[1:] - preimages[:-1]  # (9, 784)
        last.weight[:, 0:18:2], last.weight[:, 1:18:2] = steps.T, -steps.T
        last.bias.copy_(preimages[0])
    return generator, templates


def write_checkpoint(path: Path, generator, score_network, score_key: str = "discriminator") -> Path:
    """A checkpoint in the training scripts' format with just what the post-hoc samplers read."""
    import torch

    torch.save(
        {
            "generator": generator.state_dict(),
            score_key: score_network.state_dict(),
            "epoch": 1,
            "args": {"latent_dim": 100, "conditional": False},
            "run_name": path.stem,
        },
        path,
    )
    return path


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The script stopped with exit status 2 and one `error:` line on stderr holding every fragment; returns it."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_same_weights(expected: dict, actual: dict, *parts: str) -> None:
    """Every tensor of each network in `parts` is bit-identical in two checkpoints (e.g. resumed vs uninterrupted)."""
    import torch

    for part in parts:
        assert expected[part].keys() == actual[part].keys(), part
        for name, tensor in expected[part].items():
            assert torch.equal(tensor, actual[part][name]), (part, name)


def assert_divergence_stops_at_the_last_good_checkpoint(script: str, run_dir: Path, cwd: Path, *flags) -> None:
    """Resume a copy of `run_dir` under `cwd` with absurd learning rates (`flags`): the run stops with one line that
    names its checkpoint as the last good one, and that checkpoint is left byte for byte as it was."""
    import shutil

    copy = Path(cwd) / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    checkpoint = copy / "checkpoint.pt"
    good = checkpoint.read_bytes()
    result = run_script(script, *flags, "--resume", checkpoint, "--log-every", 1, cwd=cwd, check=False)
    assert_one_line_error(result, "non-finite", f"last good checkpoint: runs/{run_dir.name}/checkpoint.pt")
    assert checkpoint.read_bytes() == good
