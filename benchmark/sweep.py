"""Recipe sweeps on the fast metric: short runs of one script over named variants and seeds, no Inception FID.

Each run trains for --epochs with the fast metric (classifier FID, digits covered) every epoch, and is stopped once
its last epoch's checkpoint is written: the final FID/KID/P/R of the last and best generator (two 10,000-image
Inception passes, ~80 min on one CPU core) is what a sweep skips. Runs are pinned one per core, finished runs are
skipped and interrupted ones resumed, and results/sweeps/STUDY.json keeps every run's fast-metric history.
Run: python benchmark/sweep.py vanilla-30ep --jobs 2   (then: python benchmark/sweep.py vanilla-30ep --table-only)
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from statistics import median
from typing import Optional

import torch
import tyro

REPO = Path(__file__).resolve().parents[1]

# study name -> (script, epochs, flags every variant gets, {variant: its own flags}); every variant runs seeds 1-3.
STUDIES = {
    "vanilla-30ep": (
        "vanilla_gan", 30, (),
        {
            "default": (),
            "beta1-0.9": ("--beta1", "0.9"),
            "d-dropout-0.3": ("--d-dropout", "0.3"),
            "beta1-0.9-d-dropout-0.3": ("--beta1", "0.9", "--d-dropout", "0.3"),
            "lr-d-1e-4": ("--lr-d", "1e-4"),
            "batch-128": ("--batch-size", "128"),
        },
    ),
    "wgan-gp-30ep": (
        "wgan_gp", 30, ("--lambda-gp", "10", "--n-critic", "5"),
        {
            "default": (),
            "lr-2e-4": ("--lr-g", "2e-4", "--lr-critic", "2e-4"),
            "lr-2e-4-decay-20": ("--lr-g", "2e-4", "--lr-critic", "2e-4", "--lr-decay-epochs", "20"),
            "lr-2e-4-adam-0.5-0.999": ("--lr-g", "2e-4", "--lr-critic", "2e-4", "--beta1", "0.5", "--beta2", "0.999"),
            "beta1-0.5": ("--beta1", "0.5"),
            "lambda-gp-5": ("--lambda-gp", "5"),
            "batch-128": ("--batch-size", "128"),
        },
    ),
    "wgan-clip-30ep": (
        "wgan_clip", 30, (),
        {
            "default": (),
            "lr-1e-4": ("--lr-g", "1e-4", "--lr-critic", "1e-4"),
            "lr-2e-4": ("--lr-g", "2e-4", "--lr-critic", "2e-4"),
            "clip-0.02": ("--clip-value", "0.02"),
            "generator-bn": ("--generator-bn",),
            "lr-1e-4-generator-bn": ("--lr-g", "1e-4", "--lr-critic", "1e-4", "--generator-bn"),
            "lr-2e-4-generator-bn": ("--lr-g", "2e-4", "--lr-critic", "2e-4", "--generator-bn"),
        },
    ),
}  # fmt: skip
SEEDS = (1, 2, 3)


@dataclass
class Args:
    study: tyro.conf.Positional[str]
    """a name in STUDIES"""
    jobs: int = 1
    """runs side by side, each pinned to its own core with one thread"""
    variants: tuple[str, ...] = ()
    """run only these of the study's variants (default: all); the table shows every finished one"""
    seeds: tuple[int, ...] = SEEDS
    """run only these seeds (e.g. --seeds 1 for a first signal of a new variant)"""
    work_dir: str = str(REPO / "benchmark" / "work" / "sweeps")
    """where the runs live (checkpoints too: not committed)"""
    results_dir: str = str(REPO / "results" / "sweeps")
    """writes STUDY.json (every run's history) and STUDY.md (the table) here"""
    table_only: bool = False
    """collect what has finished and write the table; start nothing"""
    data_dir: str = str(REPO.parent / "shared" / "data")
    inception_weights: str = str(REPO.parent / "shared" / "weights" / "pt_inception-2015-12-05-pool3.pth")


def git_commit() -> str:
    """The short commit of the repository's HEAD, as the runs launched now will load it."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def latest_checkpoint(folder: Path):
    """(path, epoch) of the run's checkpoint.pt in `folder`, or (None, 0)."""
    found = sorted(glob(str(folder / "runs" / "*" / "checkpoint.pt")))
    if not found:
        return None, 0
    try:
        return found[0], torch.load(found[0], map_location="cpu", weights_only=True)["epoch"]
    except Exception:  # being replaced right now (atomic rename): read it on the next poll
        return found[0], 0


def committed_runs(results_dir: str, study: str) -> dict:
    """{variant: {seed: run}} as STUDY.json kept them: a fresh checkout's work dir is empty, its results are not."""
    path = Path(results_dir) / f"{study}.json"
    if not path.exists():
        return {}
    kept = json.loads(path.read_text())["runs"]
    return {variant: {int(seed): run for seed, run in by_seed.items()} for variant, by_seed in kept.items()}


def finished(run: Optional[dict], epochs: int) -> bool:
    return bool(run and run["history"] and run["history"][-1]["epoch"] >= epochs)


def history_of(checkpoint_path: str) -> dict:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    return {
        "run_name": checkpoint["run_name"],
        "args": checkpoint["args"],
        "history": checkpoint["history"],
        "train_seconds": checkpoint["train_seconds"],
    }


def summarise(runs: dict, epochs: int) -> str:
    """Markdown table: per variant, median [min, max] over seeds of the best and the last classifier FID."""
    lines = [
        "| variant | seeds | best classifier FID (epoch) | last classifier FID | mean of last 5 | digits at the end |",
        "|---|---|---|---|---|---|",
    ]
    for variant, by_seed in runs.items():
        done = {seed: run for seed, run in by_seed.items() if run["history"] and run["history"][-1]["epoch"] == epochs}
        if not done:
            continue
        best = {s: min(r["history"], key=lambda h: h["classifier_fid"]) for s, r in done.items()}
        last = {s: r["history"][-1] for s, r in done.items()}
        tail = {
            s: sum(h["classifier_fid"] for h in r["history"][-5:]) / len(r["history"][-5:]) for s, r in done.items()
        }

        def cell(values):
            values = list(values)
            return (
                f"{median(values):.1f} [{min(values):.1f}, {max(values):.1f}]"
                if len(values) > 1
                else f"{values[0]:.1f}"
            )

        best_cell = (
            cell(b["classifier_fid"] for b in best.values())
            + " ("
            + ", ".join(str(b["epoch"]) for b in best.values())
            + ")"
        )
        digits = ", ".join(str(last[s]["digits_covered"]) for s in done)
        lines.append(
            f"| {variant} | {', '.join(map(str, done))} | {best_cell} | {cell(h['classifier_fid'] for h in last.values())} "
            f"| {cell(tail.values())} | {digits} |"
        )
    return "\n".join(lines) + "\n"


def main(args: Args) -> int:
    if args.study not in STUDIES:
        print(f"error: unknown study {args.study!r}; known: {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    script, epochs, common, variants = STUDIES[args.study]
    unknown = set(args.variants) - set(variants)
    if unknown:
        print(
            f"error: {args.study} has no variant {', '.join(sorted(unknown))}; it has {', '.join(variants)}",
            file=sys.stderr,
        )
        return 2
    chosen = [v for v in variants if not args.variants or v in args.variants]
    kept = committed_runs(args.results_dir, args.study)
    todo = [  # seed-major: a cut-short study has whole seeds; a run STUDY.json holds to the end is not run again
        (variant, seed)
        for seed in args.seeds
        for variant in chosen
        if not finished(kept.get(variant, {}).get(seed), epochs)
    ]
    running, free_cores = {}, sorted(os.sched_getaffinity(0))[: max(1, args.jobs)]
    while not args.table_only and (todo or running):
        for (variant, seed), (process, core, log, folder) in list(running.items()):
            checkpoint, epoch = latest_checkpoint(folder)
            if epoch >= epochs and process.poll() is None:
                process.terminate()  # it is in the final Inception scoring, which a sweep does not read
                process.wait()
            if process.poll() is not None:
                log.close()
                status = "done" if epoch >= epochs else f"exit {process.returncode} at epoch {epoch}"
                print(f"{time.strftime('%H:%M:%S')} {variant}/seed{seed}: {status}", flush=True)
                free_cores.append(core)
                del running[variant, seed]
        while todo and free_cores:
            variant, seed = todo.pop(0)
            folder = Path(args.work_dir) / args.study / variant / f"seed{seed}"
            checkpoint, epoch = latest_checkpoint(folder)
            if epoch >= epochs:
                continue
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable, str(REPO / f"{script}.py"), "--seed", str(seed),
                "--epochs", str(epochs), *common, *variants[variant], "--data-dir", args.data_dir,
                "--inception-weights", args.inception_weights, *(["--resume", checkpoint] if checkpoint else []),
            ]  # fmt: skip
            (folder / "code_commit.txt").write_text(git_commit() + "\n")  # what this run loads (the tree may move on)
            core = free_cores.pop(0)
            log = open(folder / "log.txt", "a")
            print(f"{time.strftime('%H:%M:%S')} {variant}/seed{seed} on core {core}: {' '.join(cmd)}", flush=True)
            process = subprocess.Popen(
                cmd,
                cwd=folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
                preexec_fn=lambda core=core: os.sched_setaffinity(0, {core}),
            )
            running[variant, seed] = (process, core, log, folder)
        time.sleep(10)

    runs = {}  # the work dir's runs, else the ones STUDY.json kept
    for variant, flags in variants.items():
        for seed in SEEDS:
            folder = Path(args.work_dir) / args.study / variant / f"seed{seed}"
            checkpoint, _ = latest_checkpoint(folder)
            if not checkpoint and seed in kept.get(variant, {}):
                runs.setdefault(variant, {})[seed] = kept[variant][seed]
            elif checkpoint:
                commit_file = folder / "code_commit.txt"
                code_commit = commit_file.read_text().strip() if commit_file.exists() else "unknown"
                runs.setdefault(variant, {})[seed] = {
                    "flags": [*common, *flags],
                    "code_commit": code_commit,
                    **history_of(checkpoint),
                }
    os.makedirs(args.results_dir, exist_ok=True)
    commit = ", ".join(sorted({run["code_commit"] for by_seed in runs.values() for run in by_seed.values()})) or "none"
    with open(Path(args.results_dir) / f"{args.study}.json", "w") as f:
        json.dump({"script": script, "epochs": epochs, "code_commit": commit, "runs": runs}, f, indent=1)
    table = summarise(runs, epochs)
    header = (
        f"# {args.study}: python {script}.py --epochs {epochs} {' '.join(common)} + the variant's flags\n\n"
        f"Generated by `python benchmark/sweep.py {args.study}` from the runs' checkpoints; {script}.py at commit {commit}. "
        "Classifier FID is the fast metric (10,000 samples, lower is better); cells are median [min, max] over seeds.\n\n"
    )
    (Path(args.results_dir) / f"{args.study}.md").write_text(header + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
