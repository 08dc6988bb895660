"""Microbenchmark: libtorch autograd against a hand-written backward for the projections and
MLP of one decoder layer with stacked LoRA adapters, at the CPU benchmark's stage-3 shapes.

The question it answers: would writing the decoder block's backward by hand (which tch cannot
express as a custom autograd function, so it would mean replacing autograd for the whole
model) make a stage-3 step faster on this CPU? The hand-written version runs the same GEMMs
but accumulates in place (grad_x += g W, grad_x += gh A, no separate sums) and saves only
what its backward reads. Attention is replaced by a sum in both versions (`q + [k, v]`): it
is the same kernel either way, and what differs is the projections' backward.

The layer: q, k, v, o, gate, up, down projections `x W^T + (x A^T * s) B^T` with frozen W,
rank-R stacked adapters and per-row scales s; `h = x + o(q + [k, v])`,
`y = h + down(silu(gate(h)) * up(h))`. It first checks that both versions give the same
gradients for x and every A and B, then times forward + backward of each, interleaved.

    .venv/bin/python bench/micro/layer_backward.py [--rounds 5] [--threads 2]
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from timing import median_ms  # bench/micro/timing.py

SHAPES = {  # name: (out, in) at the benchmark's preset (hidden 256, 8 / 4 heads of 32, MLP 688)
    "q": (256, 256),
    "k": (128, 256),
    "v": (128, 256),
    "o": (256, 256),
    "gate": (688, 256),
    "up": (688, 256),
    "down": (256, 688),
}


class Layer:
    def __init__(self, rows, seq, rank):
        self.rows, self.seq, self.hidden = rows, seq, 256
        self.w = {n: torch.randn(o, i) * 0.05 for n, (o, i) in SHAPES.items()}
        self.a = {n: (torch.randn(rank, i) * 0.05).requires_grad_() for n, (o, i) in SHAPES.items()}
        self.b = {n: (torch.randn(o, rank) * 0.05).requires_grad_() for n, (o, i) in SHAPES.items()}
        self.scales = torch.rand(rows, rank)  # [b, R]
        self.token_scales = self.scales.repeat_interleave(seq, 0)  # [b t, R]

    # --- autograd -------------------------------------------------------------------------
    def proj(self, x, n):
        """x: [b t, in] -> [b t, out]"""
        h = x @ self.a[n].t() * self.token_scales  # [b t, R]
        return (x @ self.w[n].t()).addmm_(h, self.b[n].t())

    def forward(self, x):
        """x: [b t, hidden] -> [b t, hidden]"""
        q, k, v = self.proj(x, "q"), self.proj(x, "k"), self.proj(x, "v")
        h = x + self.proj(q + torch.cat([k, v], -1), "o")
        return h + self.proj(F.silu(self.proj(h, "gate")) * self.proj(h, "up"), "down")

    def autograd_step(self, x, grad_y):
        self.forward(x).backward(grad_y)

    # --- hand-written ---------------------------------------------------------------------
    def proj_fwd(self, x, n):
        hs = (x @ self.a[n].t()).mul_(self.token_scales)  # [b t, R]
        return (x @ self.w[n].t()).addmm_(hs, self.b[n].t()), hs

    def proj_bwd(self, g, x, hs, n, grad_x=None):
        """g: [b t, out], the output's gradient; accumulates into A.grad, B.grad and grad_x."""
        self.grad_b[n] = g.t() @ hs  # [out, R]
        gh = (g @ self.b[n]).mul_(self.token_scales)  # [b t, R]
        self.grad_a[n] = gh.t() @ x  # [R, in]
        if grad_x is None:
            grad_x = g @ self.w[n]
        else:
            grad_x.addmm_(g, self.w[n])
        return grad_x.addmm_(gh, self.a[n])

    @torch.no_grad()
    def manual_step(self, x, grad_y):
        self.grad_a, self.grad_b = {}, {}
        q, hq = self.proj_fwd(x, "q")
        k, hk = self.proj_fwd(x, "k")
        v, hv = self.proj_fwd(x, "v")
        att = q + torch.cat([k, v], -1)
        o, ho = self.proj_fwd(att, "o")
        h = x + o
        gate, hg = self.proj_fwd(h, "gate")
        up, hu = self.proj_fwd(h, "up")
        silu = F.silu(gate)
        mlp_in = silu * up
        down, hd = self.proj_fwd(mlp_in, "down")
        _ = h + down  # the layer's output

        grad_mlp_in = self.proj_bwd(grad_y, mlp_in, hd, "down")
        sig = torch.sigmoid(gate)
        grad_gate = grad_mlp_in * up * (sig * (1 + gate * (1 - sig)))  # silu'(gate)
        grad_up = grad_mlp_in.mul_(silu)
        grad_h = self.proj_bwd(grad_gate, h, hg, "gate")
        self.proj_bwd(grad_up, h, hu, "up", grad_h)
        grad_h.add_(grad_y)
        grad_att = self.proj_bwd(grad_h, att, ho, "o")
        grad_x = self.proj_bwd(grad_att, x, hq, "q")
        self.proj_bwd(grad_att[:, :128].contiguous(), x, hk, "k", grad_x)
        self.proj_bwd(grad_att[:, 128:].contiguous(), x, hv, "v", grad_x)
        return grad_x.add_(grad_h)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=24, help="b: 8 pairs x 3 passes")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = Layer(args.rows, args.seq, args.rank)
    tokens = args.rows * args.seq
    x = torch.randn(tokens, layer.hidden, requires_grad=True)  # [b t, hidden]
    grad_y = torch.randn(tokens, layer.hidden)

    layer.autograd_step(x, grad_y)
    grad_x = layer.manual_step(x.detach(), grad_y)
    worst = max(
        [(grad_x - x.grad).abs().max().item()]
        + [(layer.grad_a[n] - layer.a[n].grad).abs().max().item() for n in SHAPES]
        + [(layer.grad_b[n] - layer.b[n].grad).abs().max().item() for n in SHAPES]
    )
    print(f"largest gradient difference, hand-written vs autograd: {worst:.2e}")
    assert worst < 1e-3, "the hand-written backward disagrees with autograd"

    def autograd():
        for n in SHAPES:
            layer.a[n].grad = layer.b[n].grad = None
        layer.autograd_step(x, grad_y)

    def manual():
        layer.manual_step(x.detach(), grad_y)

    times = {"autograd": [], "hand-written": []}
    for _ in range(args.rounds):
        times["autograd"].append(median_ms(autograd))
        times["hand-written"].append(median_ms(manual))
    print(f"b={args.rows} t={args.seq} R={args.rank}, {args.threads} threads, forward + backward of one layer:")
    for name, ts in times.items():
        print(f"  {name:13s} median {statistics.median(ts):6.1f} ms, rounds " + " ".join(f"{t:.0f}" for t in ts))
    ratios = [m / a for a, m in zip(times["autograd"], times["hand-written"])]
    print("  hand-written / autograd per round: " + " ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
