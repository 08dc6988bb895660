"""Microbenchmark: what the LoRA GEMMs of one projection cost, in which orientation, and what
fusing them into the frozen projection's GEMMs would save, at the CPU benchmark's shapes
(stage 3 by default; stage 1 is `--rows 3200 --rank 8`).

One projection `out = x W^T + (x A^T * s) B^T` with a frozen W [out, in] and a stacked rank-R
adapter (A [R, in], B [out, R], per-row scales s), over M token rows. Its forward and the
backward that training needs (gradients for x, A and B; none for W) are eight GEMMs:

    forward:  x W^T,  h = x A^T,  out += hs B^T                       (hs = h * s)
    backward: g W,  g B,  B's gradient,  gh^T x,  grad_x += gh A     (gh = (g B) * s)

Autograd picks the form of the B-side GEMMs from the layout of the B^T it is given: from a
transposed view of B it computes B's gradient as g^T hs, from a contiguous [R, out] copy as
hs^T g (and g B as g (B^T)^T). Both are timed; the model passes the copy.

A hand-written backward could fuse the two that read x in the forward (x [W; A]^T, one GEMM
to out + R features) and the two that write grad_x in the backward ([g, gh] [W; A], one GEMM
over out + R inputs, after copying g and gh side by side). libtorch's autograd cannot be given
such a backward from Rust (tch has no custom autograd functions), so this measures what the
fusion would be worth before anyone writes one. Each figure is the best of 3 repeats of 5
calls, and the rounds are interleaved, because the build machine's speed drifts.

    .venv/bin/python bench/micro/lora_projection.py [--rows 8000] [--rank 24] [--out-features 256]
        [--rounds 5] [--threads 2]
"""

import argparse
import statistics

import torch

from timing import best_ms  # bench/micro/timing.py


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8000, help="token rows M (stage 3: 24 rows of ~330 tokens)")
    p.add_argument("--in-features", type=int, default=256)
    p.add_argument("--out-features", type=int, default=256)
    p.add_argument("--rank", type=int, default=24, help="stacked rank: shared + k = 2 blocks of 8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m, n_in, n_out, r = args.rows, args.in_features, args.out_features, args.rank

    x = torch.randn(m, n_in)  # [M, in]
    w = torch.randn(n_out, n_in)  # [out, in]
    a = torch.randn(r, n_in)  # [R, in]
    b = torch.randn(n_out, r)  # [out, R]
    g = torch.randn(m, n_out)  # [M, out], gradient of out
    hs = torch.randn(m, r)  # [M, R], h * s
    gh = torch.randn(m, r)  # [M, R], (g B) * s
    out = torch.empty(m, n_out)
    grad_x = torch.empty(m, n_in)
    wa = torch.cat([w, a], 0)  # [out + R, in]
    b_t = b.t().contiguous()  # [R, out]

    gemms = {
        "base": {"x W^T": lambda: x @ w.t(), "g W": lambda: g @ w},
        # As the model runs them: B^T goes into addmm_ as a contiguous [R, out] copy, so
        # autograd computes B's gradient as hs^T g and h's as g (B^T)^T.
        "lora": {
            "x A^T": lambda: x @ a.t(),
            "out += hs Bt": lambda: out.addmm_(hs, b_t),
            "g Bt^T": lambda: g @ b_t.t(),
            "hs^T g": lambda: hs.t() @ g,
            "gh^T x": lambda: gh.t() @ x,
            "grad_x += gh A": lambda: grad_x.addmm_(gh, a),
        },
        # The same three B-side GEMMs when B^T is a transposed view of B [out, R] (PEFT's
        # layout, and the model's before): autograd then computes g^T hs and g B.
        "B^T as a view": {
            "out += hs B^T": lambda: out.addmm_(hs, b.t()),
            "g B": lambda: g @ b,
            "g^T hs": lambda: g.t() @ hs,
        },
        "fused": {
            "x [W; A]^T": lambda: x @ wa.t(),
            "cat [g, gh]": lambda: torch.cat([g, gh], 1),
            "[g, gh] [W; A]": lambda: torch.cat([g, gh], 1) @ wa,
        },
    }
    times = {name: [] for group in gemms.values() for name in group}
    for _ in range(args.rounds):
        for group in gemms.values():
            for name, f in group.items():
                times[name].append(best_ms(f))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    base_flop = 2 * m * n_in * n_out
    lora_flop = 6 * m * r * (n_in + n_out)  # six GEMMs of 2 M R in, or 2 M R out, FLOPs each
    print(f"M={m} in={n_in} out={n_out} R={r}, {args.threads} threads, median of {args.rounds} rounds")
    for name, ms in med.items():
        spread = f"[{min(times[name]):.2f}-{max(times[name]):.2f}]"
        print(f"  {name:18s} {ms:7.2f} ms {spread}")
    base = med["x W^T"] + med["g W"]
    lora = sum(med[n] for n in gemms["lora"])
    # The fused form replaces x W^T and x A^T by one GEMM, g W and grad_x += gh A by another
    # (whose time includes the copy of g and gh side by side), and keeps the other four.
    fused = med["x [W; A]^T"] + med["[g, gh] [W; A]"] + sum(
        med[n] for n in ("out += hs Bt", "g Bt^T", "hs^T g", "gh^T x")
    )
    print(f"frozen GEMMs (x W^T + g W): {base:.2f} ms, {2 * base_flop / base / 1e6:.0f} GFLOP/s")
    print(
        f"LoRA GEMMs: {lora:.2f} ms = {100 * lora / base:.0f}% of the frozen GEMMs' time "
        f"for {100 * lora_flop / (2 * base_flop):.0f}% of their FLOPs"
    )
    print(f"separate: {base + lora:.2f} ms; fused: {fused:.2f} ms ({fused / (base + lora):.2f}x)")
    b_view = sum(med[n] for n in gemms["B^T as a view"])
    b_contiguous = med["out += hs Bt"] + med["g Bt^T"] + med["hs^T g"]
    print(
        f"B-side GEMMs with B^T contiguous (the model): {b_contiguous:.2f} ms; "
        f"with B^T a view of B: {b_view:.2f} ms ({b_view / b_contiguous:.2f}x)"
    )


if __name__ == "__main__":
    main()
