"""Shared fixtures: the offline data and Inception weights in ../shared, and one cache per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CLEANGAN_SHARED", REPO.parent / "shared"))
DATA_DIR = SHARED / "data"
INCEPTION_WEIGHTS = SHARED / "weights" / "pt_inception-2015-12-05-pool3.pth"

needs_mnist = pytest.mark.skipif(
    not (DATA_DIR / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists(),
    reason=f"MNIST raw files not found under {DATA_DIR} (tests never download)",
)
needs_inception = pytest.mark.skipif(
    not INCEPTION_WEIGHTS.exists(), reason=f"FID Inception weights not found at {INCEPTION_WEIGHTS} (tests never download)"
)


def pytest_configure(config):
    # pytorch-fid 0.3.0 passes scipy's deprecated `disp`; and covariances of < 2048 samples are singular by design here.
    config.addinivalue_line("filterwarnings", "ignore:The `disp` argument is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:Matrix is singular")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole session: the digit classifier is trained once (~45 s on 2 cores)."""
    return tmp_path_factory.mktemp("cleangan_cache")


def tiny_mnist_flags(cache_dir: Path) -> list:
    """Offline data and weights, the session cache, 128 training images, FID on 16 samples against 16 test images."""
    return ["--data-dir", DATA_DIR, "--inception-weights", INCEPTION_WEIGHTS, "--cache-dir", cache_dir,
            "--num-train-images", 128, "--eval-samples", 16, "--reference-size", 16]  # fmt: skip


def run_script(script: str, *args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, from `cwd`."""
    result = subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
