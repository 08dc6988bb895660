#!/usr/bin/env bash
# Issue 10's GPU benchmark for a lent H100 / H200 (torch at /opt/torch/.venv, no Rust
# toolchain): Llama-3-8B shapes with random bf16 weights, 1024-token pairs, curriculum stages
# 1-3 (and stage 3 with activation recomputation), tokens/s, MFU against the card's measured
# bf16 matmul rate, device memory; then the largest stage-3 micro-batch that fits with and
# without recomputation. Two steps:
#
#   tools/gpu_bench.sh bundle [DIR]   here: build modpo-trainer (release) and put it with the
#                                     Open MPI libraries it links in DIR (target/gpu-bench)
#   tools/gpu_bench.sh run [DIR]      there: run the benchmark; results.json and the table go
#                                     to $OUT (or DIR/out)
#
# Settings: TORCH_LIB (torch's lib/), MICRO_BATCH (pairs per step, default 2), STEPS (timed,
# default 4), WARMUP (default 2), SEARCH (largest micro-batch tried, default 16, 0: skip),
# LAYERS (default 32), TIMEOUT_S (default 540).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tools/gpu_lib.sh
source "$ROOT/tools/gpu_lib.sh"
BIN_NAME=modpo-trainer

bundle() {
    local dir=${1:-$ROOT/target/gpu-bench}
    bundle_binary modpo-trainer "$BIN_NAME" "$dir"
    echo "bundle in $dir ($(du -sh "$dir" | cut -f1))"
}

run() {
    local dir=${1:-$ROOT/target/gpu-bench}
    local bin=$dir/$BIN_NAME
    [ -x "$bin" ] || fail_env "no $bin: run 'tools/gpu_bench.sh bundle' where Rust is"
    find_torch_lib
    local torch_lib=$TORCH_LIB_DIR
    local work
    work=$(mktemp -d)
    # Expanded now: the trap runs after run() has returned and its locals are gone.
    trap "rm -rf '$work'" EXIT
    mkdir -p "$work/lib"
    export LD_LIBRARY_PATH="$torch_lib:$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    lend_bundled_libs "$bin" "$dir" "$work/lib"
    local out=${OUT:-$dir/out}
    mkdir -p "$out"
    echo "== machine"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "(no nvidia-smi)"
    local search=()
    [ "${SEARCH:-16}" -gt 0 ] && search=(--search-micro-batch "${SEARCH:-16}")
    timeout "${TIMEOUT_S:-540}" "$bin" bench --preset llama3-8b --device cuda \
        --layers "${LAYERS:-32}" --seq-len 1024 --micro-batch "${MICRO_BATCH:-2}" \
        --warmup "${WARMUP:-2}" --steps "${STEPS:-4}" --no-ablations "${search[@]}" \
        --out "$out" --work "$work/bench" 2>&1 | tee "$out/bench.log"
}

case "${1:-}" in
    bundle) shift; bundle "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
