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
BIN_NAME=modpo-trainer

bundle() {
    local dir=${1:-$ROOT/target/gpu-bench}
    (cd "$ROOT" && cargo build --release -p modpo-trainer --bin "$BIN_NAME")
    rm -rf "$dir" && mkdir -p "$dir/lib"
    cp "$ROOT/target/release/$BIN_NAME" "$dir/"
    strip --strip-debug "$dir/$BIN_NAME"
    # Open MPI and what it pulls in; glibc, libstdc++ and torch's libraries are the machine's.
    ldd "$dir/$BIN_NAME" | awk '$3 ~ /^\// { print $3 }' |
        grep -Ev '/(libc|libm|libdl|librt|libpthread|libutil|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' |
        grep -v 'site-packages' |
        while read -r lib; do cp -L "$lib" "$dir/lib/"; done
    echo "bundle in $dir ($(du -sh "$dir" | cut -f1))"
}

fail_env() { echo "FAIL (environment): $*"; exit 2; }

run() {
    local dir=${1:-$ROOT/target/gpu-bench}
    local bin=$dir/$BIN_NAME
    [ -x "$bin" ] || fail_env "no $bin: run 'tools/gpu_bench.sh bundle' where Rust is"
    local torch_lib=${TORCH_LIB:-}
    if [ -z "$torch_lib" ]; then
        torch_lib=$(ls -d /opt/torch/.venv/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n1 || true)
    fi
    [ -d "$torch_lib" ] || fail_env "torch lib/ not found (set TORCH_LIB)"
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/lib"
    export LD_LIBRARY_PATH="$torch_lib:$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # Lend a bundled library only where the machine has none (a few rounds: deps of deps).
    for _ in 1 2 3 4; do
        local missing
        missing=$(ldd "$bin" | awk '/not found/ { print $1 }')
        [ -n "$missing" ] || break
        for lib in $missing; do
            [ -e "$dir/lib/$lib" ] || fail_env "$lib is missing and not in the bundle"
            ln -sf "$dir/lib/$lib" "$work/lib/$lib"
        done
    done
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
