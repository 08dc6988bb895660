"""Tables of tools/length_bias_helpsteer.sh: per length correction and method, accuracy on the
held-out conflict pairs per dimension pair and w, and the length-controlled view (L: accuracy
where the labelled winner is the longer response, S: where it is the shorter one, r: Pearson
correlation of the implicit margin with the length difference), from each seed's
`seed-S/<correction>/eval/results.json`.

Over several seeds a cell is the mean over the seeds that count a pair there, +- the half-width
of a 95% Student-t interval over those seeds; with one seed it is that seed's value and its
95% bootstrap interval over pairs (from `eval`).

Usage: length_bias_tables.py OUT_DIR
"""

import json
import math
import statistics
import sys
from pathlib import Path

# Two-sided 95% Student-t critical values by degrees of freedom (scipy.stats.t.ppf(0.975, df)).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
CORRECTIONS = ["none", "per-token", "r-dpo"]


def load(out):
    """{correction: [results.json of each seed, by seed]} and the seeds found."""
    found = {}
    for seed_dir in sorted(out.glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
        for correction in CORRECTIONS:
            path = seed_dir / correction / "eval" / "results.json"
            if path.exists():
                found.setdefault(correction, []).append((seed_dir.name, json.loads(path.read_text())))
    return found


def cell(values, intervals=None, scale=100.0, digits=1):
    """Mean +- t half-width over seeds; one seed: the value and its bootstrap interval."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        text = f"{values[0] * scale:.{digits}f}"
        if intervals and intervals[0]:
            lo, hi = intervals[0]
            text += f" [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"
        return text
    mean = statistics.mean(values)
    half = T95[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"


def pairs_of(results):
    """The dimension pairs in the order `eval` lists them."""
    seen = []
    for s in results["settings"]:
        pair = tuple(s["pair"])
        if pair not in seen:
            seen.append(pair)
    return seen


def settings_of(results, pair):
    return [s for s in results["settings"] if tuple(s["pair"]) == pair]


def by_label(setting, label):
    return next(r for r in setting["results"] if r["label"] == label)


def accuracy_table(per_seed, pair, md):
    first = per_seed[0][1]
    labels = [r["label"] for r in first["runs"]]
    columns = [s["first_weight"] for s in settings_of(first, pair)]
    head = " | ".join(f"({w:g}, {1 - w:g})" for w in columns)
    md.append(f"| method | {head} | mean (interior w) |")
    md.append("|---" * (len(columns) + 2) + "|")
    for label in labels:
        cells = []
        interior = []
        for i, w in enumerate(columns):
            values, intervals = [], []
            for _, results in per_seed:
                r = by_label(settings_of(results, pair)[i], label)
                values.append(r["accuracy"])
                intervals.append(r["interval"])
            cells.append(cell(values, intervals))
            if 0 < w < 1:
                interior.append(values)
        seed_means = []
        for seed in range(len(per_seed)):
            vals = [v[seed] for v in interior if v[seed] is not None]
            seed_means.append(statistics.mean(vals) if vals else None)
        md.append(f"| {label} | " + " | ".join(cells) + f" | {cell(seed_means)} |")
    counted = [sum(settings_of(r, pair)[i]["counted"] for _, r in per_seed) for i in range(len(columns))]
    md.append("| pairs counted (all seeds) | " + " | ".join(map(str, counted)) + " | |")


def length_table(per_seed, pair, md):
    first = per_seed[0][1]
    labels = [r["label"] for r in first["runs"]]
    columns = [s["first_weight"] for s in settings_of(first, pair)]
    head = " | ".join(f"({w:g}, {1 - w:g})" for w in columns)
    md.append(f"| method | {head} |")
    md.append("|---" * (len(columns) + 1) + "|")
    for label in labels:
        cells = []
        for i in range(len(columns)):
            views = [by_label(settings_of(r, pair)[i], label)["length"] for _, r in per_seed]
            longer = cell([v["longer_wins"]["accuracy"] for v in views], digits=0)
            shorter = cell([v["shorter_wins"]["accuracy"] for v in views], digits=0)
            r = cell([v["margin_length_correlation"] for v in views], scale=1.0, digits=2)
            cells.append(f"L {longer}, S {shorter}, r {r}")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    label_r = []
    for i in range(len(columns)):
        views = [by_label(settings_of(r, pair)[i], labels[0])["length"] for _, r in per_seed]
        label_r.append("r " + cell([v["score_length_correlation"] for v in views], scale=1.0, digits=2))
    md.append("| labels | " + " | ".join(label_r) + " |")
    split = []
    for i in range(len(columns)):
        views = [by_label(settings_of(r, pair)[i], labels[0])["length"] for _, r in per_seed]
        split.append(
            f"{sum(v['longer_wins']['counted'] for v in views)}, "
            f"{sum(v['shorter_wins']['counted'] for v in views)}"
        )
    md.append("| pairs L, S (all seeds) | " + " | ".join(split) + " |")


def per_seed_table(found, pair, md):
    """Each seed's accuracy and margin-length correlation: the mean over seeds hides a model
    that learns "longer wins" in one seed and "shorter wins" in another."""
    any_results = next(iter(found.values()))[0][1]
    columns = [s["first_weight"] for s in settings_of(any_results, pair)]
    head = " | ".join(f"({w:g}, {1 - w:g})" for w in columns)
    md.append(f"| correction | method | seed | {head} |")
    md.append("|---" * (len(columns) + 3) + "|")
    for correction in CORRECTIONS:
        for seed, results in found.get(correction, []):
            for label in [r["label"] for r in results["runs"]]:
                cells = []
                for setting in settings_of(results, pair):
                    r = by_label(setting, label)
                    rho = r["length"]["margin_length_correlation"]
                    rho_text = "-" if rho is None else f"{rho:.2f}"
                    cells.append(f"{r['accuracy'] * 100:.0f}, r {rho_text}")
                md.append(f"| {correction} | {label} | {seed} | " + " | ".join(cells) + " |")


def summary_table(found, md):
    md.append("| correction | method | mean accuracy (all settings) | win rate |")
    md.append("|---|---|---|---|")
    for correction in CORRECTIONS:
        for label in [r["label"] for r in found.get(correction, [(None, {"runs": []})])[0][1]["runs"]]:
            rows = [next(x for x in r["summary"] if x["label"] == label) for _, r in found[correction]]
            md.append(
                f"| {correction} | {label} | {cell([x['mean_accuracy'] for x in rows])} | "
                f"{cell([x['win_rate'] for x in rows], scale=1.0, digits=2)} |"
            )


def main():
    out = Path(sys.argv[1])
    found = load(out)
    if not found:
        sys.exit(f"no seed-*/<correction>/eval/results.json under {out}")
    md = [f"# Length corrections on the HelpSteer sample: `{out.name}`", ""]
    seeds = sorted({seed for runs in found.values() for seed, _ in runs})
    md.append(f"Seeds: {', '.join(seeds)}. " + __doc__.split("\n\n")[1].replace("\n", " "))
    md.append("")
    md.append("## Mean accuracy (%) and win rate over all settings")
    md.append("")
    summary_table(found, md)
    any_results = next(iter(found.values()))[0][1]
    for pair in pairs_of(any_results):
        md.append("")
        md.append(f"## {pair[0]} x {pair[1]}: accuracy (%), w = (w_{pair[0]}, w_{pair[1]})")
        for correction in CORRECTIONS:
            if correction in found:
                md += ["", f"`{correction}`:", ""]
                accuracy_table(found[correction], pair, md)
        md.append("")
        md.append(f"## {pair[0]} x {pair[1]}: the length-controlled view")
        for correction in CORRECTIONS:
            if correction in found:
                md += ["", f"`{correction}`:", ""]
                length_table(found[correction], pair, md)
        if len(seeds) > 1:
            md += ["", f"## {pair[0]} x {pair[1]}: each seed (accuracy %, r)", ""]
            per_seed_table(found, pair, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
