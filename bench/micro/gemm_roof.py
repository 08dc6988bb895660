"""Microbenchmark: how fast MKL runs the GEMMs of a decoder layer's seven projections at the
CPU benchmark's own shapes, against the n x n matmul rate that MFU is measured against.

MFU in `make bench` is model FLOPs per second over the best n x n f32 matmul rate (n = 1024,
the same threads). A step is mostly projection GEMMs, but at the cpu preset's shapes (hidden
256, MLP 688, LoRA rank 8-24) their inner or outer dimensions are small, and MKL runs those
slower than a square GEMM. This measures that ceiling: if the projections' own GEMMs, timed
alone, run at X% of the square rate, a step made of nothing else would reach X% MFU.

Per projection `out = x W^T + (x A^T * s) B^T` (frozen W [out, in], stacked adapter A [R, in],
B [out, R]) over M token rows, the eight GEMMs training runs (as in lora_projection.py, B^T a
contiguous [R, out] copy as the model passes it):

    forward:  x W^T,  h = x A^T,  out += hs B^T
    backward: g W,  g (B^T)^T,  hs^T g,  gh^T x,  grad_x += gh A

FLOPs: 2 M in out for each of the two frozen GEMMs and 2 M R (in or out) for each LoRA GEMM,
the count `trainer/src/bench/flops.rs` uses. Each figure is the best of 3 repeats of 5 calls;
the rounds interleave the square matmul with the shapes, because this machine's speed drifts.

    .venv/bin/python bench/micro/gemm_roof.py [--rows 3000] [--rank 8] [--rounds 5] [--threads 2]

Stage 1 on the cpu preset: about 3000 token rows per micro-batch (8 shared rows), rank 8;
stage 3 one pass at a time: the same rows, rank 16 at w = 1_i (shared block and block i) and 24
for the drawn pass.
"""

import argparse
import statistics

import torch

from layer_backward import SHAPES  # the cpu preset's projections, name: (out, in)
from timing import best_ms  # bench/micro/timing.py


def projection_gemms(m, n_in, n_out, r):
    """The eight GEMMs of one projection's forward and backward: name -> (call, FLOPs)."""
    x = torch.randn(m, n_in)  # [M, in]
    w = torch.randn(n_out, n_in)  # [out, in]
    a = torch.randn(r, n_in)  # [R, in]
    b_t = torch.randn(r, n_out)  # [R, out], B^T as the model passes it
    g = torch.randn(m, n_out)  # [M, out], gradient of out
    hs = torch.randn(m, r)  # [M, R], h * s
    gh = torch.randn(m, r)  # [M, R], (g B) * s
    out = torch.empty(m, n_out)
    grad_x = torch.empty(m, n_in)
    frozen = 2 * m * n_in * n_out
    return {
        "x W^T": (lambda: x @ w.t(), frozen),
        "g W": (lambda: g @ w, frozen),
        "x A^T": (lambda: x @ a.t(), 2 * m * r * n_in),
        "out += hs B^T": (lambda: out.addmm_(hs, b_t), 2 * m * r * n_out),
        "g (B^T)^T": (lambda: g @ b_t.t(), 2 * m * r * n_out),
        "hs^T g": (lambda: hs.t() @ g, 2 * m * r * n_out),
        "gh^T x": (lambda: gh.t() @ x, 2 * m * r * n_in),
        "grad_x += gh A": (lambda: grad_x.addmm_(gh, a), 2 * m * r * n_in),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3000, help="token rows M of one forward")
    p.add_argument("--rank", type=int, default=8, help="stacked adapter rank R of the pass")
    p.add_argument("--square", type=int, default=1024, help="n of the n x n reference matmul")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    n = args.square
    sq_a, sq_b = torch.randn(n, n), torch.randn(n, n)
    gemms = {
        (proj, name): call
        for proj, (n_out, n_in) in SHAPES.items()
        for name, call in projection_gemms(args.rows, n_in, n_out, args.rank).items()
    }
    square_ms, times = [], {key: [] for key in gemms}
    for _ in range(args.rounds):
        square_ms.append(best_ms(lambda: sq_a @ sq_b))
        for key, (f, _) in gemms.items():
            times[key].append(best_ms(f))
    square_rate = 2 * n**3 / statistics.median(square_ms) / 1e6  # GFLOP/s
    med = {key: statistics.median(ts) for key, ts in times.items()}

    print(
        f"M={args.rows} R={args.rank}, {args.threads} threads, median of {args.rounds} rounds; "
        f"{n} x {n} matmul: {square_rate:.1f} GFLOP/s"
    )
    print(f"{'GEMMs':28s} {'ms':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'of square':>9s}")

    def line(label, keys):
        ms = sum(med[k] for k in keys)
        flop = sum(gemms[k][1] for k in keys)
        rate = flop / ms / 1e6
        print(f"{label:28s} {ms:8.2f} {flop / 1e9:8.3f} {rate:8.1f} {100 * rate / square_rate:8.1f}%")

    for proj in SHAPES:
        line(proj, [k for k in gemms if k[0] == proj])
    frozen = [k for k in gemms if k[1] in ("x W^T", "g W")]
    lora = [k for k in gemms if k[1] not in ("x W^T", "g W")]
    line("frozen GEMMs, all seven", frozen)
    line("LoRA GEMMs, all seven", lora)
    line("a layer's projections", list(gemms))


if __name__ == "__main__":
    main()
