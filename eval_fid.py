"""CleanGAN's one shared evaluator: FID, improved precision/recall and a fast MNIST-classifier metric.
FID: Heusel et al. 2017 (arXiv:1706.08500); KID: Binkowski et al. 2018 (arXiv:1801.01401);
precision/recall: Kynkaanniemi et al. 2019 (arXiv:1904.06991).
Run: python eval_fid.py SAMPLES [REFERENCE] --data-dir ../shared/data --inception-weights ../shared/weights/pt_inception-2015-12-05-pool3.pth
"""

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import pickle
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro
from PIL import Image, UnidentifiedImageError
from pytorch_fid import inception as fid_inception
from tqdm import tqdm

DEFAULT_CACHE_DIR = os.environ.get("CLEANGAN_CACHE", str(Path.home() / ".cache" / "cleangan"))
NUM_CLASSES = 10
# A digit counts as covered when it receives at least half of its fair share (1/10) of the samples.
COVERAGE_MIN_SHARE = 0.5 / NUM_CLASSES
FLOOR_SIZE = 10000  # `eval_fid.py mnist-train`: this many real training digits, as many as the protocol's samples


class EvalError(ValueError):
    """Bad input for evaluation; the message is one line meant for the user."""


def fail(message: str):
    """Stop a command-line program with one clear line on stderr and exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# Data: MNIST as uint8 tensors, sample files in and out
# ---------------------------------------------------------------------------------------------


def load_mnist(data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images (N, 28, 28) uint8 and labels (N,) int64, downloaded by torchvision if absent."""
    try:
        dataset = torchvision.datasets.MNIST(root=data_dir, train=train, download=True)
    except Exception as e:  # torchvision raises URLError, HTTPError, RuntimeError... when offline
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvalError(
            f"MNIST is not under {data_dir}/MNIST/raw and could not be downloaded ({reason}); "
            "pass --data-dir pointing at a folder that holds MNIST/raw"
        ) from None
    return dataset.data, dataset.targets


def load_usps(data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """USPS images (N, 16, 16) uint8 and labels (N,) int64 from {data_dir}/USPS, downloaded by torchvision if absent."""
    try:
        dataset = torchvision.datasets.USPS(root=os.path.join(data_dir, "USPS"), train=train, download=True)
    except Exception as e:  # offline and missing: URLError and friends
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvalError(
            f"USPS is not under {data_dir}/USPS and could not be downloaded ({reason}); "
            "pass --data-dir pointing at a folder that holds USPS/usps.bz2"
        ) from None
    return torch.from_numpy(dataset.data), torch.tensor(dataset.targets)


def to_unit_range(samples: torch.Tensor) -> torch.Tensor:
    """Samples as float (N, C, H, W) in [0, 1]. uint8 is read as 0..255; floats must be in [-1, 1] (Tanh output)."""
    if samples.dim() == 3:
        samples = samples.unsqueeze(1)
    if samples.dim() != 4 or samples.shape[1] not in (1, 3):
        raise EvalError(f"samples must have shape (N, H, W) or (N, 1|3, H, W), got {tuple(samples.shape)}")
    if samples.shape[0] < 2:
        raise EvalError(f"need at least 2 samples for statistics, got {samples.shape[0]}")
    if samples.dtype == torch.uint8:
        return samples.float() / 255.0
    samples = samples.float()
    if not torch.isfinite(samples).all():
        raise EvalError("samples contain NaN or infinite values")
    low, high = samples.min().item(), samples.max().item()
    if low < -1.001 or high > 1.001:
        raise EvalError(f"float samples must lie in [-1, 1] (Tanh output), got values in [{low:.3g}, {high:.3g}]")
    return ((samples + 1) / 2).clamp(0, 1)


def load_samples(path: str) -> torch.Tensor:
    """A folder of PNG/JPEG images, or an .npz/.pt file holding one tensor, as a tensor for to_unit_range."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"{path} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        if not files:
            raise EvalError(f"{path} holds no .png/.jpg images")
        images = []
        for f in files:
            try:
                with Image.open(f) as im:
                    mode = "L" if im.mode in ("L", "1", "I", "I;16", "P", "LA") else "RGB"
                    images.append(np.asarray(im.convert(mode)))
            except (UnidentifiedImageError, OSError) as e:
                raise EvalError(f"cannot read image {f}: {e}") from None
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise EvalError(f"images in {path} have mixed sizes/modes {sorted(shapes)}; all must match")
        array = np.stack(images)
        return torch.from_numpy(array if array.ndim == 3 else array.transpose(0, 3, 1, 2).copy())
    try:
        if p.suffix == ".npz":
            with np.load(p) as archive:
                key = "samples" if "samples" in archive.files else archive.files[0]
                return torch.from_numpy(archive[key])
        if p.suffix == ".pt":
            obj = torch.load(p, map_location="cpu", weights_only=True)
            obj = obj["samples"] if isinstance(obj, dict) and "samples" in obj else obj
            if not isinstance(obj, torch.Tensor):
                raise EvalError(f"{path} holds no tensor (or dict with key 'samples')")
            return obj
    except EvalError:
        raise
    except Exception as e:
        raise EvalError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    raise EvalError(f"{path}: expected a folder of images, an .npz or a .pt file")


def save_samples_png(samples: torch.Tensor, out_dir: str) -> None:
    """Write samples as lossless 8-bit PNGs 000000.png, 000001.png, ... (grayscale or RGB)."""
    images = (to_unit_range(samples.cpu()) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(Path(out_dir) / f"{i:06d}.png")


def save_samples(samples: torch.Tensor, path: str) -> None:
    """Samples as uint8 PNGs when `path` is a folder, else as one uint8 (N, C, H, W) tensor in a .pt or .npz file."""
    if Path(path).suffix not in (".pt", ".npz"):
        save_samples_png(samples, path)
        return
    images = (to_unit_range(samples.cpu()) * 255).round().to(torch.uint8)
    if Path(path).suffix == ".pt":
        atomic_save(images, path)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, samples=images.numpy())


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Checkpoints and run folders: safe loading, a trusted one-off conversion, one folder per run
# ---------------------------------------------------------------------------------------------

CONVERT_COMMAND = "python eval_fid.py convert-checkpoint {path} NEW.pt --i-trust-this-file"


def load_checkpoint(path: str, required_keys: set, program: str = "CleanGAN") -> dict:
    """A checkpoint dict holding `required_keys`, read with weights_only=True, or one error line and exit 2.

    weights_only=True rebuilds only tensors and plain types (dict, list, tuple, str, numbers, None): a crafted file
    is refused before any of its code can run, so the scripts can read checkpoints that someone sent.
    """
    unreadable = f"{path} is not a readable {program} checkpoint (corrupt or from another program)"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"checkpoint {path} does not exist")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e), flags=re.IGNORECASE)
        if found is None:
            fail(unreadable)
        fail(
            f"{path} holds Python objects ({found.group(1)}) besides tensors and plain types, and CleanGAN never "
            f"unpickles those (it can run code); if you wrote this file yourself with older CleanGAN code, "
            f"convert it once: {CONVERT_COMMAND.format(path=path)}"
        )
    except Exception:
        fail(unreadable)
    if not isinstance(checkpoint, dict) or not set(required_keys) <= checkpoint.keys():
        fail(unreadable)
    counters = {"epoch", "global_step"}
    wrong_types = [key for key in required_keys - counters if not isinstance(checkpoint[key], dict)]  # state dicts
    wrong_types += [key for key in required_keys & counters if type(checkpoint[key]) is not int]
    wrong_types += ["args"] if not isinstance(checkpoint.get("args", {}), dict) else []
    if wrong_types:  # a hand-made or foreign dict: one line now, not a traceback deep in a loader
        fail(f"{unreadable}: {', '.join(sorted(wrong_types))} of the wrong type")
    return checkpoint


def to_plain_types(obj):
    """numpy values, paths, dataclasses and Namespaces rewritten as the tensors and plain types weights_only reads."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain_types(dataclasses.asdict(obj))
    if isinstance(obj, argparse.Namespace):
        return to_plain_types(vars(obj))
    if isinstance(obj, dict):
        return type(obj)((to_plain_types(k), to_plain_types(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [to_plain_types(item) for item in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):  # named tuples become plain ones
        return tuple(to_plain_types(item) for item in obj)
    return obj


def convert_trusted_checkpoint(source: str, destination: str) -> None:
    """Fully unpickle `source` (this runs any code in it: only for files you made), save it with plain types only."""
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as e:
        raise EvalError(f"cannot read {source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    atomic_save(to_plain_types(checkpoint), destination)
    try:
        torch.load(destination, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        os.unlink(destination)
        found = re.search(r"GLOBAL (\S+)", str(e), flags=re.IGNORECASE)
        raise EvalError(
            f"{source} holds {found.group(1) if found else 'objects'} that have no plain-type form"
        ) from None


def claim_run_dir(run_name: str, resumed: bool) -> tuple[str, str]:
    """The run's name and its folder runs/{name}, made now (call it once the start can no longer fail).

    A new run takes its folder with an exclusive mkdir: two runs started in the same second with the same name and
    seed get runs/NAME and runs/NAME-2, never one shared folder. A resumed run goes on in its own folder.
    """
    os.makedirs("runs", exist_ok=True)
    if resumed:
        os.makedirs(f"runs/{run_name}", exist_ok=True)
        return run_name, f"runs/{run_name}"
    for attempt in itertools.count(1):
        name = run_name if attempt == 1 else f"{run_name}-{attempt}"
        try:
            os.mkdir(f"runs/{name}")
            return name, f"runs/{name}"
        except FileExistsError:
            continue


def fail_diverged(what: str, checkpoint_path: str, resumed_from: Optional[str]) -> None:
    """Stop a run whose losses or weights are no longer finite, naming the last good checkpoint (left untouched)."""
    last_good = checkpoint_path if os.path.exists(checkpoint_path) else resumed_from
    fail(f"{what}; " + (f"last good checkpoint: {last_good}" if last_good else "no checkpoint had been written yet"))


def provenance(device: torch.device) -> dict:
    """Where a result came from: the git commit (and whether the tree had uncommitted changes), torch, the device
    and the CPU with its thread count. Every metrics.json records it, so a results row traces back to its code."""
    repo = os.path.dirname(os.path.abspath(__file__))

    def git(*args) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no")
    if commit is None and os.environ.get("CLEANGAN_GIT_COMMIT"):  # a copy of the tree without git: a lent GPU
        commit, changes = os.environ["CLEANGAN_GIT_COMMIT"], os.environ.get("CLEANGAN_GIT_DIRTY") == "1"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    device = torch.device(device)
    return {
        "git_commit": commit,
        "git_dirty": None if commit is None else bool(changes),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Metrics on feature sets
# ---------------------------------------------------------------------------------------------


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^1/2), in float64: pytorch-fid's formula, computed exactly.

    The eigenvalues of S_a S_b are those of the symmetric PSD S_a^1/2 S_b S_a^1/2, so the trace of the root is the sum
    of their square roots: two symmetric eigen-decompositions instead of scipy's general sqrtm (which took ~20 s for
    2048-d features and is inexact on the singular covariances of few samples). With fewer samples than dimensions,
    S_a = A'A and S_b = B'B for the scaled centred features A, B, and the nonzero eigenvalues of A'AB'B are the squared
    singular values of AB', so the trace is AB''s nuclear norm: an n_a x n_b problem, not d x d."""
    a, b = features_a.double().cpu().numpy(), features_b.double().cpu().numpy()
    if min(len(a), len(b)) < 2:
        raise EvalError(f"the Frechet distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    centred_a = (a - a.mean(axis=0)) / np.sqrt(len(a) - 1)  # S_a = centred_a' centred_a
    centred_b = (b - b.mean(axis=0)) / np.sqrt(len(b) - 1)
    if min(len(a), len(b)) < a.shape[1]:
        trace_of_root = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum()
    else:
        eigenvalues, eigenvectors = np.linalg.eigh(centred_a.T @ centred_a)
        root_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
        inner = np.linalg.eigvalsh(root_a @ (centred_b.T @ centred_b) @ root_a)
        trace_of_root = np.sqrt(np.clip(inner, 0, None)).sum()
    mean_term = ((a.mean(axis=0) - b.mean(axis=0)) ** 2).sum()
    return float(mean_term + (centred_a**2).sum() + (centred_b**2).sum() - 2 * trace_of_root)


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 of two equal-size sets with the cubic kernel k(a, b) = (a.b / d + 1)^3, in float64."""
    x, y, m = x.double(), y.double(), len(x)
    d = x.shape[1]
    k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return (within - 2 * k_xy.mean()).item()


def kernel_inception_distance(
    real: torch.Tensor, fake: torch.Tensor, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and std of polynomial_mmd2 over random subsets drawn without replacement (torch-fidelity's defaults:
    100 subsets of 1,000; smaller subsets when a set is smaller). Unbiased: 0 in expectation for one distribution,
    whatever the sample count, so 2,000-sample KIDs compare with 10,000-sample ones (FID's bias grows as N shrinks)."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise EvalError(f"KID needs at least 2 images per set, got {len(real)} and {len(fake)}")
    draws = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            polynomial_mmd2(
                fake[torch.randperm(len(fake), generator=draws)[:size]],
                real[torch.randperm(len(real), generator=draws)[:size]],
            )
            for _ in range(num_subsets)
        ],
        dtype=torch.float64,
    )
    return values.mean().item(), values.std(unbiased=False).item()


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp_min_(0)


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    features = features.double()
    radii = [
        _squared_distances(features[i : i + chunk], features).kthvalue(k + 1, dim=1).values  # +1: self at 0
        for i in range(0, len(features), chunk)
    ]
    return torch.cat(radii)


def manifold_coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int = 1024) -> float:
    """Share of queries inside at least one k-NN ball of the manifold's points."""
    manifold, queries = manifold.double(), queries.double()
    inside = [
        (_squared_distances(queries[i : i + chunk], manifold) <= radii).any(dim=1)
        for i in range(0, len(queries), chunk)
    ]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision (fakes on the real manifold) and recall (reals on the fake manifold)."""
    if min(len(real), len(fake)) <= k:
        raise EvalError(
            f"precision/recall with k={k} needs more than {k} images per set, got {len(real)} and {len(fake)}"
        )
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return precision, recall


def class_coverage(predicted: torch.Tensor) -> dict:
    """Histogram of predicted digits, how many digits are covered, and KL(histogram || uniform)."""
    histogram = torch.bincount(predicted.cpu(), minlength=NUM_CLASSES).double()
    share = histogram / histogram.sum()
    nonzero = share > 0
    kl = (share[nonzero] * (share[nonzero] * NUM_CLASSES).log()).sum().item()
    return {
        "digits_covered": int((share >= COVERAGE_MIN_SHARE).sum()),
        "kl_to_uniform": kl,
        "class_histogram": [int(c) for c in histogram],
    }


# ---------------------------------------------------------------------------------------------
# Networks: the FID Inception (pool3) and a small MNIST classifier for the fast metric
# ---------------------------------------------------------------------------------------------


def load_fid_inception(weights_path: Optional[str], device: torch.device, fold_batch_norm: bool = True) -> nn.Module:
    """pytorch-fid's FID Inception up to pool3; offline from `weights_path`, else pytorch-fid's download.

    fold_batch_norm folds each eval-mode BatchNorm into the convolution before it: the same function up to float
    rounding (features agree to ~1e-5), ~1.4x faster on CPU because every BatchNorm pass over the maps is gone.
    """
    if weights_path is None:
        try:
            model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except Exception as e:  # offline: URLError and friends
            raise EvalError(
                f"could not download the FID Inception weights ({type(e).__name__}); pass --inception-weights PATH"
            ) from None
    else:
        if not Path(weights_path).is_file():
            raise EvalError(f"Inception weights file {weights_path} does not exist")
        try:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EvalError(f"cannot read Inception weights {weights_path}: {str(e).splitlines()[0]}") from None
        if not isinstance(state_dict, dict):
            raise EvalError(f"{weights_path} is not a state dict")
        # The shared file stops at pool3; the 1008-class head is never used for FID, so zeros stand in for it
        # and pytorch-fid's own strict loading still checks every layer we do use.
        state_dict.setdefault("fc.weight", torch.zeros(1008, 2048))
        state_dict.setdefault("fc.bias", torch.zeros(1008))
        try:
            with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: state_dict):
                model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:300]
            raise EvalError(f"{weights_path} does not fit the FID Inception: {detail}") from None
    model.eval()
    if fold_batch_norm:
        for block in model.modules():  # pytorch-fid's BasicConv2d: relu(bn(conv(x)))
            if isinstance(getattr(block, "conv", None), nn.Conv2d) and isinstance(
                getattr(block, "bn", None), nn.BatchNorm2d
            ):
                block.conv, block.bn = torch.nn.utils.fuse_conv_bn_eval(block.conv, block.bn), nn.Identity()
    # channels_last: same fp32 math, ~1.6x faster convolutions on CPU.
    return model.to(device, memory_format=torch.channels_last)


class DigitClassifier(nn.Module):
    """Small CNN on 28x28 digits in [0, 1]; its 128-d penultimate layer is the fast metric's feature space."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 5 * 5, 128),
        )  # fmt: skip
        # Features are taken before this ReLU: dead ReLU units would make their covariance singular.
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(128, NUM_CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@torch.inference_mode()
def classifier_accuracy(
    classifier: nn.Module, images01: torch.Tensor, labels: torch.Tensor, batch: int = 2000
) -> float:
    correct = sum(
        (classifier(images01[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(images01), batch)
    )
    return correct / len(images01)


class UspsClassifier(nn.Module):
    """DigitClassifier on 16x16 USPS digits in [0, 1], upsampled (bilinear) to the 28x28 it was built for."""

    def __init__(self):
        super().__init__()
        self.digits = DigitClassifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.digits(F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False))


def train_digit_classifier(
    data_dir: str, device: torch.device, epochs: int = 3, seed: int = 0, dataset: str = "MNIST"
) -> tuple[nn.Module, float]:
    """Train a digit classifier on MNIST (the fast metric's; about a minute on 2 CPU cores) or USPS train, seeded.

    Returns it with its test accuracy.
    """
    torch.manual_seed(seed)
    load = load_mnist if dataset == "MNIST" else load_usps
    train_x, train_y = load(data_dir, train=True)
    test_x, test_y = load(data_dir, train=False)
    train_x, train_y = (train_x.float() / 255).unsqueeze(1).to(device), train_y.to(device)
    test_x, test_y = (test_x.float() / 255).unsqueeze(1).to(device), test_y.to(device)
    classifier = (DigitClassifier() if dataset == "MNIST" else UspsClassifier()).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    batches = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train_x) // 128
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc=f"training the {dataset} classifier (once, then cached)", leave=False):
        order = torch.randperm(len(train_x), generator=batches).to(device)
        for step in range(steps_per_epoch):
            idx = order[step * 128 : (step + 1) * 128]
            loss = F.cross_entropy(classifier(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    classifier.eval()
    return classifier, classifier_accuracy(classifier, test_x, test_y)


CLASSIFIER_FILES = {"MNIST": ("mnist_classifier_v2.pt", 3), "USPS": ("usps_classifier_v1.pt", 15)}  # file, epochs
CLASSIFIER_MIN_ACCURACY = {"MNIST": 0.99, "USPS": 0.95}  # USPS test is harder: humans err on ~2.5% of it


def load_or_train_classifier(dataset: str, data_dir: str, cache_dir, device: torch.device) -> nn.Module:
    """The MNIST or USPS digit classifier from the cache, trained (and checked) first when it is not there yet.

    Inside a forked RNG: building or training it must not move the caller's seeded random stream.
    """
    file_name, epochs = CLASSIFIER_FILES[dataset]
    path = Path(cache_dir) / file_name
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        if path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                classifier = DigitClassifier() if dataset == "MNIST" else UspsClassifier()
                classifier.load_state_dict(saved["state_dict"])
            except Exception as e:
                raise EvalError(
                    f"cached classifier {path} is corrupt ({type(e).__name__}); delete it to retrain"
                ) from None
        else:
            classifier, accuracy = train_digit_classifier(data_dir, device, epochs=epochs, dataset=dataset)
            if accuracy < CLASSIFIER_MIN_ACCURACY[dataset]:
                raise EvalError(f"the {dataset} classifier reached only {accuracy:.4f} test accuracy")
            atomic_save({"state_dict": classifier.state_dict(), "test_accuracy": accuracy}, str(path))
    return classifier.eval().to(device, memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# The evaluator the method scripts use
# ---------------------------------------------------------------------------------------------


class Evaluator:
    """Evaluates sample tensors against a reference set (MNIST test by default), caching what it can.

    fast(samples): classifier FID + digit coverage, a few seconds for 10k samples on CPU (use during training).
    full(samples): FID, KID, precision, recall on FID Inception pool3 features, plus everything fast() gives.
    """

    def __init__(
        self,
        data_dir: str = "data",
        inception_weights: Optional[str] = None,
        cache_dir: str = DEFAULT_CACHE_DIR,
        device: Optional[str] = None,
        reference: Optional[torch.Tensor] = None,
        reference_size: int = 10000,
        batch_size: Optional[int] = None,
    ):
        if batch_size is not None and batch_size < 1:
            raise EvalError(f"the Inception batch size must be a positive number of images, got {batch_size}")
        self.data_dir, self.inception_weights = data_dir, inception_weights
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Inception batch: 50 keeps a CPU core's caches warmer (~8% faster than 100); a GPU wants more.
        self.batch_size = batch_size or (50 if self.device.type == "cpu" else 250)
        if reference is None:
            reference = load_mnist(data_dir, train=False)[0]
            if reference_size < 2:
                raise EvalError(f"need at least 2 reference images, asked for {reference_size}")
            reference = reference[:reference_size]
        self.reference = to_unit_range(reference)
        self._inception = self._classifier = None
        self._reference_features_by_kind: dict[str, torch.Tensor] = {}  # in memory after the first use

    # -- cached networks and reference features -------------------------------------------------
    def _own_rng(self):
        """Building or training networks here must not move the caller's seeded random stream."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def classifier(self) -> nn.Module:
        if self._classifier is None:
            self._classifier = load_or_train_classifier("MNIST", self.data_dir, self.cache_dir, self.device)
        return self._classifier

    def inception(self) -> nn.Module:
        if self._inception is None:
            with self._own_rng():
                self._inception = load_fid_inception(self.inception_weights, self.device)
        return self._inception

    def _features_cached_on_disk(self, name: str, kind: str, images01: torch.Tensor, extract) -> torch.Tensor:
        """Features of images, cached as NAME_KIND_KEY.pt under a key of the network's weights and the pixels."""
        if kind == "classifier":
            model_id = _sha256(b"".join(t.cpu().numpy().tobytes() for t in self.classifier().state_dict().values()))
        else:
            model_id = _sha256(Path(self.inception_weights).read_bytes()) if self.inception_weights else "download"
        key = _sha256(f"{kind}|{model_id}|{_sha256(images01.cpu().numpy().tobytes())}".encode())
        path = self.cache_dir / f"{name}_{kind}_{key}.pt"
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True)
        features = extract(images01)
        atomic_save(features, str(path))
        return features

    def _reference_features(self, kind: str, extract) -> torch.Tensor:
        if kind not in self._reference_features_by_kind:
            features = self._features_cached_on_disk("reference", kind, self.reference, extract)
            self._reference_features_by_kind[kind] = features
        return self._reference_features_by_kind[kind]

    # -- feature extractors ---------------------------------------------------------------------
    @staticmethod
    def _full_fp32():
        """cuDNN convolutions in TF32 (PyTorch's default on CUDA) shift features by ~1e-3: one metric, full fp32."""
        return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False)

    @torch.inference_mode()
    def inception_features(self, images01: torch.Tensor, desc: str = "Inception features") -> torch.Tensor:
        model, out = self.inception(), []
        with self._full_fp32():
            for i in tqdm(range(0, len(images01), self.batch_size), desc=desc, leave=False, mininterval=5):
                batch = images01[i : i + self.batch_size].to(self.device)
                batch = batch.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
                out.append(model(batch)[0].flatten(1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def classifier_outputs(self, images01: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """128-d features and predicted digits of 28x28 images in [0, 1]."""
        if images01.shape[-2:] != (28, 28):
            raise EvalError(f"the digit classifier needs 28x28 images, got {tuple(images01.shape[-2:])}")
        classifier, features, predicted = self.classifier(), [], []
        with self._full_fp32():
            for i in range(0, len(images01), batch):
                x = images01[i : i + batch].to(self.device).mean(1, keepdim=True)  # RGB -> gray
                x = x.contiguous(memory_format=torch.channels_last)  # ~2x faster on CPU, same math
                f = classifier.features(x)
                features.append(f)
                predicted.append(classifier.head(f).argmax(1))
        return torch.cat(features), torch.cat(predicted)

    # -- the two entry points -------------------------------------------------------------------
    def fast(self, samples: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict:
        """Classifier-space FID and digit coverage of samples (float in [-1, 1] or uint8).

        With `labels` (the digits a conditional generator was asked for), also the share classified as asked.
        """
        images01 = to_unit_range(samples)
        reference = self._reference_features("classifier", lambda ref: self.classifier_outputs(ref)[0].cpu())
        features, predicted = self.classifier_outputs(images01)
        metrics = {"classifier_fid": frechet_distance(features, reference), **class_coverage(predicted)}
        if labels is not None:
            metrics["label_accuracy"] = (predicted.cpu() == labels.cpu()).double().mean().item()
        return metrics

    def full(
        self, samples: torch.Tensor, k: int = 3, labels: Optional[torch.Tensor] = None, cache_features: bool = False
    ) -> dict:
        """FID, KID (mean, std), precision and recall (Inception pool3, k-NN with k=3), plus fast() when 28x28.

        cache_features: keep the samples' Inception features in the cache dir (~80 MB per 10,000 samples), keyed by
        their pixels, so a second call on the same samples (in this process or another) skips the Inception pass.
        """
        images01 = to_unit_range(samples)
        start = time.time()
        reference = self._reference_features(
            "inception", lambda ref: self.inception_features(ref, "reference features")
        )
        if cache_features:
            features = self._features_cached_on_disk(
                "samples", "inception", images01, lambda x: self.inception_features(x, "sample features")
            )
        else:
            features = self.inception_features(images01, "sample features")
        precision, recall = precision_recall(reference, features, k)
        kid, kid_std = kernel_inception_distance(reference, features)
        metrics = {
            "fid": frechet_distance(features, reference),
            "kid": kid,
            "kid_std": kid_std,
            "precision": precision,
            "recall": recall,
        }
        if images01.shape[-2:] == (28, 28):
            metrics.update(self.fast(samples, labels))
        metrics.update(num_samples=len(images01), num_reference=len(self.reference), eval_seconds=time.time() - start)
        return metrics


def format_table(metrics: dict) -> str:
    """Metrics as a two-column Markdown table (what the scripts print and log)."""
    rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def format_comparison(columns: dict[str, dict]) -> str:
    """Metrics of several sample sets side by side, one Markdown column per set (keys of the first set)."""
    names = list(columns)
    keys = [k for k, v in columns[names[0]].items() if isinstance(v, (int, float))]

    def cell(value) -> str:
        return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    rows = [f"| {k} | " + " | ".join(cell(columns[n].get(k)) for n in names) + " |" for k in keys]
    return "\n".join(["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|", *rows])


# ---------------------------------------------------------------------------------------------
# Command line: python eval_fid.py SAMPLES [REFERENCE]  |  python eval_fid.py convert-checkpoint OLD NEW
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalArgs:
    """FID, KID, precision, recall and the fast classifier metric of SAMPLES against MNIST test (or REFERENCE)."""

    samples: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SAMPLES")]
    """folder of PNG/JPEG images, .npz/.pt file with a (N, [C,] H, W) tensor (uint8 0..255 or float in [-1, 1]), or
    `mnist-train`: the first 10,000 MNIST training digits, the real-vs-real floor no generator can beat"""
    reference: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="REFERENCE")] = "mnist-test"
    """what to compare against: `mnist-test` or another folder/.npz/.pt of images"""
    data_dir: str = "data"
    """where torchvision finds (or downloads) MNIST"""
    inception_weights: Optional[str] = None
    """FID Inception state dict for offline use (e.g. ../shared/weights/pt_inception-2015-12-05-pool3.pth); default: download"""
    cache_dir: str = DEFAULT_CACHE_DIR
    """where the classifier and reference features are cached (env CLEANGAN_CACHE)"""
    reference_size: int = 10000
    """how many MNIST test images form the reference (the first N)"""
    fast_only: bool = False
    """only the classifier metric (seconds instead of minutes on CPU)"""
    batch_size: Optional[int] = None
    """Inception batch size (default: 50 on CPU, 250 on CUDA)"""
    device: Optional[str] = None
    """cpu or cuda (default: cuda when available)"""
    json_out: Optional[str] = None
    """also write the metrics to this JSON file"""


def main(args: EvalArgs) -> dict:
    floor = args.samples == "mnist-train"
    samples = load_mnist(args.data_dir, train=True)[0][:FLOOR_SIZE] if floor else load_samples(args.samples)
    reference = None if args.reference == "mnist-test" else load_samples(args.reference)
    evaluator = Evaluator(
        args.data_dir,
        args.inception_weights,
        args.cache_dir,
        args.device,
        reference,
        args.reference_size,
        args.batch_size,
    )
    started_from = provenance(evaluator.device)  # the code as this process loaded it
    metrics = evaluator.fast(samples) if args.fast_only else evaluator.full(samples)
    print(format_table(metrics))
    print(json.dumps(metrics))
    if args.json_out:  # a results file says where it came from, as the training scripts' metrics.json do
        Path(args.json_out).write_text(json.dumps({**metrics, "provenance": started_from}, indent=2))
    return metrics


@dataclass
class ConvertArgs:
    """Rewrite a checkpoint that YOU made with older CleanGAN code as tensors and plain types, which the scripts read.

    Reading OLD unpickles it fully, which runs any code inside it: never do this with a file someone sent you.
    """

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OLD")]
    """the old checkpoint"""
    destination: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="NEW")]
    """where to write the converted checkpoint (OLD stays as it is)"""
    i_trust_this_file: bool = False
    """required: you made OLD yourself, so running the code inside it is safe"""


def convert_main(args: ConvertArgs) -> None:
    if not args.i_trust_this_file:
        raise EvalError(
            "convert-checkpoint fully unpickles OLD, which runs any code in it; "
            "add --i-trust-this-file only if you made OLD yourself"
        )
    convert_trusted_checkpoint(args.source, args.destination)
    print(f"wrote {args.destination}: tensors and plain types only, so every CleanGAN script can read it")


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["convert-checkpoint"]:
            convert_main(tyro.cli(ConvertArgs, args=sys.argv[2:], prog="eval_fid.py convert-checkpoint"))
        else:
            main(tyro.cli(EvalArgs))
    except EvalError as e:
        fail(str(e))
