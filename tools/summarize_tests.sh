#!/usr/bin/env bash
# Sums cargo's per-binary "test result:" lines into one closing line, after naming every test
# that failed or did not run: the `#[ignore]`d ones, and the ones that skipped at run time (no
# GPU, a reference `make golden` could not fetch), which cargo counts as passed but which wrote
# a line `<package>/<binary> <test>: <reason>` to the skip log (tools/test_skip.rs); those count
# as skipped, not passed. Exits non-zero when a test failed.
#
# usage: summarize_tests.sh CARGO_TEST_LOG [SKIP_LOG]    (SKIP_LOG defaults to $MODPO_SKIP_LOG)
set -euo pipefail
log=${1:?usage: summarize_tests.sh CARGO_TEST_LOG [SKIP_LOG]}
skips=${2:-${MODPO_SKIP_LOG:-}}
[[ -n $skips && -f $skips ]] || skips=/dev/null
awk -v skips="$skips" '
FILENAME == skips {
    key = $0; sub(/: .*/, "", key)   # one entry per test, whatever it wrote
    if (key != "" && !(key in seen)) { seen[key] = 1; runtime[++nr] = $0 }
    next
}
# "     Running tests/x.rs (target/release/deps/x-0123abcd)": the binary of the lines below.
/^ *Running / { binary = $NF; sub(/\)$/, "", binary); sub(/.*\//, "", binary); sub(/-[0-9a-f]+$/, "", binary) }
/^ *Doc-tests / { binary = "doc-tests " $2 }
/^test .* \.\.\. ignored/ { ignored[++ni] = binary " " $2 }
/^test .* \.\.\. FAILED$/ { failed[++nf] = binary " " $2 }
/^test result:/ {
    for (i = 1; i < NF; i++) {
        if ($(i+1) ~ /^passed;?$/) p += $i
        if ($(i+1) ~ /^failed;?$/) f += $i
        if ($(i+1) ~ /^ignored;?$/) s += $i
    }
}
END {
    if (nr) { printf "skipped at run time (%d):\n", nr; for (i = 1; i <= nr; i++) print "  " runtime[i] }
    if (ni) { printf "ignored (%d):\n", ni; for (i = 1; i <= ni; i++) print "  " ignored[i] }
    if (nf) { printf "failed (%d):\n", nf; for (i = 1; i <= nf; i++) print "  " failed[i] }
    p -= nr; if (p < 0) p = 0
    printf "total: %d passed, %d failed, %d skipped\n", p, f, s + nr
    exit (f > 0)
}' "$skips" "$log"
