"""Where a CPU training step's time goes, from a `perf record` profile, in a few groups: MKL's
GEMM kernels, their packing and copies, attention, element-wise ATen loops, OpenMP waiting,
the allocator, the Python interpreter, the kernel.

    perf record -o perf.data -F 499 -- <a benchmark child or baseline>
    python3 bench/perf_breakdown.py perf.data [--time 35%-100%] [--top 15]

`--time` keeps a window of the recording (perf's own syntax): the timed steps, not the
start-up. Each sample is assigned to the first group whose pattern matches its shared object
or symbol, in the order of GROUPS; the shares are of all samples in the window.
"""

import argparse
import re
import subprocess
import sys
from collections import defaultdict

# (group, pattern on "dso symbol"), first match wins.
GROUPS = [
    ("GEMM: MKL kernel", r"sgemm_kernel|sgemm_ker|gemm_kernel|_ker_[a-z0-9_]*gemm|xgemm|sgemm_knc|kernel_[0-9x]+_.*gemm"),
    ("GEMM: packing and copies", r"mkl_blas.*(copy|pack)|sgemm_(ncopy|tcopy|itcopy|oncopy|otcopy)|gemm.*(copy|pack)"),
    ("GEMM: other MKL", r"mkl_|libmkl|sgemm|gemm"),
    ("attention (flash kernel outside its GEMMs)", r"flash_attention|sdpa|scaled_dot_product"),
    ("exp, log and other libm", r"libm[.-]|__exp|expf|logf|Sleef"),
    ("OpenMP: waiting and scheduling", r"libgomp|libiomp|__kmp|kmp_|omp_"),
    ("allocator, memset, memcpy", r"malloc|free|memset|memcpy|memmove|_int_|tcache|calloc|realloc"),
    ("Python interpreter", r"libpython|python3|_PyEval|PyObject|_Py"),
    ("operating system kernel", r"\[kernel"),
    ("ATen / libtorch, other (element-wise loops, copies, autograd)", r"libtorch|libc10|at::|c10::|torch::"),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("perf_data")
    p.add_argument("--time", default=None, help="perf report --time window, e.g. 35%%-100%%")
    p.add_argument("--top", type=int, default=15, help="also list the N largest symbols")
    args = p.parse_args()
    cmd = ["perf", "report", "-i", args.perf_data, "--stdio", "--no-children", "--sort", "dso,symbol"]
    cmd += ["--percent-limit", "0", "-F", "overhead,dso,sym"]
    if args.time:
        cmd += ["--time", args.time]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(\S+)\s+(.*)$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3).strip()))
    if not rows:
        sys.exit(f"no samples in {args.perf_data} (perf report printed nothing to group)")
    shares = defaultdict(float)
    for share, dso, sym in rows:
        text = f"{dso} {sym}"
        group = next((g for g, pat in GROUPS if re.search(pat, text)), "other")
        shares[group] += share
    total = sum(share for share, _, _ in rows)
    print(f"{args.perf_data}{' ' + args.time if args.time else ''}: {total:.1f}% of samples grouped")
    for group, _ in GROUPS + [("other", "")]:
        if shares[group] > 0:
            print(f"  {shares[group]:5.1f}%  {group}")
    print(f"the {args.top} largest symbols:")
    for share, dso, sym in sorted(rows, reverse=True)[: args.top]:
        print(f"  {share:5.1f}%  {dso}  {sym[:100]}")


if __name__ == "__main__":
    main()
