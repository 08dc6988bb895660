"""Microbenchmark: forward + backward of one layer's attention on CPU at the benchmark's
shapes, the way the model runs it and two alternatives.

The model calls `scaled_dot_product_attention` with an explicit boolean mask (causal, padding,
and for the shared-prompt layout the mask that keeps response b from seeing response a) and
grouped-query attention unexpanded (`enable_gqa`, 8 query / 4 key-value heads of 32). The CPU
flash kernel splits keys into blocks of 512, so at these lengths (one block) it computes
the masked half of every row's scores too. The alternatives:

- query chunks: queries cut into n chunks, chunk i attending keys [0, end of chunk i) only
  (exact for any causal mask), which skips most of the masked half;
- math: scores, softmax and the value product as separate ATen ops.

Each is checked against the model's form, then timed (median of 6 calls after 2, per
round, rounds interleaved).

    .venv/bin/python bench/micro/attention.py [--rows 8 --seq 400] [--rounds 3] [--threads 2]

Stage 1 in the benchmark runs 8 shared rows of up to ~400 tokens; stage 3 24 rows of ~330.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from timing import median_ms  # bench/micro/timing.py


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, t, heads, kv_heads, d = args.rows, args.seq, 8, 4, 32

    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).contiguous()  # [b, 1, t, t]
    q = torch.randn(b, heads, t, d, requires_grad=True)
    k = torch.randn(b, kv_heads, t, d, requires_grad=True)
    v = torch.randn(b, kv_heads, t, d, requires_grad=True)
    grad_out = torch.randn(b, heads, t, d)

    def model_form():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def query_chunks(n):
        size = -(-t // n)
        outs = []
        for lo in range(0, t, size):
            hi = min(t, lo + size)
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], attn_mask=mask[:, :, lo:hi, :hi], enable_gqa=True
                )
            )
        return torch.cat(outs, 2)

    def math():
        group = heads // kv_heads
        scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * d**-0.5  # [b, h, t, t]
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
        return probs @ v.repeat_interleave(group, 1)

    forms = {"model (mask)": model_form, "math": math}
    for n in (2, 4, 6):
        forms[f"{n} query chunks"] = lambda n=n: query_chunks(n)
    reference = model_form()
    for name, f in forms.items():
        assert (f() - reference).abs().max().item() < 1e-4, f"{name} disagrees with the model's form"

    times = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, f in forms.items():
            times[name].append(median_ms(lambda f=f: f().backward(grad_out)))
    print(f"b={b} t={t}, {heads} / {kv_heads} heads of {d}, {args.threads} threads, forward + backward:")
    base = statistics.median(times["model (mask)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        rounds = " ".join(f"{x:.0f}" for x in ts)
        print(f"  {name:15s} median {med:6.1f} ms ({med / base:.2f}x), rounds {rounds}")


if __name__ == "__main__":
    main()
