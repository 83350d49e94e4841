"""Writes results/index.csv and results/README.md: one line per kept run folder in results/METHOD/RUN/.

A line says which script made the run, at which commit (when its metrics.json records one), the flags that differ
from that script's defaults, the seed, the budget, the headline metric with its sample count, and which docs page
cites the run. Nothing is typed: every cell is read from the run's metrics.json (or, for runs stopped by hand,
its history file) and from docs/*.md.
Run: python benchmark/index_results.py
"""

import csv
import dataclasses
import fnmatch
import importlib
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOT_FLAGS = {"seed", "epochs", "data_dir", "inception_weights", "cache_dir", "exp_name", "resume", "save_samples"}
COLUMNS = ("run", "script", "commit", "flags", "seed", "budget", "headline", "cited_by")


def script_defaults(method: str) -> dict:
    sys.path.insert(0, str(REPO))
    fields = dataclasses.fields(importlib.import_module(method).Args)
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def flags_that_differ(args: dict, defaults: dict) -> str:
    differ = []
    for key, value in args.items():
        if key in NOT_FLAGS or key not in defaults or value == defaults[key] or value in ([], None):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            differ.append(flag)
        elif value is False:
            differ.append("--no-" + key.replace("_", "-"))
        else:
            differ.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    if "checkpoint" in args:  # the post-hoc samplers' positional base checkpoint
        differ.insert(0, args["checkpoint"])
    return " ".join(differ)


def headline(metrics: dict) -> str:
    """The run's main number with its sample count, in the units of its task."""
    final = metrics.get("final") or {}
    if "modes_covered" in final:
        return f"{final['modes_covered']}/{final['num_modes']} modes, {final['high_quality']:.1%} high quality"
    if "mnist_to_usps_label_kept" in final:
        return (f"label kept {final['mnist_to_usps_label_kept']:.1%} / {final['usps_to_mnist_label_kept']:.1%}, "
                f"FID of F(USPS) {final['usps_to_mnist_fid']:.2f} ({final['usps_to_mnist_num_samples']} samples)")  # fmt: skip
    for improved in ("drs", "adapted"):
        if improved in metrics:
            base, better = metrics["base"], metrics[improved]
            return f"FID {base['fid']:.2f} -> {better['fid']:.2f} ({better['num_samples']} samples)"
    if "fid" in final:
        asked = f", {final['label_accuracy']:.1%} as asked" if "label_accuracy" in final else ""
        return f"FID {final['fid']:.2f} ({final['num_samples']} samples){asked}"
    history = metrics.get("history") or []
    if history and "modes_covered" in history[-1]:
        return f"{history[-1]['modes_covered']} modes at epoch {history[-1]['epoch']} (stopped by hand)"
    return ""


def cites(page: str, method: str, run: str) -> bool:
    """The page names the run, or a results/ pattern that matches it (`results/mdgan/mdBh_s*`)."""
    patterns = re.findall(r"results/" + method + r"/([\w.*-]+)", page)
    return run in page or any(fnmatch.fnmatch(run, pattern) for pattern in patterns if "*" in pattern)


def run_lines() -> list:
    pages = {page.name: page.read_text() for page in sorted((REPO / "docs").glob("*.md"))}
    pages["README.md"] = (REPO / "README.md").read_text()
    lines = []
    scripts = {path.stem for path in REPO.glob("*.py")}  # results/mnist_train (the floor row) has no script
    for method_dir in sorted(p for p in (REPO / "results").iterdir() if p.is_dir() and p.name in scripts):
        defaults = script_defaults(method_dir.name)
        for run_dir in sorted(p for p in method_dir.iterdir() if p.is_dir() and "__" in p.name):
            found = sorted(run_dir.glob("metrics.json")) or sorted(run_dir.glob("*.json"))
            if not found:
                continue
            metrics = json.loads(found[0].read_text())
            if isinstance(metrics, list):  # a history saved by hand from a stopped run
                metrics = {"history": metrics}
            args = metrics.get("args", {})
            epochs = metrics.get("epochs") or (metrics.get("history") or [{}])[-1].get("epoch")
            step = metrics.get("step")
            lines.append(
                {
                    "run": f"{method_dir.name}/{run_dir.name}",
                    "script": f"{method_dir.name}.py",
                    "commit": (metrics.get("provenance") or {}).get("git_commit", "")[:7],
                    "flags": flags_that_differ(args, defaults),
                    "seed": args.get("seed", ""),
                    "budget": f"{epochs} epochs" + (f", {step:,} steps" if step else "") if epochs else "",
                    "headline": headline(metrics),
                    "cited_by": " ".join(
                        name for name, text in pages.items() if cites(text, method_dir.name, run_dir.name)
                    ),
                }
            )
    return lines


def main() -> int:
    lines = run_lines()
    with open(REPO / "results" / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(lines)
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for line in lines:
        cells = [f"`{line[c]}`" if c == "flags" and line[c] else str(line[c]) for c in COLUMNS]
        table.append("| " + " | ".join(cells) + " |")
    (REPO / "results" / "README.md").write_text(
        "# results/\n\n"
        "Generated by `python benchmark/index_results.py` (also as `index.csv`); do not edit by hand.\n\n"
        "- `summary.json`, `curves.png`, `METHOD/VARIANT/seedN.json`: the benchmark protocol's rows "
        "(`benchmark/run_benchmark.py`, then `benchmark/report.py`).\n"
        "- `sweeps/`: fast-metric recipe sweeps (`benchmark/sweep.py`), every run's per-epoch history.\n"
        "- `METHOD/RUN/`: earlier runs the docs pages cite (metrics.json with its per-epoch history, grids), made "
        "before the protocol: mixed sample counts, single seeds. Runs of superseded code were removed; git history "
        "keeps them.\n\n"
        f"{len(lines)} runs. `commit` is empty for runs made before metrics.json recorded one; `flags` lists what "
        "differs from the script's current defaults.\n\n" + "\n".join(table) + "\n"
    )
    print(f"{len(lines)} runs -> results/index.csv, results/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
