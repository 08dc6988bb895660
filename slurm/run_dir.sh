#!/bin/bash
# Prints the run directory (train.output_dir, resolved against the config's directory) of a
# config, so the batch scripts can tell a fresh run from one to resume.
set -euo pipefail
CONFIG=${1:?usage: run_dir.sh CONFIG}
dir=$(sed -n 's/^output_dir *= *"\(.*\)"/\1/p' "$CONFIG" | head -1)
[ -n "$dir" ] || { echo "run_dir.sh: no train.output_dir in $CONFIG" >&2; exit 1; }
case "$dir" in
  /*) echo "$dir" ;;
  *) echo "$(cd "$(dirname "$CONFIG")" && pwd)/$dir" ;;
esac
