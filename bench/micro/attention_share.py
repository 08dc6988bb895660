"""Microbenchmark: what attention costs in a stage-1 step of the CPU benchmark, and how fast
the CPU flash kernel runs at the cpu preset's head dimension and at larger ones.

1. The step's attention: for each timed stage-1 micro-batch of the last `make bench`
   (`target/bench/stage1_pairs.jsonl`, the pairs in the order they were batched: 2 warm-up
   and 8 timed steps of 8 pairs), forward + backward of the shared-prompt layout's attention
   as the model runs it (`model/llama/layout.rs`: one causal call over the rows' first a_end
   tokens, one over b's gathered view [prompt | b], the merging gather), times 4 layers, with
   the cpu preset's 8 query / 4 key-value heads of 32. `--before` runs the first call over
   the whole row instead (the layout before fc87a7c). Lengths in tokens of the byte
   tokenizer: a text's UTF-8 bytes, each ChatML marker one token. `--stage 3` does the same
   for the stage-3 steps (`target/bench/stage3_steps.jsonl`, token ids), three passes (k + 1)
   of the same rows per step, one at a time as on a CPU.
2. The kernel's rate: causal forward + backward of 8 rows of 300 tokens at width 256 as 8
   heads of 32, 4 of 64 and 2 of 128, FLOPs counted as `trainer/src/bench/flops.rs` counts
   attention (4 q_dim per query and key it attends, the backward twice the forward).

    .venv/bin/python bench/micro/attention_share.py [--stage 1|3] [--before] [--threads 2]
"""

import argparse
import json
import statistics
import time

import torch

from timing import median_ms  # bench/micro/timing.py

sdpa = torch.nn.functional.scaled_dot_product_attention


def tokens(text):
    """Tokens of the benchmark's byte tokenizer: bytes, each ChatML marker one token."""
    return len(text.encode()) - 11 * text.count("<|im_start|>") - 9 * text.count("<|im_end|>")


def gather(x, index):
    """Positions `index` [b, n] of x [b, heads, t, d] -> [b, heads, n, d]."""
    b, heads, _, d = x.shape
    return x.gather(2, index.view(b, 1, -1, 1).expand(b, heads, index.shape[1], d))


def shared_prompt_attention(lengths, whole_row):
    """Forward + backward of one layer's attention over shared rows of (prompt, a, b)."""
    b = len(lengths)
    t = max(p + a + r for p, a, r in lengths)
    t2 = max(p + r for p, _, r in lengths)
    a_end = t if whole_row else max(p + a for p, a, _ in lengths)
    view = torch.zeros(b, t2, dtype=torch.long)
    merge = torch.arange(t).repeat(b, 1)
    for j, (p, a, r) in enumerate(lengths):
        view[j, :p] = torch.arange(p)
        view[j, p : p + r] = torch.arange(p + a, p + a + r)
        merge[j, p + a : p + a + r] = a_end + torch.arange(p, p + r)
    q, k, v = (torch.randn(b, t, n, 32).transpose(1, 2).requires_grad_(True) for n in (8, 4, 4))

    def run():
        first = lambda x: x[:, :, :a_end]  # noqa: E731
        row = sdpa(first(q), first(k), first(v), is_causal=True, enable_gqa=True)
        second = sdpa(gather(q, view), gather(k, view), gather(v, view), is_causal=True, enable_gqa=True)
        gather(torch.cat([row, second], 2), merge).sum().backward()

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 3), default=1)
    p.add_argument("--before", action="store_true", help="the first call over the whole row")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.stage == 1:
        pairs = [json.loads(line) for line in open("target/bench/stage1_pairs.jsonl")]
        steps = [
            [(tokens(x["prompt"]), tokens(x["chosen"]), tokens(x["rejected"])) for x in pairs[start : start + 8]]
            for start in range(0, len(pairs), 8)
        ]
    else:
        steps = [
            [(len(x["prompt_ids"]), len(x["a_ids"]), len(x["b_ids"])) for x in json.loads(line)["pairs"]]
            for line in open("target/bench/stage3_steps.jsonl")
        ]
    passes = 1 if args.stage == 1 else 3
    per_step = []
    for lengths in steps[2:]:  # the timed steps, after 2 warm-up steps
        run = shared_prompt_attention(lengths, args.before)
        run()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        per_step.append(passes * 4 * statistics.median(times) * 1e3)
    layout = "first call over the whole row" if args.before else "first call over a_end"
    print(
        f"stage-{args.stage} attention, forward + backward, 4 layers, {passes} pass(es) ({layout}): "
        f"median {statistics.median(per_step):.0f} ms "
        f"per step [{min(per_step):.0f}-{max(per_step):.0f}] over {len(per_step)} steps"
    )

    b, t = 8, 300
    for heads, kv_heads, d in [(8, 4, 32), (4, 2, 64), (2, 1, 128)]:
        q = torch.randn(b, t, heads, d).transpose(1, 2).requires_grad_(True)
        k, v = (torch.randn(b, t, kv_heads, d).transpose(1, 2).requires_grad_(True) for _ in range(2))
        ms = statistics.median(
            [median_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True).sum().backward()) for _ in range(3)]
        )
        flop = 3 * 4 * heads * d * b * t * (t + 1) / 2
        print(f"causal attention, {b} rows of {t}, {heads} heads of {d}: {ms:.1f} ms, {flop / ms / 1e6:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
