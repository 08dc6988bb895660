#!/usr/bin/env bash
# Issue 24 on real data: each length correction against `none` on the HelpSteer sample, over
# seeds and methods, then `eval` per seed and correction and the tables across seeds
# (tools/length_bias_tables.py). The base configs, whose settings were fixed before any run,
# are configs/length_bias/helpsteer/<model>-<correction>.toml; this script only rewrites the
# seeds (data split, shuffle, adapter init and, for the tiny model, its weights), the method
# and the directories. A run whose adapters exist is not trained again.
#
#   tools/length_bias_helpsteer.sh --model tiny    [--seeds "0 1 2"] [--methods "curriculum dpo-soup"]
#   tools/length_bias_helpsteer.sh --model smollm2 --seeds 0 --methods curriculum
#
# The SmolLM2 model must be imported first (README, "A real model: SmolLM2").
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
model=tiny
seeds="0 1 2"
methods="curriculum dpo-soup"
corrections="none per-token r-dpo"
out=""
bin=${MODPO_TRAINER:-$root/target/release/modpo-trainer}
while [ $# -gt 0 ]; do
  case $1 in
    --model) model=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --methods) methods=$2; shift 2 ;;
    --corrections) corrections=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
out=${out:-$root/runs/length-bias-helpsteer-$model}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# config_for SEED CORRECTION METHOD: the base config with absolute paths, this seed and method.
config_for() {
  local seed=$1 correction=$2 method=$3
  local base=$root/configs/length_bias/helpsteer/$model-$correction.toml
  [ -f "$base" ] || { echo "no config $base" >&2; exit 2; }
  local model_dir=$root/runs/smollm2
  [ "$model" = tiny ] && model_dir=$out/tiny-model-seed-$seed
  sed -e "s#^path = .*#path = \"$model_dir\"#" \
      -e "s#^train_file = .*#train_file = \"$(cd "$root/../shared/data" && pwd)/helpsteer_sample.jsonl\"#" \
      -e "s#^cache_dir = .*#cache_dir = \"$out/cache\"#" \
      -e "s#^output_dir = .*#output_dir = \"$out/seed-$seed/$correction/$method\"#" \
      -e "s#^name = .*#name = \"$method\"#" \
      -e "s#^seed = .*#seed = $seed#" "$base"
}

for seed in $seeds; do
  if [ "$model" = tiny ] && [ ! -f "$out/tiny-model-seed-$seed/model.safetensors" ]; then
    "$bin" tiny-model --seed "$seed" --out "$out/tiny-model-seed-$seed" >/dev/null
  fi
  for correction in $corrections; do
    runs=()
    for method in $methods; do
      dir=$out/seed-$seed/$correction/$method
      runs+=(--run "$dir")
      [ -f "$dir/adapters.safetensors" ] && continue
      mkdir -p "$out/configs"
      config=$out/configs/seed-$seed-$correction-$method.toml
      config_for "$seed" "$correction" "$method" > "$config"
      echo "== seed $seed, $correction, $method" >&2
      /usr/bin/time -f "%e s wall, %M KiB peak RSS" "$bin" train --resume --config "$config" \
        > "$out/seed-$seed-$correction-$method.log" 2>&1 || {
        echo "training failed: $out/seed-$seed-$correction-$method.log" >&2; exit 1; }
      tail -1 "$out/seed-$seed-$correction-$method.log" >&2
    done
    [ -f "$out/seed-$seed/$correction/eval/results.json" ] ||
      "$bin" eval "${runs[@]}" --out "$out/seed-$seed/$correction/eval" > /dev/null
  done
done
"$root/.venv/bin/python" "$root/tools/length_bias_tables.py" "$out" > "$out/tables.md"
echo "tables: $out/tables.md" >&2
