"""Turns the benchmark's metrics.json files into results/summary.json, the README's results table and the curves.

Nobody types a number: every row is read from the runs that run_benchmark.py made (mean, std and per-seed values).
Run: python benchmark/report.py   (after python benchmark/run_benchmark.py)
"""

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import index_results  # noqa: E402  (one headline per run)
import run_benchmark  # noqa: E402  (the table of rows lives there)

REPO = run_benchmark.REPO
TABLE_START, TABLE_END = "<!-- results-table:start -->", "<!-- results-table:end -->"
METHODS_START, METHODS_END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
CURVES_START, CURVES_END = "<!-- results-curves:start -->", "<!-- results-curves:end -->"
HEADLINE = ("fid", "kid", "precision", "recall")
EXTRA = (
    "classifier_fid",
    "digits_covered",
    "label_accuracy",
    "mnist_to_usps_label_kept",
    "usps_to_mnist_label_kept",
    "modes_covered",
)


# The README's method table: script, what it is (paper), its docs page, and the earlier (pre-protocol) run in results/
# that the headline cell quotes, labelled as such, until the method has a row under the protocol.
METHODS = [
    ("vanilla_gan", "GAN, non-saturating loss, imposed MLPs, optional R1 (Goodfellow et al. 2014; Mescheder et al. 2018)", "vanilla_gan.md", "vanilla_gan/vanilla_gan__1__1795430833/metrics.json"),
    ("wgan_clip", "WGAN, weight clipping, RMSProp (Arjovsky et al. 2017)", "wgan.md", "wgan_clip/wgan_clip__1__1795534540/metrics.json"),
    ("wgan_gp", "WGAN-GP, gradient penalty, optional labels and fine-tuning (Gulrajani et al. 2017)", "wgan.md", "wgan_gp/wgan_gp__1__1795532700/metrics.json"),
    ("dcgan", "DCGAN and the practical guide's tricks, each a flag (Radford et al. 2015; Salimans et al. 2016)", "dcgan.md", "dcgan/dcgan__1__1795462398/metrics.json"),
    ("unrolled_gan", "Unrolled GAN: G's loss through K unrolled D updates; 2-D mixtures or MNIST (Metz et al. 2016)", "unrolled_mdgan.md", "unrolled_gan/unrolled_gan_K5_lr2e-6__mnist__1__1795448495/metrics.json"),
    ("mdgan", "Mixture Density GAN: D embeds into a Gaussian mixture (Eghbal-zadeh et al. 2019)", "unrolled_mdgan.md", "mdgan/mdgan__mnist__1__1795443311/metrics.json"),
    ("otgan", "OT-GAN: mini-batch Sinkhorn energy distance in a learned cost (Salimans et al. 2018)", "otgan.md", "otgan/otgan__1__1795474175/metrics.json"),
    ("cyclegan", "CycleGAN between MNIST and USPS (Zhu et al. 2017)", "cyclegan.md", "cyclegan/cyclegan__1__1795489648/metrics.json"),
    ("latent_adapt", "post-hoc: class-wise latent Gaussians, exactly N samples per digit", "post_hoc.md", "latent_adapt/latent_adapt__vanilla_gan__1__1795451424__1__1795455496/metrics.json"),
    ("drs", "post-hoc: Discriminator Rejection Sampling, Platt-calibrated (Azadi et al. 2019)", "post_hoc.md", "drs/drs__vanilla_gan__1__1795451424__1__1795455981/metrics.json"),
    ("eval_fid", "FID, KID, precision/recall, the fast classifier metric; module and CLI", "evaluation.md", None),
]  # fmt: skip


@dataclass
class Args:
    work_dir: str = str(REPO / "benchmark" / "work")
    """where run_benchmark.py left the runs"""
    results_dir: str = str(REPO / "results")
    """writes summary.json, curves.png and a copy of every run's metrics.json (METHOD/VARIANT/seedN.json) here"""
    readme: str = str(REPO / "README.md")
    """the file whose method and results tables (between the marker comments) are regenerated; '' to leave it alone"""
    docs_dir: str = str(REPO / "docs")
    """pages whose <!-- results-table:METHOD,...:start/end --> markers get those methods' rows; '' to leave them"""


def scored_generators(metrics: dict) -> dict:
    """{generator name: its metrics} of one metrics.json, with cyclegan's F(USPS) keys named like everyone's."""
    if "final" in metrics:
        found = {"last": metrics["final"], **({"best": metrics["best"]} if metrics.get("best") else {})}
    elif "drs" in metrics:
        found = {"base": metrics["base"], "drs": metrics["drs"]}
    elif "adapted" in metrics:
        found = {"base": metrics["base"], "adapted": metrics["adapted"]}
    else:  # eval_fid.py --json-out: one set of samples
        found = {"real": metrics}
    prefix = "usps_to_mnist_"
    return {
        name: {
            key[len(prefix) :]
            if key.startswith(prefix) and key[len(prefix) :] in HEADLINE + ("num_samples",)
            else key: value
            for key, value in scores.items()
        }
        for name, scores in found.items()
    }


def spread(values: list) -> dict:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def device_name(metrics: dict) -> str:
    return (metrics.get("provenance") or {}).get("device_name", metrics.get("device")) or "not recorded"


def per_seed_label(seeds_and_values: list) -> str:
    """`A` when every seed has the same value, else `A (seeds 1, 2); B (seed 3)`: a row's seeds may come from
    different sessions' machines."""
    seeds_of = {}
    for seed, value in seeds_and_values:
        seeds_of.setdefault(value, []).append(seed)
    if len(seeds_of) == 1:
        return next(iter(seeds_of))
    return "; ".join(
        f"{value} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
        for value, seeds in seeds_of.items()
    )


def post_hoc_budget(table_row: run_benchmark.Row, seeds_and_metrics: list, runs: dict) -> dict:
    """A sampler's budget is its base's training, seed for seed, plus its own seconds of sampling or adapting."""
    base_row = next(
        row
        for row in run_benchmark.ROWS
        if (row.method, row.variant) == table_row.base and row.device == table_row.device
    )
    bases = [runs[base_row, seed][1] for seed, _ in seeds_and_metrics if (base_row, seed) in runs]
    budget = {
        "sampler_seconds": spread(
            [m.get("sampling_seconds", m.get("adapt_seconds", 0.0)) for _, m in seeds_and_metrics]
        )["mean"]
    }
    if len(bases) == len(seeds_and_metrics):
        budget["base_epochs"] = bases[0].get("epochs")
        budget["base_train_minutes"] = spread([m.get("train_seconds", 0.0) / 60 for m in bases])["mean"]
    return budget


def summary_rows(runs: dict) -> list:
    """One row per (method, variant, generator) from {(row, seed): (metrics.json path, metrics)}."""
    rows = []
    for table_row in run_benchmark.ROWS:
        done = [(seed, *runs[table_row, seed]) for seed in table_row.seeds if (table_row, seed) in runs]
        if not done:
            continue
        generators = scored_generators(done[0][2])
        for generator in generators:
            per_seed = [(seed, path, scored_generators(metrics)[generator], metrics) for seed, path, metrics in done]
            first_metrics = per_seed[0][3]
            row = {
                "method": table_row.method,
                "variant": table_row.variant,
                "generator": generator,
                "command": " ".join(["python", f"{table_row.method}.py", *table_row.flags]),
                "seeds": [seed for seed, *_ in per_seed],
                "seeds_planned": list(table_row.seeds),  # more than `seeds` while a row is still being run
                "epochs": first_metrics.get("epochs"),
                "num_samples": per_seed[0][2].get("num_samples"),
                "train_minutes": spread([m.get("train_seconds", 0.0) / 60 for *_, m in per_seed])["mean"],
                "device": per_seed_label([(seed, device_name(m)) for seed, *_, m in per_seed]),
                "commit": (first_metrics.get("provenance") or {}).get("git_commit"),
                "commits": [(m.get("provenance") or {}).get("git_commit") for *_, m in per_seed],
                "runs": [
                    str(Path(path).relative_to(REPO)) if Path(path).is_relative_to(REPO) else path
                    for _, path, *_ in per_seed
                ],
            }
            if generator == "best":
                row["best_epochs"] = [scores.get("epoch") for _, _, scores, _ in per_seed]
            if table_row.base:
                row.update(post_hoc_budget(table_row, [(seed, m) for seed, *_, m in per_seed], runs))
            for key in (*HEADLINE, *EXTRA):
                if all(key in scores for _, _, scores, _ in per_seed):
                    row[key] = spread([scores[key] for _, _, scores, _ in per_seed])
            rows.append(row)
    return rows


def cell(stats: dict | None, digits: int, scale: float = 1.0) -> str:
    if not stats:
        return "-"
    mean = f"{stats['mean'] * scale:.{digits}f}"
    return mean if len(stats["values"]) == 1 else f"{mean} ± {stats['std'] * scale:.{digits}f}"


NO_ROWS = "No row has been run under the protocol yet: `python benchmark/run_benchmark.py --jobs 2`, then this script."


def generator_label(row: dict) -> str:
    """`last`, `best (epoch 97)` (the epochs best.pt came from, per seed) or the sampler's name."""
    if row.get("best_epochs"):
        return f"{row['generator']} (epoch {', '.join(map(str, row['best_epochs']))})"
    return row["generator"]


def markdown_table(rows: list) -> str:
    if not rows:
        return NO_ROWS
    lines = [
        "| method | variant | generator | FID | KID ×1000 | precision | recall | seeds | samples | budget | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["epochs"]:
            budget = f"{row['epochs']} epochs, {row['train_minutes']:.0f} min"
        elif row.get("base_epochs"):
            budget = f"base {row['base_epochs']} epochs, {row['base_train_minutes']:.0f} min; +{row['sampler_seconds']:.0f} s"
        else:
            budget = "-"
        seeds = ", ".join(map(str, row["seeds"]))
        if len(row["seeds"]) < len(row.get("seeds_planned", row["seeds"])):
            seeds += f" ({len(row['seeds'])} of {len(row['seeds_planned'])} planned)"  # "3 (1 of 3 planned)": seed 3
        lines.append(
            f"| {row['method']} | {row['variant']} | {generator_label(row)} | {cell(row.get('fid'), 2)} | "
            f"{cell(row.get('kid'), 2, 1000)} | {cell(row.get('precision'), 3)} | {cell(row.get('recall'), 3)} | "
            f"{seeds} | {row['num_samples']} | {budget} | {row['device']} |"
        )
    return "\n".join(lines)


def replace_between(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"error: no {start} ... {end} markers to write between")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def headline(method: str, rows: list, earlier_run: Optional[str] = None, results_dir: Path = REPO / "results") -> str:
    """One result per method for the README: its first row in the table's order, the best generator if scored;
    without a row, the earlier run's own headline, labelled as made before the protocol."""
    mine = [row for row in rows if row["method"] == method]
    if method == "eval_fid":
        mine = [row for row in rows if row["method"] == "mnist_train"]
    if not mine:
        if earlier_run and (results_dir / earlier_run).exists():
            earlier = json.loads((results_dir / earlier_run).read_text())
            epochs = f", {earlier['epochs']} epochs" if earlier.get("epochs") else ""
            return (
                f"not run under the protocol yet; an earlier single-seed run: {index_results.headline(earlier)}{epochs}"
            )
        return "not run under the protocol yet"
    variant = mine[0]["variant"]
    by_generator = {row["generator"]: row for row in mine if row["variant"] == variant}
    seeds, planned = len(mine[0]["seeds"]), len(mine[0].get("seeds_planned", mine[0]["seeds"]))
    seeds_done = f"{seeds} of {planned} seeds" if seeds < planned else f"{seeds} seed{'s' if seeds > 1 else ''}"
    where = f"{variant}, {seeds_done}, {mine[0]['num_samples']} samples"
    if "base" in by_generator:  # a post-hoc sampler: base -> improved
        base, improved = by_generator.pop("base"), next(iter(by_generator.values()))
        return f"FID {cell(base.get('fid'), 2)} -> {cell(improved.get('fid'), 2)} ({where})"
    # Both generators, the last first: neither is chosen by its Inception FID, so the reader sees both.
    scored = [by_generator[g] for g in ("last", "best") if g in by_generator] or list(by_generator.values())
    fids = " / ".join(f"{cell(row.get('fid'), 2)} {generator_label(row)}" for row in scored)
    budget = f", {scored[0]['epochs']} epochs" if scored[0]["epochs"] else ""
    return f"FID {fids} ({where}{budget})"


def methods_table(rows: list, results_dir: Path) -> str:
    lines = ["| script | method | headline result (benchmark protocol) | docs |", "|---|---|---|---|"]
    for method, what, page, earlier_run in METHODS:
        cell = headline(method, rows, earlier_run, results_dir)
        lines.append(f"| `{method}.py` | {what} | {cell} | [{page}](docs/{page}) |")
    return "\n".join(lines)


def update_docs(docs_dir: Path, rows: list) -> None:
    """Each page's results-table markers get the rows of the methods they name."""
    for page in sorted(docs_dir.glob("*.md")):
        text = page.read_text()
        for methods in re.findall(r"<!-- results-table:([a-z_,]+):start -->", text):
            wanted = methods.split(",")
            body = markdown_table([row for row in rows if row["method"] in wanted])
            if body == NO_ROWS:
                body = f"No {' or '.join(wanted)} row has been run under the protocol yet: `python benchmark/run_benchmark.py --only {' '.join(wanted)}`, then `python benchmark/report.py`."
            text = replace_between(
                text, f"<!-- results-table:{methods}:start -->", f"<!-- results-table:{methods}:end -->", body
            )
        page.write_text(text)


def plot_curves(runs: dict, path: Path) -> None:
    """The fast metric against epoch and against training minutes, one colour per (method, variant), the seeds'
    range as a band: people look at curves before tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_epoch, by_minute) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for table_row in run_benchmark.ROWS:
        histories = [runs[table_row, s][1].get("history") for s in table_row.seeds if (table_row, s) in runs]
        histories = [h for h in histories if h and "classifier_fid" in h[0]]
        if not histories:
            continue
        length = min(len(h) for h in histories)
        epochs = [entry["epoch"] for entry in histories[0][:length]]
        minutes = [sum(h[i]["train_seconds"] for h in histories) / len(histories) / 60 for i in range(length)]
        values = [[h[i]["classifier_fid"] for h in histories] for i in range(length)]
        mean = [sum(v) / len(v) for v in values]
        on = "" if table_row.device == "cpu" else f" on {table_row.device}"
        label = f"{table_row.method} {table_row.variant}{on} ({len(histories)} seed{'s' if len(histories) > 1 else ''})"
        for axis, x in ((by_epoch, epochs), (by_minute, minutes)):
            (line,) = axis.plot(x, mean, label=label)
            if len(histories) > 1:
                axis.fill_between(
                    x, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2
                )
    for axis, xlabel in ((by_epoch, "epoch"), (by_minute, "training minutes")):
        axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("classifier FID (fast metric, 10,000 samples; lower is better)")
        axis.grid(alpha=0.3)
    by_epoch.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def collect(args: Args) -> dict:
    """{(row, seed): (path, metrics)} for every finished run: in the work dir, else its committed copy."""
    runs = {}
    for table_row in run_benchmark.ROWS:
        for seed in table_row.seeds:
            path = run_benchmark.finished_run(args, table_row.method, table_row.variant, seed, table_row.device)
            if path:
                runs[table_row, seed] = (path, json.loads(Path(path).read_text()))
    return runs


def main(args: Args) -> list:
    runs = collect(args)
    results = Path(args.results_dir)
    copies = {}
    for (table_row, seed), (path, metrics) in runs.items():  # the committed trace of each row: its metrics.json
        folder = results / run_benchmark.row_path(table_row.method, table_row.variant, table_row.device)
        copy = folder / f"seed{seed}.json"
        copy.parent.mkdir(parents=True, exist_ok=True)
        if Path(path).resolve() != copy.resolve():
            shutil.copyfile(path, copy)
        copies[table_row, seed] = (str(copy), metrics)
    rows = summary_rows(copies)
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    with_history = any(metrics.get("history") for _, metrics in runs.values())
    if with_history:  # the floor alone has no curve to draw
        plot_curves(runs, results / "curves.png")
    if args.readme:
        readme = Path(args.readme)
        text = replace_between(readme.read_text(), TABLE_START, TABLE_END, markdown_table(rows))
        text = replace_between(text, METHODS_START, METHODS_END, methods_table(rows, results))
        image = f"![fast metric against epoch and training minutes]({os.path.relpath(results / 'curves.png', readme.parent)})"
        image = image if with_history else "No learning curves yet: they are drawn from the rows' runs."
        readme.write_text(replace_between(text, CURVES_START, CURVES_END, image))
    if args.docs_dir:
        update_docs(Path(args.docs_dir), rows)
    print(f"{len(rows)} rows from {len(runs)} runs -> {results / 'summary.json'}")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
