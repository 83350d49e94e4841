"""eval_fid.py on real MNIST and the real FID Inception: the API, the CLI, and its one-line errors."""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import eval_fid
from conftest import (
    DATA_DIR,
    INCEPTION_WEIGHTS,
    assert_one_line_error,
    needs_inception,
    needs_mnist,
    run_script,
)

N = 48  # images per set: the FID Inception runs ~10 img/s on 2 CPU cores


@pytest.fixture(scope="module")
def mnist_test():
    return eval_fid.load_mnist(str(DATA_DIR), train=False)


@pytest.fixture(scope="module")
def mnist_train():
    return eval_fid.load_mnist(str(DATA_DIR), train=True)


@pytest.fixture(scope="module")
def evaluator(cache_dir):
    """A small reference for the Inception metrics."""
    return eval_fid.Evaluator(str(DATA_DIR), str(INCEPTION_WEIGHTS), str(cache_dir), "cpu", reference_size=N)


@pytest.fixture(scope="module")
def fast_evaluator(cache_dir):
    """All 10,000 test images as reference: the classifier metric is cheap."""
    return eval_fid.Evaluator(str(DATA_DIR), cache_dir=str(cache_dir), device="cpu")


def cli(*args, cwd, cache_dir, check=False):
    return run_script("eval_fid.py", *args, "--data-dir", DATA_DIR, "--cache-dir", cache_dir, cwd=cwd, check=check)


@needs_mnist
def test_digit_classifier_is_accurate_and_cached(fast_evaluator, cache_dir):
    fast_evaluator.classifier()
    saved = torch.load(cache_dir / "mnist_classifier_v2.pt", weights_only=True)
    assert saved["test_accuracy"] >= 0.99


@needs_mnist
def test_fast_metric_sees_real_digits_and_a_collapsed_set(fast_evaluator, mnist_train):
    images, labels = mnist_train
    real = fast_evaluator.fast(images[:2000])
    assert real["digits_covered"] == 10 and real["kl_to_uniform"] < 0.02
    sevens = fast_evaluator.fast(images[labels == 7][:500])
    assert sevens["digits_covered"] == 1 and sevens["class_histogram"][7] >= 490  # 98%: a 99% classifier
    assert sevens["classifier_fid"] > 10 * real["classifier_fid"]


@needs_mnist
@needs_inception
def test_full_metrics_of_the_reference_itself_and_of_noise(evaluator, mnist_test):
    same = evaluator.full(mnist_test[0][:N])
    assert same["fid"] == pytest.approx(0.0, abs=1e-3)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    noise = evaluator.full(torch.rand(N, 28, 28) * 2 - 1)
    assert noise["fid"] > 200 and noise["precision"] == 0.0


@needs_mnist
@needs_inception
def test_cached_sample_features_skip_the_second_inception_pass(evaluator, mnist_test, cache_dir, monkeypatch):
    samples = mnist_test[0][N : 2 * N]
    files_before = set(cache_dir.glob("samples_inception_*.pt"))
    first = evaluator.full(samples, cache_features=True)
    assert len(set(cache_dir.glob("samples_inception_*.pt")) - files_before) == 1
    inception_calls = []
    extract = evaluator.inception_features
    monkeypatch.setattr(evaluator, "inception_features", lambda x, desc: inception_calls.append(len(x)) or extract(x))
    again = evaluator.full(samples, cache_features=True)
    assert inception_calls == [] and again["fid"] == first["fid"] and again["kid"] == first["kid"]
    mirrored = evaluator.full(samples.flip(-1), cache_features=True)  # other pixels, another key: a new pass
    assert inception_calls == [N] and mirrored["fid"] != first["fid"]


@needs_mnist
@needs_inception
def test_cli_reads_png_folders_npz_and_pt_alike(tmp_path, cache_dir, mnist_test):
    images = mnist_test[0][:N]
    eval_fid.save_samples_png(images, tmp_path / "pngs")
    np.savez(tmp_path / "samples.npz", samples=images.numpy())
    torch.save(images.float() / 127.5 - 1, tmp_path / "samples.pt")
    # PNGs are lossless and .pt floats are in [-1, 1]: all three are the reference images themselves.
    fids = []
    for source in ("pngs", "samples.npz", "samples.pt"):
        result = cli(
            tmp_path / source,
            "--inception-weights",
            INCEPTION_WEIGHTS,
            "--reference-size",
            N,
            "--json-out",
            tmp_path / "m.json",
            cwd=tmp_path,
            cache_dir=cache_dir,
            check=True,
        )
        metrics = json.loads((tmp_path / "m.json").read_text())
        assert metrics.pop("provenance")["torch"] == torch.__version__  # the file says where it came from
        assert "| fid |" in result.stdout and json.loads(result.stdout.strip().splitlines()[-1]) == metrics
        assert metrics["precision"] == 1.0 and metrics["num_samples"] == N
        fids.append(metrics["fid"])
    assert max(fids) < 1e-3


@needs_mnist
@needs_inception
def test_png_features_equal_pytorch_fids_own_pipeline(evaluator, mnist_test, tmp_path):
    from pytorch_fid.fid_score import get_activations

    eval_fid.save_samples_png(mnist_test[0][:20], tmp_path)
    ours = evaluator.inception_features(eval_fid.to_unit_range(eval_fid.load_samples(str(tmp_path))))
    # pytorch-fid's network as it ships, BatchNorms unfolded: checks our fold and our PNG path at once
    unfolded = eval_fid.load_fid_inception(str(INCEPTION_WEIGHTS), torch.device("cpu"), fold_batch_norm=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unfolded.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in evaluator.inception().modules())
    theirs = get_activations(sorted(tmp_path.glob("*.png")), unfolded, batch_size=10, num_workers=0)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4, atol=1e-4)


@needs_mnist
def test_cli_fast_only_against_a_reference_folder(tmp_path, cache_dir, mnist_test):
    eval_fid.save_samples_png(mnist_test[0][:300], tmp_path / "a")
    eval_fid.save_samples_png(mnist_test[0][300:600], tmp_path / "b")
    result = cli(tmp_path / "a", tmp_path / "b", "--fast-only", cwd=tmp_path, cache_dir=cache_dir, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1])["digits_covered"] == 10


# --- bad input: one clear line on stderr, exit status 2 ------------------------------------------


def test_missing_samples_path(tmp_path, cache_dir):
    assert_one_line_error(cli(tmp_path / "nope", cwd=tmp_path, cache_dir=cache_dir), "does not exist")


def test_mixed_image_sizes(tmp_path, cache_dir):
    (tmp_path / "mixed").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "mixed" / "a.png")
    Image.new("L", (32, 32)).save(tmp_path / "mixed" / "b.png")
    assert_one_line_error(cli(tmp_path / "mixed", cwd=tmp_path, cache_dir=cache_dir), "mixed sizes")


def test_unreadable_image(tmp_path, cache_dir):
    (tmp_path / "bad").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "b.png").write_text("not a png")
    assert_one_line_error(cli(tmp_path / "bad", cwd=tmp_path, cache_dir=cache_dir), "cannot read image")


def test_fewer_than_two_samples(tmp_path, cache_dir):
    torch.save(torch.zeros(1, 28, 28, dtype=torch.uint8), tmp_path / "one.pt")
    assert_one_line_error(cli(tmp_path / "one.pt", cwd=tmp_path, cache_dir=cache_dir), "at least 2 samples")


def test_float_samples_outside_tanh_range(tmp_path, cache_dir):
    torch.save(torch.full((4, 28, 28), 3.0), tmp_path / "big.pt")
    assert_one_line_error(cli(tmp_path / "big.pt", cwd=tmp_path, cache_dir=cache_dir), "[-1, 1]")


def test_inception_weights_of_the_wrong_shape(tmp_path, cache_dir):
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(5, 5)}, tmp_path / "wrong.pth")
    torch.save(torch.zeros(4, 28, 28, dtype=torch.uint8), tmp_path / "s.pt")
    result = cli(
        tmp_path / "s.pt",
        tmp_path / "s.pt",
        "--inception-weights",
        tmp_path / "wrong.pth",
        cwd=tmp_path,
        cache_dir=cache_dir,
    )
    assert_one_line_error(result, "does not fit the FID Inception")


def test_a_batch_size_below_one_is_one_line_not_a_traceback(tmp_path, cache_dir):
    torch.save(torch.zeros(4, 28, 28, dtype=torch.uint8), tmp_path / "s.pt")
    result = cli(tmp_path / "s.pt", tmp_path / "s.pt", "--batch-size", "-5", cwd=tmp_path, cache_dir=cache_dir)
    assert_one_line_error(result, "batch size must be a positive number")


def test_missing_mnist_without_network_is_one_clear_error(tmp_path, monkeypatch, capsys):
    def offline(self):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(eval_fid.EvalError, match="could not be downloaded") as error:
        eval_fid.load_mnist(str(tmp_path), train=False)
    with pytest.raises(SystemExit) as exit_info:
        eval_fid.fail(str(error.value))
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
