#!/bin/bash
# Prints the arguments `train` needs to start or continue the run of CONFIG, on one line, so a
# batch script, requeued or not, always does the right thing:
#   start_args.sh CONFIG          the whole run: --resume whenever the run directory exists
#                                 (with or without a checkpoint: `train --resume` starts a run
#                                 killed before its first checkpoint from its beginning)
#   start_args.sh CONFIG STAGE    one stage of a chain (stage.sbatch): --resume when requeued
#                                 inside the stage, else --resume-from-stage STAGE for stages
#                                 after the first, else as the whole run
set -euo pipefail
CONFIG=${1:?usage: start_args.sh CONFIG [STAGE]}
STAGE=${2:-}
RUN_DIR=$("$(dirname "$0")/run_dir.sh" "$CONFIG")
if [ -n "$STAGE" ]; then
  LATEST=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || true)
  if [[ "$LATEST" == stage-"$STAGE"-* ]]; then
    echo "--resume"
    exit 0
  elif [ "$STAGE" -gt 1 ]; then
    echo "--resume-from-stage $STAGE"
    exit 0
  fi
fi
if [ -d "$RUN_DIR" ]; then
  echo "--resume"
else
  echo ""
fi
