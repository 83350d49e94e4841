"""Files someone sent: no loader runs code from a checkpoint, a failed start leaves no run folder, run names never
collide, and an old checkpoint that its author trusts converts once into one the scripts read."""

import concurrent.futures
import multiprocessing
import os

import numpy as np
import pytest
import torch

import eval_fid
import vanilla_gan
from conftest import (
    DATA_DIR,
    INCEPTION_WEIGHTS,
    assert_one_line_error,
    run_script,
    run_script_in_this_process,
    write_checkpoint,
)

OFFLINE = ["--inception-weights", INCEPTION_WEIGHTS]

# Every way a checkpoint gets into a script: (script, the flag that takes the file, or None for a positional).
LOADERS = [
    ("vanilla_gan.py", "--resume"),
    ("wgan_clip.py", "--resume"),
    ("wgan_gp.py", "--resume"),
    ("wgan_gp.py", "--fine-tune-from"),
    ("unrolled_gan.py", "--resume"),
    ("mdgan.py", "--resume"),
    ("otgan.py", "--resume"),
    ("cyclegan.py", "--resume"),
    ("dcgan.py", "--resume"),
    ("drs.py", None),
    ("latent_adapt.py", None),
    ("benchmark/rescore_toy_checkpoints.py", None),
]


class Payload:
    """Unpickling this runs exec(), which creates the marker file: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def crafted_checkpoint(path, marker):
    torch.save({"generator": Payload(marker), "discriminator": {}, "critic": {}, "epoch": 1, "run_name": "x"}, path)
    return path


def test_the_crafted_payload_is_real_it_runs_when_unpickled_unsafely(tmp_path):
    crafted_checkpoint(tmp_path / "crafted.pt", tmp_path / "ran")
    torch.load(tmp_path / "crafted.pt", weights_only=False)  # what every loader here did before
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("script, flag", LOADERS, ids=[f"{s} {f or 'CHECKPOINT'}" for s, f in LOADERS])
def test_every_loader_refuses_a_crafted_checkpoint_without_running_it(tmp_path, script, flag):
    marker = tmp_path / "payload_ran"
    checkpoint = crafted_checkpoint(tmp_path / "crafted.pt", marker)
    args = [flag, checkpoint] if flag else [checkpoint]
    offline = [] if "rescore" in script else ["--data-dir", DATA_DIR, *OFFLINE]
    result = run_script_in_this_process(script, *args, *offline, cwd=tmp_path)
    assert_one_line_error(result, "(exec)", "never unpickles")
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script, flag", LOADERS, ids=[f"{s} {f or 'CHECKPOINT'}" for s, f in LOADERS])
def test_every_loader_refuses_a_hand_made_dict_of_the_wrong_types_in_one_line(tmp_path, script, flag):
    wrong = {key: "text" for key in ("generator", "discriminator", "critic", "mnist_to_usps", "usps_to_mnist")}
    torch.save(
        {**wrong, "epoch": "1", "global_step": 2.5, "args": ["not", "a", "dict"], "run_name": 3}, tmp_path / "x.pt"
    )
    args = [flag, tmp_path / "x.pt"] if flag else [tmp_path / "x.pt"]
    offline = [] if "rescore" in script else ["--data-dir", DATA_DIR, *OFFLINE]
    assert_one_line_error(run_script_in_this_process(script, *args, *offline, cwd=tmp_path), "wrong type")
    assert not (tmp_path / "runs").exists()


def old_checkpoint(path):
    """A checkpoint as older code could write it: numpy numbers in its history, which weights_only refuses."""
    torch.manual_seed(0)
    write_checkpoint(path, vanilla_gan.Generator(100), vanilla_gan.Discriminator())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["history"] = [{"epoch": 1, "classifier_fid": np.float64(12.5), "histogram": np.arange(3)}]
    torch.save(checkpoint, path)
    return checkpoint


def test_an_old_checkpoint_is_refused_with_the_command_that_converts_it(tmp_path):
    old_checkpoint(tmp_path / "old.pt")
    result = run_script(
        "latent_adapt.py", tmp_path / "old.pt", "--data-dir", DATA_DIR, *OFFLINE, cwd=tmp_path, check=False
    )
    line = assert_one_line_error(result, "numpy", "python eval_fid.py convert-checkpoint")
    assert eval_fid.CONVERT_COMMAND.format(path=tmp_path / "old.pt") in line


def test_convert_checkpoint_needs_the_trust_flag_then_writes_plain_types_only(tmp_path):
    original = old_checkpoint(tmp_path / "old.pt")
    refused = run_script(
        "eval_fid.py", "convert-checkpoint", tmp_path / "old.pt", tmp_path / "new.pt", cwd=tmp_path, check=False
    )
    assert_one_line_error(refused, "--i-trust-this-file")
    assert not (tmp_path / "new.pt").exists()

    run_script(
        "eval_fid.py",
        "convert-checkpoint",
        tmp_path / "old.pt",
        tmp_path / "new.pt",
        "--i-trust-this-file",
        cwd=tmp_path,
    )
    converted = eval_fid.load_checkpoint(str(tmp_path / "new.pt"), {"generator", "discriminator", "epoch"})
    (entry,) = converted["history"]
    assert entry["classifier_fid"] == 12.5 and type(entry["classifier_fid"]) is float
    assert torch.equal(entry["histogram"], torch.arange(3))
    for name, tensor in original["generator"].items():
        assert torch.equal(converted["generator"][name], tensor), name


def test_converting_a_file_that_has_no_plain_form_writes_nothing(tmp_path):
    torch.save({"generator": {}, "optimizer": torch.optim.SGD}, tmp_path / "odd.pt")  # a class, not a value
    with pytest.raises(eval_fid.EvalError, match="no plain-type form"):
        eval_fid.convert_trusted_checkpoint(str(tmp_path / "odd.pt"), str(tmp_path / "new.pt"))
    assert not (tmp_path / "new.pt").exists()


# --- a start that fails leaves no run folder -----------------------------------------------------------------

TRAINERS = ["vanilla_gan.py", "wgan_clip.py", "wgan_gp.py", "otgan.py", "cyclegan.py", "dcgan.py"]
TRAINERS_WITH_A_DATASET_FLAG = ["unrolled_gan.py", "mdgan.py"]  # 2-D mixtures by default


@pytest.mark.parametrize("script", [*TRAINERS, *TRAINERS_WITH_A_DATASET_FLAG, "drs.py", "latent_adapt.py"])
def test_a_start_without_its_data_is_one_line_and_leaves_no_run_folder(tmp_path, script):
    args = ["--dataset", "mnist"] if script in TRAINERS_WITH_A_DATASET_FLAG else []
    if script in ("drs.py", "latent_adapt.py"):
        torch.manual_seed(0)
        args = [write_checkpoint(tmp_path / "base.pt", vanilla_gan.Generator(100), vanilla_gan.Discriminator())]
    result = run_script_in_this_process(script, *args, "--data-dir", tmp_path / "no_data", *OFFLINE, cwd=tmp_path)
    assert_one_line_error(result, "could not be downloaded")
    assert not (tmp_path / "runs").exists()


# --- one folder per run ----------------------------------------------------------------------------------------


def test_runs_with_the_same_name_get_their_own_folders_and_a_resume_reuses_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = eval_fid.claim_run_dir("vanilla_gan__1__1796000000", resumed=False)
    second = eval_fid.claim_run_dir("vanilla_gan__1__1796000000", resumed=False)
    assert first == ("vanilla_gan__1__1796000000", "runs/vanilla_gan__1__1796000000")
    assert second == ("vanilla_gan__1__1796000000-2", "runs/vanilla_gan__1__1796000000-2")
    assert eval_fid.claim_run_dir(first[0], resumed=True) == first
    assert sorted(os.listdir("runs")) == [first[0], second[0]]


def claim_in_a_fresh_process(folder: str) -> str:
    os.chdir(folder)
    return eval_fid.claim_run_dir("wgan_gp__1__1796000000", resumed=False)[1]


def test_runs_started_at_the_same_moment_never_share_a_folder(tmp_path):
    fork = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(8, mp_context=fork) as pool:
        folders = list(pool.map(claim_in_a_fresh_process, [str(tmp_path)] * 16))
    assert len(set(folders)) == 16 and len(os.listdir(tmp_path / "runs")) == 16


def test_the_real_vs_real_floor_scores_the_first_10000_training_digits(tmp_path, cache_dir):
    result = run_script_in_this_process(
        "eval_fid.py",
        "mnist-train",
        "--fast-only",
        "--data-dir",
        DATA_DIR,
        "--cache-dir",
        cache_dir,
        "--json-out",
        tmp_path / "floor.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    floor = __import__("json").loads((tmp_path / "floor.json").read_text())
    assert floor["digits_covered"] == 10 and floor["classifier_fid"] < 10  # 4.6 here; untrained nets score hundreds
