"""AdamW and clipping per tensor against over one flat buffer (issue 22, item 5).

The same element-wise ATen ops as trainer/src/optim.rs (decay, both moments, the denominator,
the update; the f64 norm and the scaling; zeroing the gradients), once per adapter tensor as
the optimizer did before, and once over a flat buffer of all of them as it does now. Shapes:
our LoRA adapters (a shared block and k = 2 dimension blocks of rank 8, stored per projection
as A [3 r, in] and B [out, 3 r] for each of the shared and dimension groups) on the seven
projections of every layer of

- the benchmark's cpu preset (hidden 256, MLP 688, 4 layers, 4 KV heads of 32): 112 tensors;
- Llama-3-8B (hidden 4096, MLP 14336, 32 layers, 8 KV heads of 128): 896 tensors, 63M values.

Run with two threads, as the benchmark runs: `.venv/bin/python bench/micro/flat_adamw.py`.
Prints the median of interleaved rounds per shape, in ms per optimizer step.
"""

import statistics
import time

import torch

torch.set_num_threads(2)

BETA1, BETA2, EPS, WD, LR = 0.9, 0.999, 1e-8, 0.01, 1e-4


def adapter_shapes(hidden, mlp, layers, kv_width, rank=8, blocks=3):
    shapes = []
    projections = [
        (hidden, hidden),
        (hidden, kv_width),
        (hidden, kv_width),
        (hidden, hidden),
        (hidden, mlp),
        (hidden, mlp),
        (mlp, hidden),
    ]
    for _ in range(layers):
        for fan_in, fan_out in projections:
            for group_blocks in (1, blocks - 1):  # shared, dimensions
                shapes.append((group_blocks * rank, fan_in))
                shapes.append((fan_out, group_blocks * rank))
    return shapes


def per_tensor_step(params, grads, exp_avg, exp_avg_sq, step):
    squares = [g.double().square().sum() for g in grads]
    total = torch.stack(squares).sum().sqrt().item()
    coef = 1.0 / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    bc1 = 1 - BETA1**step
    bc2_sqrt = (1 - BETA2**step) ** 0.5
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        p.mul_(1 - LR * WD)
        m.mul_(BETA1).add_(g * (1 - BETA1))
        v.mul_(BETA2).add_(g.square() * (1 - BETA2))
        denom = v.sqrt() / bc2_sqrt + EPS
        p.sub_(m / denom * (LR / bc1))
    for g in grads:
        g.zero_()


def main():
    cases = {
        "cpu preset": adapter_shapes(256, 688, 4, 128),
        "Llama-3-8B": adapter_shapes(4096, 14336, 32, 1024),
    }
    for name, shapes in cases.items():
        numel = sum(a * b for a, b in shapes)
        per = [[torch.randn(s) for s in shapes] for _ in range(4)]
        flat = [torch.randn(numel) for _ in range(4)]
        times = {"per tensor": [], "flat": []}
        rounds = 9 if numel < 10_000_000 else 5
        calls = 20 if numel < 10_000_000 else 2
        for step in range(1, rounds + 1):
            for label, buffers in (("per tensor", per), ("flat", [[b] for b in flat])):
                params, grads, m, v = buffers
                for g in grads:
                    g.normal_()
                start = time.perf_counter()
                for _ in range(calls):
                    per_tensor_step(params, grads, m, v, step)
                times[label].append((time.perf_counter() - start) / calls * 1e3)
        per_ms = statistics.median(times["per tensor"])
        flat_ms = statistics.median(times["flat"])
        print(
            f"{name}: {len(shapes)} tensors, {numel / 1e6:.2f}M values: per tensor "
            f"{per_ms:.2f} ms, flat {flat_ms:.2f} ms, flat / per tensor {flat_ms / per_ms:.2f}"
        )


if __name__ == "__main__":
    main()
