"""benchmark/: the runner skips finished runs and resumes interrupted ones; the report turns metrics.json files
into summary.json rows, the README's table and the curves figure."""

import json
import shutil

import numpy as np
import pytest

import report
import run_benchmark


def args_for(tmp_path, **overrides):
    return run_benchmark.Args(
        work_dir=str(tmp_path / "work"),
        results_dir=str(tmp_path / "results"),
        data_dir="DATA",
        inception_weights="W.pth",
        **{"device": "cpu", **overrides},
    )


def finish(work, method, variant, seed, metrics, run_name="run"):
    folder = run_benchmark.run_folder(str(work), method, variant, seed) / "runs" / run_name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_the_runner_skips_finished_runs_resumes_interrupted_ones_and_waits_for_bases(tmp_path):
    args = args_for(tmp_path, only=("vanilla_gan", "drs"))
    todo = run_benchmark.pending(args)
    assert [(row.variant, seed) for row, seed in todo if row.method == "vanilla_gan"] == [
        ("d-dropout-0.3", 1),
        ("d-dropout-0.3", 2),
        ("d-dropout-0.3", 3),
        ("default", 1),
        ("default", 2),
        ("default", 3),
        ("r1-gamma-10", 1),
    ]
    spread_over_sessions = run_benchmark.pending(args_for(tmp_path, variants=("d-dropout-0.3",), seeds=(2, 3)))
    assert [(row.method, row.variant, seed) for row, seed in spread_over_sessions] == [
        ("vanilla_gan", "d-dropout-0.3", 2),
        ("vanilla_gan", "d-dropout-0.3", 3),
    ]
    vanilla = next(row for row, _ in todo if row.variant == "default")
    drs = next(row for row, _ in todo if row.method == "drs")
    assert run_benchmark.command(drs, 1, args) is None  # its base has not finished

    assert drs.base == ("vanilla_gan", "d-dropout-0.3")
    base_checkpoint = finish(tmp_path / "work", *drs.base, 1, {"final": {}}) / "checkpoint.pt"
    base_checkpoint.write_bytes(b"")
    finish(tmp_path / "work", "vanilla_gan", "default", 1, {"final": {}})
    interrupted = run_benchmark.run_folder(args.work_dir, "vanilla_gan", "default", 2) / "runs" / "run2"
    interrupted.mkdir(parents=True)
    (interrupted / "checkpoint.pt").write_bytes(b"")
    todo = run_benchmark.pending(args)
    assert (vanilla, 1) not in todo and (vanilla, 2) in todo
    resume = run_benchmark.command(vanilla, 2, args)
    assert resume[-2:] == ["--resume", str(interrupted / "checkpoint.pt")] and resume[resume.index("--seed") + 1] == "2"
    assert ["--data-dir", "DATA"] == resume[resume.index("--data-dir") :][:2]
    drs_command = run_benchmark.command(drs, 1, args)
    assert drs_command[2] == str(base_checkpoint) and drs_command[drs_command.index("--seed") + 1] == "1"


def test_a_cpu_row_hides_the_gpu_and_side_by_side_runs_get_one_thread_each(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu_row = next(row for row in run_benchmark.ROWS if row.device == "cpu")
    cuda_row = next(row for row in run_benchmark.ROWS if row.device == "cuda")
    alone, side_by_side = args_for(tmp_path), args_for(tmp_path, jobs=2)
    assert run_benchmark.run_env(cpu_row, alone)["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in run_benchmark.run_env(cuda_row, alone)
    assert "OMP_NUM_THREADS" not in run_benchmark.run_env(cuda_row, alone)  # one run alone takes every core
    assert run_benchmark.run_env(cuda_row, side_by_side)["OMP_NUM_THREADS"] == "1"


def test_the_runner_runs_the_floor_row_and_writes_its_metrics(tmp_path):
    (floor,) = [row for row in run_benchmark.ROWS if row.method == "mnist_train" and row.device == "cpu"]
    command = run_benchmark.command(floor, 1, args_for(tmp_path))
    assert command[2] == "mnist-train" and command[-2:] == [
        "--json-out",
        str(tmp_path / "work/mnist_train/real-vs-real/seed1/metrics.json"),
    ]


def scores(fid, kid, epoch=None, **extra):
    found = {
        "fid": fid,
        "kid": kid,
        "kid_std": 0.001,
        "precision": 0.5,
        "recall": 0.25,
        "num_samples": 10000,
        "classifier_fid": fid / 10,
        "digits_covered": 10,
        **extra,
    }
    return found if epoch is None else {"epoch": epoch, **found}


def history(*values):
    return [{"epoch": i + 1, "train_seconds": 60.0 * (i + 1), "classifier_fid": v} for i, v in enumerate(values)]


@pytest.fixture
def benchmark_folder(tmp_path):
    work = tmp_path / "work"
    for seed, (last, best) in {1: (30.0, 20.0), 2: (40.0, 22.0)}.items():
        finish(
            work,
            "vanilla_gan",
            "default",
            seed,
            {
                "epochs": 100,
                "train_seconds": 600.0 * seed,
                "final": scores(last, 0.02),
                "best": scores(best, 0.01, 50),
                "provenance": {"git_commit": "abc123", "device_name": "AMD EPYC"},
                "history": history(9.0, 5.0 + seed),
            },
        )
    finish(
        work,
        "cyclegan",
        "default",
        1,
        {
            "epochs": 10,
            "train_seconds": 60.0,
            "final": {
                "usps_to_mnist_fid": 12.0,
                "usps_to_mnist_kid": 0.005,
                "usps_to_mnist_precision": 0.7,
                "usps_to_mnist_recall": 0.6,
                "usps_to_mnist_num_samples": 2007,
                "mnist_to_usps_label_kept": 0.9,
                "usps_to_mnist_label_kept": 0.8,
            },
            "best": None,
            "history": [],
        },
    )
    floor = run_benchmark.run_folder(str(work), "mnist_train", "real-vs-real", 1)
    floor.mkdir(parents=True)
    (floor / "metrics.json").write_text(json.dumps(scores(2.0, 0.0001)))
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n{report.METHODS_START}\nold\n{report.METHODS_END}\n{report.TABLE_START}\nold\n{report.TABLE_END}\n"
        f"{report.CURVES_START}\n{report.CURVES_END}\nend\n"
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "wgan.md").write_text(
        "# WGAN\n<!-- results-table:wgan_clip,wgan_gp:start -->\nold\n<!-- results-table:wgan_clip,wgan_gp:end -->\n"
        "<!-- results-table:vanilla_gan:start -->\nold\n<!-- results-table:vanilla_gan:end -->\nend\n"
    )
    return tmp_path


def report_args(tmp_path):
    return report.Args(
        work_dir=str(tmp_path / "work"),
        results_dir=str(tmp_path / "results"),
        readme=str(tmp_path / "README.md"),
        docs_dir=str(tmp_path / "docs"),
    )


def test_the_report_writes_summary_rows_with_mean_std_and_values(benchmark_folder):
    tmp_path = benchmark_folder
    report.main(report_args(tmp_path))
    rows = json.loads((tmp_path / "results" / "summary.json").read_text())["rows"]
    by_key = {(r["method"], r["variant"], r["generator"]): r for r in rows}
    assert set(by_key) == {
        ("mnist_train", "real-vs-real", "real"),
        ("vanilla_gan", "default", "last"),
        ("vanilla_gan", "default", "best"),
        ("cyclegan", "default", "last"),
    }
    last = by_key["vanilla_gan", "default", "last"]
    assert last["fid"]["values"] == [30.0, 40.0] and last["fid"]["mean"] == 35.0
    assert last["fid"]["std"] == pytest.approx(7.0710678, rel=1e-6)  # sample std of 30 and 40
    assert last["seeds"] == [1, 2] and last["epochs"] == 100 and last["num_samples"] == 10000
    assert last["train_minutes"] == pytest.approx(15.0) and last["device"] == "AMD EPYC" and last["commit"] == "abc123"
    assert last["command"] == "python vanilla_gan.py" and len(last["runs"]) == 2
    assert by_key["vanilla_gan", "default", "best"]["best_epochs"] == [50, 50]
    assert last["seeds_planned"] == [1, 2, 3]  # the row's third seed has not run yet
    cyclegan = by_key["cyclegan", "default", "last"]
    assert cyclegan["fid"]["values"] == [12.0] and cyclegan["num_samples"] == 2007
    assert cyclegan["usps_to_mnist_label_kept"]["mean"] == 0.8
    assert (tmp_path / "results/vanilla_gan/default/seed2.json").exists()


def test_a_row_whose_seeds_ran_on_different_machines_names_each_with_its_seeds():
    assert report.per_seed_label([(1, "AMD EPYC"), (2, "AMD EPYC")]) == "AMD EPYC"
    assert (
        report.per_seed_label([(1, "AMD EPYC"), (2, "AMD EPYC"), (3, "Intel Xeon")])
        == "AMD EPYC (seeds 1, 2); Intel Xeon (seed 3)"
    )


def test_rows_survive_a_lost_work_dir_from_their_committed_copies(benchmark_folder):
    tmp_path = benchmark_folder
    first = report.main(report_args(tmp_path))
    shutil.rmtree(tmp_path / "work")  # a new checkout: the runs are gone, their copies in results/ are committed
    again = report.main(report_args(tmp_path))
    assert [{k: v for k, v in row.items() if k != "runs"} for row in again] == [
        {k: v for k, v in row.items() if k != "runs"} for row in first
    ]
    todo = run_benchmark.pending(args_for(tmp_path, only=("vanilla_gan",), variants=("default",)))
    assert [seed for _, seed in todo] == [3]  # seeds 1 and 2 are finished, so the runner does not train them again


def test_the_report_regenerates_the_readme_table_and_draws_the_curves(benchmark_folder):
    tmp_path = benchmark_folder
    report.main(report_args(tmp_path))
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and readme.endswith("end\n")
    assert (
        "| vanilla_gan | default | last | 35.00 ± 7.07 | 20.00 ± 0.00 | 0.500 ± 0.000 | 0.250 ± 0.000 | 1, 2 (2 of 3 planned) | 10000 | 100 epochs, 15 min | AMD EPYC |"
        in readme
    )
    assert "| mnist_train | real-vs-real | real | 2.00 | 0.10 |" in readme
    assert "![fast metric against epoch and training minutes](results/curves.png)" in readme
    methods = {line.split(" | ")[0]: line for line in readme.splitlines() if line.startswith("| `")}
    assert (  # both generators, neither picked by its Inception FID
        "FID 35.00 ± 7.07 last / 21.00 ± 1.41 best (epoch 50, 50) (default, 2 of 3 seeds, 10000 samples, 100 epochs)"
        in methods["| `vanilla_gan.py`"]
    )
    assert (
        "not run under the protocol yet" in methods["| `wgan_gp.py`"] and "(docs/wgan.md)" in methods["| `wgan_gp.py`"]
    )
    assert "FID 2.00 real (real-vs-real, 1 seed, 10000 samples)" in methods["| `eval_fid.py`"]  # the floor
    page = (tmp_path / "docs" / "wgan.md").read_text()
    assert (
        "old" not in page
        and page.endswith("end\n")
        and "| vanilla_gan | default | best (epoch 50, 50) | 21.00 ± 1.41 |" in page
    )
    assert "No wgan_clip or wgan_gp row has been run under the protocol yet" in page and "cyclegan" not in page
    from PIL import Image

    with Image.open(tmp_path / "results" / "curves.png") as image:
        assert image.size[0] > 800 and len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank


def test_a_post_hoc_row_states_its_bases_budget_seed_for_seed_and_its_own_seconds(tmp_path):
    work = tmp_path / "work"
    for seed, minutes in ((1, 40.0), (2, 50.0)):
        base = {"epochs": 100, "train_seconds": 60 * minutes, "final": scores(40.0, 0.03), "history": []}
        finish(work, "vanilla_gan", "d-dropout-0.3", seed, base)
        drs = {"base": scores(40.0, 0.03), "drs": scores(35.0, 0.02), "sampling_seconds": 2.0 + seed}
        finish(work, "drs", "on-vanilla_gan-d-dropout-0.3", seed, drs)
    finish(work, "drs", "on-vanilla_gan-d-dropout-0.3", 3, {**drs, "sampling_seconds": 4.0})  # its base is gone
    rows = report.summary_rows(report.collect(report_args(tmp_path)))
    drs_row = next(r for r in rows if r["method"] == "drs" and r["generator"] == "drs")
    assert drs_row["seeds"] == [1, 2, 3] and drs_row["sampler_seconds"] == pytest.approx(11 / 3)
    assert "base_epochs" not in drs_row  # seed 3's base training is unknown: no budget made of two seeds' bases
    shutil.rmtree(work / "drs" / "on-vanilla_gan-d-dropout-0.3" / "seed3")
    rows = report.summary_rows(report.collect(report_args(tmp_path)))
    drs_row = next(r for r in rows if r["method"] == "drs" and r["generator"] == "drs")
    assert drs_row["base_epochs"] == 100 and drs_row["base_train_minutes"] == pytest.approx(45.0)
    assert "| 10000 | base 100 epochs, 45 min; +4 s |" in report.markdown_table([drs_row])


def test_the_report_without_finished_runs_says_so_instead_of_an_empty_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        f"{report.METHODS_START}\n{report.METHODS_END}\n{report.TABLE_START}\nold\n{report.TABLE_END}\n"
        f"{report.CURVES_START}\n{report.CURVES_END}\n"
    )
    rows = report.main(
        report.Args(
            work_dir=str(tmp_path / "work"), results_dir=str(tmp_path / "results"), readme=str(readme), docs_dir=""
        )
    )
    assert rows == [] and report.NO_ROWS in readme.read_text() and "| method | variant |" not in readme.read_text()


def test_the_sweep_table_gives_median_and_range_over_seeds_of_finished_runs_only():
    import sweep

    def run(*fids, digits=10):
        return {
            "history": [{"epoch": i + 1, "classifier_fid": f, "digits_covered": digits} for i, f in enumerate(fids)]
        }

    runs = {
        "default": {1: run(50.0, 30.0, 40.0), 2: run(60.0, 20.0, 45.0, digits=7), 3: run(70.0, 25.0, 35.0)},
        "unfinished": {1: run(50.0)},
    }
    table = sweep.summarise(runs, epochs=3)
    (line,) = [row for row in table.splitlines() if row.startswith("| default")]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[1] == "1, 2, 3" and cells[2] == "25.0 [20.0, 30.0] (2, 2, 2)"  # best: median [min, max] (epochs)
    assert cells[3] == "40.0 [35.0, 45.0]" and cells[5] == "10, 7, 10"
    assert "unfinished" not in table


def test_every_sweep_variant_is_a_valid_command_line_of_its_script():
    import importlib

    import tyro

    import sweep

    for study, (script, epochs, common, variants) in sweep.STUDIES.items():
        module = importlib.import_module(script)
        for variant, flags in variants.items():
            parsed = tyro.cli(module.Args, args=["--epochs", str(epochs), *common, *flags])
            assert parsed.epochs == epochs, (study, variant)


def test_the_sweep_table_names_the_commit_each_run_was_launched_from(tmp_path):
    import torch

    import sweep

    for seed, commit in ((1, "aaaaaaa"), (2, "bbbbbbb")):
        run_dir = tmp_path / "work" / "vanilla-30ep" / "default" / f"seed{seed}" / "runs" / "run"
        run_dir.mkdir(parents=True)
        (run_dir.parents[1] / "code_commit.txt").write_text(commit + "\n")
        history = [{"epoch": 30, "classifier_fid": 10.0 * seed, "digits_covered": 10}]
        checkpoint = {"run_name": "run", "args": {}, "history": history, "train_seconds": 1.0, "epoch": 30}
        torch.save(checkpoint, run_dir / "checkpoint.pt")
    args = sweep.Args(
        "vanilla-30ep", work_dir=str(tmp_path / "work"), results_dir=str(tmp_path / "out"), table_only=True
    )
    assert sweep.main(args) == 0
    written = json.loads((tmp_path / "out" / "vanilla-30ep.json").read_text())
    assert [written["runs"]["default"][seed]["code_commit"] for seed in ("1", "2")] == ["aaaaaaa", "bbbbbbb"]
    assert "at commit aaaaaaa, bbbbbbb" in (tmp_path / "out" / "vanilla-30ep.md").read_text()


def test_gpu_rows_are_rows_of_their_own_with_their_own_folders_and_runner(tmp_path):
    cpu_todo = run_benchmark.pending(args_for(tmp_path, only=("vanilla_gan",), variants=("d-dropout-0.3",)))
    cuda_args = args_for(tmp_path, only=("vanilla_gan",), variants=("d-dropout-0.3",), device="cuda")
    cuda_todo = run_benchmark.pending(cuda_args)
    assert {row.device for row, _ in cpu_todo} == {"cpu"} and {row.device for row, _ in cuda_todo} == {"cuda"}
    assert [seed for _, seed in cuda_todo] == [1, 2, 3]
    (gpu_row, _), *_ = cuda_todo
    command = run_benchmark.command(gpu_row, 1, cuda_args)
    assert command[1].endswith("vanilla_gan.py") and command[command.index("--d-dropout") + 1] == "0.3"

    metrics = {
        "epochs": 100,
        "train_seconds": 120.0,
        "final": scores(30.0, 0.02),
        "best": scores(25.0, 0.01, 60),
        "provenance": {"git_commit": "abc123", "device_name": "NVIDIA H200"},
        "history": history(9.0, 6.0),
    }
    folder = run_benchmark.run_folder(str(tmp_path / "work"), "vanilla_gan", "d-dropout-0.3", 1, "cuda")
    assert folder == tmp_path / "work/vanilla_gan/d-dropout-0.3/cuda/seed1"
    (folder / "runs" / "run").mkdir(parents=True)
    (folder / "runs" / "run" / "metrics.json").write_text(json.dumps(metrics))
    assert [seed for _, seed in run_benchmark.pending(cuda_args)] == [2, 3]
    assert len(run_benchmark.pending(args_for(tmp_path, only=("vanilla_gan",), variants=("d-dropout-0.3",)))) == 3

    rows = report.main(
        report.Args(work_dir=str(tmp_path / "work"), results_dir=str(tmp_path / "results"), readme="", docs_dir="")
    )
    (last,) = [row for row in rows if row["generator"] == "last"]
    assert last["device"] == "NVIDIA H200" and last["fid"]["values"] == [30.0] and last["seeds_planned"] == [1, 2, 3]
    assert (tmp_path / "results/vanilla_gan/d-dropout-0.3/cuda/seed1.json").exists()


@pytest.mark.parametrize("method", ["vanilla_gan", "wgan_clip", "wgan_gp"])
def test_the_readmes_best_command_of_an_mlp_script_is_its_first_row_so_its_headline(method):
    """The README's methods table quotes a method's first row with runs; it must be the command the README recommends."""
    first = next(row for row in run_benchmark.ROWS if row.method == method and row.device == "cpu")
    readme = (run_benchmark.REPO / "README.md").read_text()
    assert f"python {method}.py {' '.join(first.flags)}   # row {method}/{first.variant}" in readme


@pytest.mark.parametrize("row", [row for row in run_benchmark.ROWS if row.flags and not row.base], ids=str)
def test_every_row_is_a_valid_command_line_of_its_script(row):
    """A GPU session has minutes, not a second try: a flag its script does not know must fail here first."""
    import importlib

    import tyro

    tyro.cli(importlib.import_module(row.method).Args, args=list(row.flags))


def test_the_gpu_session_script_parses_and_names_only_runner_flags_that_exist():
    import re
    import subprocess

    import tyro

    script = run_benchmark.REPO / "benchmark" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    command, continued, _ = text[text.index("benchmark/run_benchmark.py") :].split("\n", 2)  # one line continued
    flags = re.findall(r" (--[a-z-]+)", command + continued)
    assert "--device" in flags and "--work-dir" in flags
    for flag in flags:  # its value aside, the runner must know it
        assert flag[2:].replace("-", "_") in run_benchmark.Args.__dataclass_fields__, flag
    tyro.cli(run_benchmark.Args, args=["--device", "cuda", "--jobs", "8", "--poll-seconds", "2"])


def test_a_sweep_in_a_fresh_checkout_keeps_the_runs_its_committed_json_holds(tmp_path):
    import sweep

    finished_run = {"flags": [], "code_commit": "aaaaaaa", "history": history(50.0, 30.0), "train_seconds": 1.0}
    kept = {"script": "vanilla_gan", "epochs": 2, "runs": {"default": {"1": finished_run}}}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "vanilla-30ep.json").write_text(json.dumps(kept))
    assert sweep.committed_runs(str(tmp_path / "out"), "vanilla-30ep")["default"][1] == finished_run
    assert sweep.finished(finished_run, 2) and not sweep.finished(finished_run, 30) and not sweep.finished(None, 2)
    args = sweep.Args(
        "vanilla-30ep", work_dir=str(tmp_path / "work"), results_dir=str(tmp_path / "out"), table_only=True
    )
    assert sweep.main(args) == 0  # an empty work dir: before, this rewrote the study's JSON without the run
    assert json.loads((tmp_path / "out" / "vanilla-30ep.json").read_text())["runs"]["default"]["1"] == finished_run


@pytest.mark.parametrize("dirty", ["0", "1"])
def test_provenance_of_a_tree_without_git_comes_from_the_commit_its_session_script_names(monkeypatch, dirty):
    import subprocess

    import torch

    import eval_fid

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.delenv("CLEANGAN_GIT_COMMIT", raising=False)
    assert eval_fid.provenance(torch.device("cpu"))["git_commit"] is None
    monkeypatch.setenv("CLEANGAN_GIT_COMMIT", "60c7228")
    monkeypatch.setenv("CLEANGAN_GIT_DIRTY", dirty)
    found = eval_fid.provenance(torch.device("cpu"))
    assert found["git_commit"] == "60c7228" and found["git_dirty"] is (dirty == "1")
