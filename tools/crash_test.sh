#!/usr/bin/env bash
# Crash test: kill -9 a tiny curriculum run at N moments, resume it with --resume until it is
# done, and compare its final adapters byte for byte with an uninterrupted run.
#
#   tools/crash_test.sh [--trials N] [--np 1|2] [--pairs P] [--seed S] [--work DIR] [--bin PATH]
#
# Every trial starts a fresh run and kills it once, at either
#   - a random moment: kill -9 after a delay drawn uniformly from the first 90% of the
#     uninterrupted run's wall time (with --np 2, of one rank drawn at random; mpirun then
#     ends the other), or
#   - a named crash point (MODPO_CRASH_AT, trainer/src/crash_point.rs: the process sends itself
#     SIGKILL there), each of the 10 in turn, at a random pass (1 to 3) of it: random delays
#     almost never land inside a checkpoint write or at a stage boundary, these do.
# Trials alternate between the two. The run then resumes (`train --resume`, never killed,
# as a requeued SLURM job would) until it writes its final adapters, at most 4 times, and
# `cmp` compares them with the uninterrupted run's. The table says where each kill landed
# (the last thing the killed run logged) and the verdict; the exit status is non-zero if any
# trial differs or cannot finish. The run: easy-hard synthetic data (P = 400 pairs, k = 2), the
# tiny model, curriculum (3 stages), a checkpoint every 4 steps, held-out evaluation every 8
# steps, reference cache chunks of 16 pairs.
set -euo pipefail

TRIALS=20
NP=1
PAIRS=400
SEED=1
WORK=""
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN="$ROOT/target/release/modpo-trainer"
while [ $# -gt 0 ]; do
  case "$1" in
    --trials) TRIALS=$2; shift 2 ;;
    --np) NP=$2; shift 2 ;;
    --pairs) PAIRS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "crash_test.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$BIN" ] || { echo "crash_test.sh: no binary at $BIN (run make build)" >&2; exit 2; }
case "$NP" in 1|2) ;; *) echo "crash_test.sh: --np is 1 or 2" >&2; exit 2 ;; esac
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d /tmp/modpo-crash.XXXXXX)
fi
mkdir -p "$WORK"
RANDOM=$SEED
POINTS=(data-loaded reference-chunk-tmp-written reference-chunk-written step
        checkpoint-adapters-written checkpoint-files-written checkpoint-renamed
        checkpoint-written stage-done final-adapters-written)

# Data and model, shared by every run (read only).
if [ ! -f "$WORK/data/train.jsonl" ]; then
  "$BIN" synth --scenario easy-hard --pairs "$PAIRS" --eval-pairs 48 --seed 0 --out "$WORK/data" >/dev/null
fi

# A run directory with its config; the cache is the run's own (inside it).
new_run() {
  local dir=$1
  rm -rf "$dir"; mkdir -p "$dir"
  cat > "$dir/run.toml" <<EOF
[model]
path = "$WORK/data/model"
device = "cpu"
[data]
format = "generic"
train_file = "$WORK/data/train.jsonl"
eval_file = "$WORK/data/eval.jsonl"
dimensions = ["harmless", "helpful"]
max_length = 160
global_batch = 16
micro_batch = $((8 / NP))
reference_chunk_pairs = 16
[method]
name = "curriculum"
beta = 0.1
[train]
output_dir = "run"
learning_rate = 3e-3
warmup_ratio = 0.05
epochs = 1
seed = 0
checkpoint_every = 4
keep_checkpoints = 2
eval_every = 8
EOF
}

# Runs `train` in the background, its output in $2; PID is the process (or mpirun).
start() {
  local dir=$1 log=$2; shift 2
  if [ "$NP" = 1 ]; then
    "$BIN" train --config "$dir/run.toml" "$@" >"$log" 2>&1 &
  else
    local forward=()
    [ -n "${MODPO_CRASH_AT:-}" ] && forward=(-x MODPO_CRASH_AT)
    mpirun --allow-run-as-root --oversubscribe -np 2 "${forward[@]}" \
      "$BIN" train --config "$dir/run.toml" "$@" >"$log" 2>&1 &
  fi
  PID=$!
}

# Where a killed run was: the last line of its log that says what it was doing.
landed() {
  local log=$1
  local line
  line=$(grep -aoE 'crash point [a-z-]+|data loaded|reference log-probs ready|stage starts|checkpoint written|stage done|resuming|starting a new one|starting the run from its beginning' "$log" | tail -1 || true)
  case "$line" in
    "crash point "*) echo "${line#crash point }" ;;
    "") echo "start-up" ;;
    "data loaded") echo "model load / reference pass" ;;
    "reference log-probs ready") echo "stage 1 steps" ;;
    *) echo "after: $line" ;;
  esac
}

# The uninterrupted run.
new_run "$WORK/reference"
started=$(date +%s.%N)
start "$WORK/reference" "$WORK/reference/train.log"
wait "$PID" || { echo "the uninterrupted run failed:"; tail -20 "$WORK/reference/train.log"; exit 1; }
wall=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
expected="$WORK/reference/run/adapters.safetensors"
printf 'uninterrupted run: %.1f s, %s\n' "$wall" "$(sha256sum "$expected" | cut -c1-16)"

failures=0
printf '%-6s %-46s %-30s %-8s %s\n' trial kill landed resumes result
for trial in $(seq 1 "$TRIALS"); do
  dir="$WORK/trial-$trial"
  new_run "$dir"
  if [ $((trial % 2)) = 1 ]; then
    delay=$(awk -v w="$wall" -v r="$RANDOM" 'BEGIN { printf "%.3f", 0.9 * w * r / 32768 }')
    start "$dir" "$dir/killed.log"
    pid=$PID
    sleep "$delay"
    if [ "$NP" = 1 ]; then
      victim=$pid
      how="kill -9 at ${delay}s"
    else
      # The ranks (not mpirun, whose command line names the binary too); mpirun may still be
      # starting them.
      ranks=()
      for _ in $(seq 100); do
        ranks=($(pgrep -f "$BIN train --config $dir/run.toml" | grep -v "^$pid$" || true))
        [ ${#ranks[@]} = 2 ] || ! kill -0 "$pid" 2>/dev/null && break
        sleep 0.05
      done
      victim=${ranks[$((RANDOM % 2))]:-none}
      how="kill -9 one rank at ${delay}s"
    fi
    kill -9 "$victim" 2>/dev/null || how="$how (already done)"
    wait "$pid" 2>/dev/null || true
    # Nothing of the killed job may outlive it and write beside the resumed one.
    pkill -9 -f "$BIN train --config $dir/run.toml" 2>/dev/null || true
  else
    # In turn from a place set by the seed: 20 trials stop at each of the 10 points once.
    point=${POINTS[$(((SEED + trial / 2) % ${#POINTS[@]}))]}
    nth=$((1 + RANDOM % 3))
    # A process passes these once.
    case "$point" in data-loaded|final-adapters-written) nth=1 ;; esac
    rank_spec=""
    if [ "$NP" = 2 ]; then
      # Only rank 0 writes checkpoints and the final adapters.
      case "$point" in
        checkpoint-*|final-adapters-written) rank_spec="@0" ;;
        *) rank_spec="@$((RANDOM % 2))" ;;
      esac
    fi
    how="crash point $point:$nth$rank_spec"
    MODPO_CRASH_AT="$point:$nth$rank_spec" start "$dir" "$dir/killed.log"
    wait "$PID" 2>/dev/null || true
  fi
  where=$(landed "$dir/killed.log")
  resumes=0
  while [ ! -f "$dir/run/adapters.safetensors" ] && [ $resumes -lt 4 ]; do
    resumes=$((resumes + 1))
    start "$dir" "$dir/resume-$resumes.log" --resume
    wait "$PID" || true
  done
  if [ ! -f "$dir/run/adapters.safetensors" ]; then
    result="FAILED: no adapters after $resumes resumes (see $dir)"
    failures=$((failures + 1))
  elif cmp -s "$expected" "$dir/run/adapters.safetensors"; then
    result="identical"
  else
    result="DIFFERENT (see $dir)"
    failures=$((failures + 1))
  fi
  printf '%-6s %-46s %-30s %-8s %s\n' "$trial" "$how" "$where" "$resumes" "$result"
done
echo "crash test: $((TRIALS - failures)) of $TRIALS trials identical to the uninterrupted run (np $NP, work $WORK)"
[ "$failures" = 0 ]
