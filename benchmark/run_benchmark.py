"""Runs every row of CleanGAN's results table under one protocol, and picks up where it stopped.

Protocol: 10,000 samples against the 10,000 MNIST test images (cyclegan: F(all 2,007 USPS test digits)), FID, KID,
precision, recall and the fast metric, for the last generator and best.pt of every training run.
Run: python benchmark/run_benchmark.py --jobs 2   (then: python benchmark/report.py)
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Optional

import tyro

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One line of the results table: a script, the flags that make its variant, and the seeds it runs."""

    method: str
    """the script's name without .py"""
    variant: str
    """names the flags below (`default` for none)"""
    flags: tuple = ()
    """the flags that differ from the script's defaults; the runner adds --seed and the offline flags"""
    seeds: tuple = (1,)
    base: Optional[tuple] = None
    """post-hoc samplers: the (method, variant) whose seed's checkpoint.pt they start from (on the same device)"""
    device: str = "cpu"
    """where its runs are made: `cpu`, or `cuda` for a lent GPU; the same seed gives other numbers on other hardware,
    so a GPU row is a row of its own"""


def row_path(method: str, variant: str, device: str = "cpu") -> Path:
    """METHOD/VARIANT, or METHOD/VARIANT/DEVICE off the CPU: a row's folder in the work dir and in results/."""
    return Path(method) / variant if device == "cpu" else Path(method) / variant / device


# The exact command of every row in results/summary.json; a method's documented best command comes first, as the first
# row with runs is its README headline. Budgets are the scripts' defaults unless a flag says otherwise (vanilla_gan
# 100 epochs, wgan_* 100, dcgan 25, otgan 30, cyclegan 10, unrolled/mdgan on MNIST 100).
ROWS = [
    Row("mnist_train", "real-vs-real"),
    Row("vanilla_gan", "d-dropout-0.3", ("--d-dropout", "0.3"), seeds=(1, 2, 3)),  # the sweep's best (issue 29)
    Row("vanilla_gan", "default", seeds=(1, 2, 3)),
    Row("vanilla_gan", "r1-gamma-10", ("--r1-gamma", "10")),
    # issue 29: batch norm in G at the paper's RMSProp 5e-5, the report's 200-epoch budget (the earlier 400-epoch run's
    # fast metric bottomed at epoch 190)
    Row("wgan_clip", "generator-bn-200", ("--generator-bn", "--epochs", "200"), seeds=(1, 2, 3)),
    Row("wgan_clip", "default"),
    # the 30-epoch study's best (RMSProp 1e-4 with batch norm in G) at 200 epochs: it plateaued from epoch ~50, one seed
    Row(
        "wgan_clip",
        "lr-1e-4-generator-bn-200",
        ("--lr-g", "1e-4", "--lr-critic", "1e-4", "--generator-bn", "--epochs", "200"),
    ),
    # issue 29: Adam 2e-4 won the 30-epoch study on every seed; the report's decay step at 150 of 180 epochs, in one run
    Row(
        "wgan_gp",
        "lr-2e-4-decay-150",
        (
            "--lambda-gp",
            "10",
            "--n-critic",
            "5",
            "--lr-g",
            "2e-4",
            "--lr-critic",
            "2e-4",
            "--epochs",
            "180",
            "--lr-decay-epochs",
            "150",
        ),
        seeds=(1, 2, 3),
    ),  # fmt: skip
    Row("wgan_gp", "default", ("--lambda-gp", "10", "--n-critic", "5")),
    # docs/unrolled_mdgan.md's MNIST command: a look-ahead at D's own rate lets D win outright on MNIST (FID 284, 2 digits)
    Row(
        "unrolled_gan", "mnist-K5-unroll-lr-2e-6", ("--dataset", "mnist", "--unroll-steps", "5", "--unroll-lr", "2e-6")
    ),
    Row("mdgan", "mnist", ("--dataset", "mnist")),
    Row("otgan", "default", ("--bf16",)),
    Row("cyclegan", "default", ("--bf16",)),
    # A short CPU row, labelled by its budget: 100 MNIST epochs at ~4.5 min each outlast a 3-hour CPU session, and a
    # work dir does not survive between sessions.
    Row(
        "unrolled_gan",
        "mnist-K5-unroll-lr-2e-6-short-20-epochs",
        ("--dataset", "mnist", "--unroll-steps", "5", "--unroll-lr", "2e-6", "--epochs", "20"),
    ),
    Row("dcgan", "default", ("--bf16",), seeds=(1, 2, 3)),
    # issue 29: the post-hoc samplers on the recipe bases, seed for seed (seed N starts from the base's seed N)
    Row("latent_adapt", "on-vanilla_gan-d-dropout-0.3", seeds=(1, 2, 3), base=("vanilla_gan", "d-dropout-0.3")),
    Row("drs", "on-vanilla_gan-d-dropout-0.3", seeds=(1, 2, 3), base=("vanilla_gan", "d-dropout-0.3")),
    Row("latent_adapt", "on-wgan_gp-lr-2e-4-decay-150", seeds=(1, 2, 3), base=("wgan_gp", "lr-2e-4-decay-150")),
    Row("drs", "on-wgan_gp-lr-2e-4-decay-150", seeds=(1, 2, 3), base=("wgan_gp", "lr-2e-4-decay-150")),
]

# The same commands on a GPU (benchmark/gpu_session.sh runs them on a lent H200 within its session), most wanted
# first: the runner starts rows in this order, and a session's time may end before the last ones.
_CPU_ROW = {(row.method, row.variant): row for row in ROWS}
CUDA_ROWS = [
    Row("mnist_train", "real-vs-real", device="cuda"),  # first: it trains the classifier and caches the references
    Row("wgan_gp", "lr-2e-4-decay-150", _CPU_ROW["wgan_gp", "lr-2e-4-decay-150"].flags, (1, 2, 3), device="cuda"),
    Row("vanilla_gan", "d-dropout-0.3", _CPU_ROW["vanilla_gan", "d-dropout-0.3"].flags, (1, 2, 3), device="cuda"),
    Row("wgan_clip", "generator-bn-200", _CPU_ROW["wgan_clip", "generator-bn-200"].flags, (1, 2, 3), device="cuda"),
    Row("vanilla_gan", "default", seeds=(1, 2, 3), device="cuda"),
    Row("wgan_gp", "default", _CPU_ROW["wgan_gp", "default"].flags, device="cuda"),
    Row("wgan_clip", "default", device="cuda"),
    Row("dcgan", "default", ("--bf16",), (1, 2, 3), device="cuda"),
    Row("otgan", "default", ("--bf16",), device="cuda"),
    Row("cyclegan", "default", ("--bf16",), device="cuda"),
    Row("mdgan", "mnist", ("--dataset", "mnist"), device="cuda"),
    Row("vanilla_gan", "r1-gamma-10", _CPU_ROW["vanilla_gan", "r1-gamma-10"].flags, device="cuda"),
    # the post-hoc samplers on the recipe bases (one seed each: a GPU session's minutes go to the bases' seeds first)
    *(Row(row.method, row.variant, row.flags, (1,), row.base, device="cuda") for row in ROWS if row.base),
    # unrolled_gan on MNIST is not here: ~9x vanilla_gan's step cost, 100 epochs outlast a GPU session's 10 minutes
]
ROWS += CUDA_ROWS


@dataclass
class Args:
    jobs: int = 1
    """runs side by side, each pinned to its own core with one thread (1: one after another, all cores)"""
    work_dir: str = str(REPO / "benchmark" / "work")
    """where each run lives, as WORK/METHOD/VARIANT/seedN/runs/RUN (checkpoints too: not committed)"""
    results_dir: str = str(REPO / "results")
    """report.py's committed copies (METHOD/VARIANT/seedN.json): a run found there is finished and not run again"""
    only: tuple[str, ...] = ()
    """run only these methods (e.g. --only vanilla_gan dcgan); post-hoc rows still need their base finished"""
    variants: tuple[str, ...] = ()
    """run only these variants (e.g. --variants d-dropout-0.3 real-vs-real)"""
    seeds: tuple[int, ...] = ()
    """run only these seeds of each row (e.g. --seeds 1 to spread a row's seeds over sessions)"""
    device: Optional[str] = None
    """run the rows of this device, `cpu` or `cuda` (default: cuda where a GPU is visible, else cpu)"""
    extra: tuple[str, ...] = ()
    """flags added to every training command, e.g. --extra --epochs 2 for a short check (label such rows as short)"""
    data_dir: str = str(REPO.parent / "shared" / "data")
    """MNIST (and USPS) for every command"""
    inception_weights: str = str(REPO.parent / "shared" / "weights" / "pt_inception-2015-12-05-pool3.pth")
    """the FID Inception weights for every command"""
    dry_run: bool = False
    """print what would run, run nothing"""
    poll_seconds: float = field(default=5.0)
    """how often to check on running jobs"""


def run_folder(work_dir: str, method: str, variant: str, seed: int, device: str = "cpu") -> Path:
    return Path(work_dir) / row_path(method, variant, device) / f"seed{seed}"


def finished_metrics(folder: Path) -> Optional[str]:
    """The metrics.json a finished run left in `folder`, or None."""
    found = sorted(glob(str(folder / "runs" / "*" / "metrics.json"))) + sorted(glob(str(folder / "metrics.json")))
    return found[0] if found else None


def committed_metrics(results_dir: str, method: str, variant: str, seed: int, device: str = "cpu") -> Optional[str]:
    """report.py's committed copy of a finished run's metrics.json: the row survives a lost work dir."""
    copy = Path(results_dir) / row_path(method, variant, device) / f"seed{seed}.json"
    return str(copy) if copy.exists() else None


def finished_run(args, method: str, variant: str, seed: int, device: str = "cpu") -> Optional[str]:
    """A finished run's metrics.json: in the work dir, else its committed copy in the results dir."""
    in_work_dir = finished_metrics(run_folder(args.work_dir, method, variant, seed, device))
    return in_work_dir or committed_metrics(args.results_dir, method, variant, seed, device)


def command(row: Row, seed: int, args: Args) -> Optional[list]:
    """The command that runs (or resumes) one seed of a row; None while its base run is not finished."""
    offline = ["--data-dir", args.data_dir, "--inception-weights", args.inception_weights]
    folder = run_folder(args.work_dir, row.method, row.variant, seed, row.device)
    if row.method == "mnist_train":  # the floor: 10,000 real training digits scored like a generator's samples
        return [
            sys.executable,
            str(REPO / "eval_fid.py"),
            "mnist-train",
            *offline,
            "--json-out",
            str(folder / "metrics.json"),
        ]
    if row.base:
        base = run_folder(args.work_dir, *row.base, seed, row.device)
        if finished_metrics(base) is None:
            return None
        (checkpoint,) = glob(str(base / "runs" / "*" / "checkpoint.pt"))
        return [sys.executable, str(REPO / f"{row.method}.py"), checkpoint, "--seed", str(seed), *row.flags, *offline]
    resume = sorted(glob(str(folder / "runs" / "*" / "checkpoint.pt")))
    return [
        sys.executable,
        str(REPO / f"{row.method}.py"),
        "--seed",
        str(seed),
        *row.flags,
        *args.extra,
        *offline,
        *(["--resume", resume[0]] if resume else []),
    ]


def device_of(args: Args) -> str:
    """The device whose rows this runner makes: --device, else cuda where a GPU is visible."""
    if args.device is None:
        import torch  # only here: the runner needs no torch until it has to ask

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def run_env(row: Row, args: Args) -> dict:
    """The environment of one run: one thread when runs share the cores; no GPU for a CPU row, since the scripts take
    CUDA wherever they see it and the row would then not be the one its folder names."""
    env = dict(os.environ)
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    if row.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def pending(args: Args) -> list:
    """(row, seed) pairs with no metrics.json yet (in the work dir or committed in results/), in table order."""
    return [(row, seed) for row in ROWS for seed in row.seeds
            if (not args.only or row.method in args.only)
            and (not args.variants or row.variant in args.variants)
            and (not args.seeds or seed in args.seeds)
            and row.device == device_of(args)
            and finished_run(args, row.method, row.variant, seed, row.device) is None]  # fmt: skip


def main(args: Args) -> int:
    todo, running, failed = pending(args), {}, []
    free_cores = sorted(os.sched_getaffinity(0))[: max(1, args.jobs)]
    print(f"{len(todo)} {device_of(args)} runs to do in {args.work_dir}")
    while todo or running:
        for job, (process, core, label, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                print(f"{time.strftime('%H:%M:%S')} {label}: exit {process.returncode}")
                if process.returncode != 0:
                    failed.append(label)
                free_cores.append(core)
                del running[job]
        for row, seed in list(todo):
            if not free_cores:
                break
            cmd = command(row, seed, args)
            if cmd is None:
                continue  # its base is not finished yet (or failed: then it stays to do)
            todo.remove((row, seed))
            label = f"{row.method}/{row.variant}/seed{seed}"
            if args.dry_run:
                print(label, " ".join(cmd))
                continue
            folder = run_folder(args.work_dir, row.method, row.variant, seed, row.device)
            folder.mkdir(parents=True, exist_ok=True)
            core = free_cores.pop(0)
            pin = (lambda core=core: os.sched_setaffinity(0, {core})) if args.jobs > 1 else None
            log = open(folder / "log.txt", "a")
            print(f"{time.strftime('%H:%M:%S')} {label}: {' '.join(cmd)}", flush=True)
            running[label] = (
                subprocess.Popen(
                    cmd, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=run_env(row, args), preexec_fn=pin
                ),
                core,
                label,
                log,
            )
        if args.dry_run:
            break
        blocked = todo and not running and all(command(row, seed, args) is None for row, seed in todo)
        if blocked:
            print(
                "left to do, waiting on bases that did not finish in the work dir (a base found only in results/ "
                "left no checkpoint: run it again): " + ", ".join(f"{r.method}/{r.variant}" for r, _ in todo)
            )
            return 1
        time.sleep(args.poll_seconds if running else 0)
    if failed:
        print("failed (see their log.txt; run again to resume): " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
