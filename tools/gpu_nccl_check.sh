#!/usr/bin/env bash
# NCCL check for a lent GPU machine, which has torch at /opt/torch/.venv but no Rust toolchain
# and maybe no Open MPI. Two steps:
#
#   tools/gpu_nccl_check.sh bundle [DIR]   here: build modpo-collective-check (release), put it
#                                          and the Open MPI libraries it links in DIR
#                                          (default target/gpu-nccl-check, about 6 MB)
#   tools/gpu_nccl_check.sh run [DIR]      there: run the check with one rank on CUDA through
#                                          NCCL (world size 1 is still a real ncclAllReduce),
#                                          and, with 2+ GPUs and mpirun, two ranks over MPI
#
# `run` prints PASS or FAIL and exits 0 (pass), 1 (a check failed) or 2 (the machine lacks
# something). Settings: TORCH_LIB (torch's lib/ directory), TIMEOUT_S (per run, default 300),
# NCCL_DEBUG (default WARN).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tools/gpu_lib.sh
source "$ROOT/tools/gpu_lib.sh"
BIN_NAME=modpo-collective-check

bundle() {
    local dir=${1:-$ROOT/target/gpu-nccl-check}
    bundle_binary modpo-launcher "$BIN_NAME" "$dir"
    echo "bundle in $dir ($(du -sh "$dir" | cut -f1)):"
    ls "$dir" "$dir/lib"
}

run() {
    local dir=${1:-$ROOT/target/gpu-nccl-check}
    local bin=$dir/$BIN_NAME
    [ -x "$bin" ] || fail_env "no $bin: run 'tools/gpu_nccl_check.sh bundle' where Rust is"

    find_torch_lib
    local torch_lib=$TORCH_LIB_DIR
    # cudarc opens libnccl.so; the PyPI NCCL that torch uses is only libnccl.so.2.
    local nccl
    nccl=$(ls "$torch_lib"/../../nvidia/nccl/lib/libnccl.so.2 2>/dev/null | head -n1 || true)
    [ -n "$nccl" ] || nccl=$(ls "$torch_lib"/libnccl.so* 2>/dev/null | head -n1 || true)
    [ -n "$nccl" ] || fail_env "no libnccl.so.2 beside torch ($torch_lib/../../nvidia/nccl/lib)"

    local work
    work=$(mktemp -d)
    # Expanded now: the trap runs after run() has returned and its locals are gone.
    trap "rm -rf '$work'" EXIT
    mkdir -p "$work/nccl" "$work/lib"
    ln -s "$(readlink -f "$nccl")" "$work/nccl/libnccl.so"
    export LD_LIBRARY_PATH="$torch_lib:$work/nccl:$work/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    lend_bundled_libs "$bin" "$dir" "$work/lib"

    echo "== machine"
    nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
    echo "torch lib: $torch_lib"
    echo "NCCL: $(readlink -f "$nccl")"
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    local timeout_s=${TIMEOUT_S:-300}

    echo "== one rank, NCCL (--nccl-single)"
    local out rc=0
    out=$(timeout "$timeout_s" "$bin" --nccl-single 2>&1) || rc=$?
    echo "$out"
    if grep -q "skipped: no CUDA device" <<<"$out"; then
        fail_env "torch sees no CUDA device (is libtorch_cuda.so in the binary's NEEDED list?)"
    fi
    if [ "$rc" -ne 0 ] || ! grep -q "all-reduced gradients equal the local ones: yes" <<<"$out"; then
        echo "FAIL: one-rank NCCL check (exit $rc)"
        exit 1
    fi
    echo "PASS: one-rank NCCL all-reduce equals the local gradients"

    local gpus
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ "${gpus:-0}" -ge 2 ] && command -v mpirun >/dev/null; then
        echo "== two ranks on two GPUs, NCCL over mpirun"
        rc=0
        out=$(timeout "$timeout_s" mpirun --allow-run-as-root -np 2 -x LD_LIBRARY_PATH -x NCCL_DEBUG \
            "$bin" --cuda 2>&1) || rc=$?
        echo "$out"
        if [ "$rc" -ne 0 ] || [ "$(grep -c 'all checks passed' <<<"$out")" -ne 2 ]; then
            echo "FAIL: two-rank NCCL check (exit $rc)"
            exit 1
        fi
        echo "PASS: two-rank NCCL checks"
    else
        echo "(two-rank check skipped: ${gpus:-0} GPU(s), mpirun $(command -v mpirun >/dev/null && echo present || echo absent))"
    fi
}

case "${1:-}" in
    bundle) shift; bundle "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
