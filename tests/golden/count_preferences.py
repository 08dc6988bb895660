#!/usr/bin/env python3
"""Independent count of preference pairs, for the data tests (plain `json`, no project code).

Usage: count_preferences.py FORMAT FILE [DIMENSION ...]
  FORMAT: pku-saferlhf | helpsteer | generic (generic needs the dimension names)

Prints one JSON object: rows, pairs, agree, conflict, tied, identical_untied (agree or
conflict pairs whose two responses are the same text), per_dimension
{name: [prefers_a, prefers_b, ties]} over agree + conflict pairs, and conflicts
{"dim_i x dim_j": n} (i < j in the given order), following METHOD.md section 1:
d = s_a - s_b; agree = all non-zero components share a sign; conflict = both signs;
tied = d == 0. PKU-SafeRLHF scores are indicators (1[better == r], 1[safer == r]);
HelpSteer responses to the same prompt are paired i < j in file order.
"""
import json
import sys

PKU_DIMS = ["helpfulness", "harmlessness"]
HELPSTEER_DIMS = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pku_pairs(rows, dims):
    for r in rows:
        score = {
            "helpfulness": lambda k: 1.0 if r["better_response_id"] == k else 0.0,
            "harmlessness": lambda k: 1.0 if r["safer_response_id"] == k else 0.0,
        }
        yield [score[d](0) for d in dims], [score[d](1) for d in dims], r["response_0"] == r["response_1"]


def helpsteer_pairs(rows, dims):
    groups = {}  # insertion-ordered: prompts in order of first appearance
    for r in rows:
        groups.setdefault(r["prompt"], []).append(([float(r[d]) for d in dims], r["response"]))
    for responses in groups.values():
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                (sa, ra), (sb, rb) = responses[i], responses[j]
                yield sa, sb, ra == rb


def generic_pairs(rows, dims):
    for r in rows:
        yield (
            [float(x) for x in r["scores_a"]],
            [float(x) for x in r["scores_b"]],
            r["response_a"] == r["response_b"],
        )


def main():
    fmt, path, dims = sys.argv[1], sys.argv[2], sys.argv[3:]
    if not dims:
        dims = {"pku-saferlhf": PKU_DIMS, "helpsteer": HELPSTEER_DIMS}[fmt]
    rows = read_rows(path)
    make = {"pku-saferlhf": pku_pairs, "helpsteer": helpsteer_pairs, "generic": generic_pairs}[fmt]
    out = {
        "rows": len(rows),
        "pairs": 0,
        "agree": 0,
        "conflict": 0,
        "tied": 0,
        "identical_untied": 0,
        "per_dimension": {d: [0, 0, 0] for d in dims},
        "conflicts": {},
    }
    for i in range(len(dims)):
        for j in range(i + 1, len(dims)):
            out["conflicts"][f"{dims[i]} x {dims[j]}"] = 0
    for sa, sb, same_text in make(rows, dims):
        out["pairs"] += 1
        d = [a - b for a, b in zip(sa, sb)]
        pos, neg = any(x > 0 for x in d), any(x < 0 for x in d)
        if not pos and not neg:
            out["tied"] += 1
            continue
        out["conflict" if pos and neg else "agree"] += 1
        out["identical_untied"] += same_text
        for i, x in enumerate(d):
            out["per_dimension"][dims[i]][0 if x > 0 else 1 if x < 0 else 2] += 1
            for j in range(i + 1, len(dims)):
                if x * d[j] < 0:
                    out["conflicts"][f"{dims[i]} x {dims[j]}"] += 1
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
