"""Ablation of dcgan.py's tricks: every flag against the plain DCGAN at one budget, printed as a Markdown table.

Each configuration is a separate `dcgan.py` run with the same seed, epochs and evaluation; extra arguments go to
every run. Not a test (pytest collects only test_*.py). docs/dcgan.md's table came from:
  python benchmark/ablation_dcgan.py --epochs 2 --eval-samples 1000 -- --bf16 --data-dir ../shared/data \
      --inception-weights ../shared/weights/pt_inception-2015-12-05-pool3.pth
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "plain DCGAN": [],
    "conditional": ["--conditional"],
    "one-sided smoothing 0.9": ["--real-label", "0.9"],
    "two-sided smoothing 0.9/0.1": ["--real-label", "0.9", "--fake-label", "0.1"],
    "label flip 5%": ["--label-flip", "0.05"],
    "replay (6400 images, every 5 steps)": ["--replay-size", "6400", "--replay-every", "5"],
    "minibatch discrimination (B=100, C=5)": ["--minibatch-disc", "100", "5"],
    "virtual batch norm in G": ["--vbn"],
    "batch norm in D": ["--disc-bn"],
    "kernel size 3": ["--kernel-size", "3"],
    "kernel size 4": ["--kernel-size", "4"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run these configurations only")
    parser.add_argument("extra", nargs="*", help="arguments for every dcgan.py run (after --)")
    args = parser.parse_args()

    rows = [
        "| trick | flags | FID | precision | recall | classifier FID | digits | as asked | train min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, flags in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        exp_name = "dcgan_ablation_" + ("_".join(f.strip("-") for f in flags) or "plain")
        command = [
            sys.executable, str(REPO / "dcgan.py"), "--exp-name", exp_name, "--seed", str(args.seed),
            "--epochs", str(args.epochs), "--eval-samples", str(args.eval_samples), *flags, *args.extra,
        ]  # fmt: skip
        started = time.time()
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{name}: dcgan.py failed:\n{result.stderr[-2000:]}", file=sys.stderr)
            rows.append(f"| {name} | `{' '.join(flags)}` | failed | | | | | | |")
            continue
        run_name = result.stdout.strip().splitlines()[-1].split(":")[0]
        summary = json.loads(Path(f"runs/{run_name}/metrics.json").read_text())
        final = summary["final"]
        as_asked = f"{final['label_accuracy']:.1%}" if "label_accuracy" in final else "-"  # conditional runs only
        rows.append(
            f"| {name} | `{' '.join(flags)}` | {final['fid']:.2f} | {final['precision']:.3f} | "
            f"{final['recall']:.3f} | {final['classifier_fid']:.2f} | {final['digits_covered']}/10 | "
            f"{as_asked} | {summary['train_seconds'] / 60:.1f} |"
        )
        print(f"{name}: FID {final['fid']:.2f} ({run_name}, {time.time() - started:.0f}s)", flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
